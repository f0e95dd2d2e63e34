"""tools/bench_memory.py at the tiny preset: every configuration of every stage compiles to a
positive peak, chunked log-probs lower the SFT peak at a large-ish vocabulary, remat and
micro-batching lower what the backward pass saves, LoRA's arguments lose the reference and the
base's AdamW moments, and the "largest size that fits" logic holds on a made-up table."""

import jax
import pytest

from rlhf_jax import model as M
from tools import bench_memory as bm

G = bm.GIB


def test_tiny_every_configuration_compiles(capsys):
    # One layer and vocab 4096: the [B, T, V] float32 logits (4 x 64 x 4096 x 4 B = 4 MiB, and
    # their softmax and gradient) outweigh the rest of a step, as at V = 128k on a real model.
    out = bm.main(["--sizes", "tiny", "--set", "n_layers=1", "--set", "vocab_size=4096",
                   "--seq-len", "64", "--batch", "4", "--micro-batches", "2",
                   "--logits-chunk", "16", "--budgets", "0.001,1",
                   "--xla-option", "xla_cpu_use_fusion_emitters=false"])
    printed = capsys.readouterr().out
    configs = out["configs"]
    assert configs == ["plain", "micro=2", "remat=dots", "remat=full", "chunk=16", "all",
                       "lora=16"]
    for stage in bm.STAGES:
        for name in configs:
            cell = out["cells"][stage]["tiny"][name]
            assert cell["peak"] > 0 and cell["temp"] > 0 and cell["saved"] > 0, (stage, name)
            # Parameters and AdamW state are donated: their outputs alias the arguments.
            assert 0 < cell["aliased"] <= min(cell["arguments"], cell["outputs"])
            assert cell["total"] == cell["peak"] + cell["resident"]
        assert (out["cells"][stage]["tiny"]["all"]["saved"]
                < out["cells"][stage]["tiny"]["plain"]["saved"]), stage
    sft = out["cells"]["sft"]["tiny"]
    logits = 4 * 63 * 4096 * 4
    assert sft["chunk=16"]["peak"] < sft["plain"]["peak"] - logits
    assert sft["remat=full"]["saved"] < sft["remat=dots"]["saved"] < sft["plain"]["saved"]
    assert sft["micro=2"]["saved"] < sft["plain"]["saved"]
    # PPO adds the resident frozen reference policy and reward model (float32).
    assert out["cells"]["ppo"]["tiny"]["plain"]["resident"] > 0
    assert out["cells"]["dpo"]["tiny"]["plain"]["resident"] == 0
    for title in bm.TITLES.values():
        assert title in printed
    assert "fits 0.001 GiB:" in printed and "plain none" in printed
    assert "fits 1 GiB:" in printed and "all tiny" in printed
    assert "XLA:CPU merges remat's recomputation back" in printed
    assert "(tiny, lora=16: arguments" in printed and "lora=16 tiny" in printed

    # LoRA (rank 16 on q, k, v, o and the MLP). P: the plain model's parameter bytes; A: its
    # adapters'. Plain DPO's arguments hold P (policy) + 2P (AdamW mu, nu) + P (reference);
    # LoRA's P + A (base and adapters, the base not donated) + 2A (moments of the adapters
    # only), the reference being adapters_off of the same arguments. The rest (batch, guard,
    # step counts) is the same, so the difference is exactly 3 (P - A).
    cfg = bm.SIZES["tiny"].replace(n_layers=1, vocab_size=4096, max_len=64, dtype="bfloat16",
                                   param_dtype="float32")
    p_bytes = bm._nbytes(bm._abstract_model(cfg, "policy")[1])
    lora = bm._abstract_model(cfg.replace(**M.lora(rank=16)), "policy")[1]
    a_bytes = sum(x.size * x.dtype.itemsize for path, x in
                  jax.tree_util.tree_leaves_with_path(lora) if M.is_trainable(path))
    assert bm._nbytes(lora) == p_bytes + a_bytes and 0 < 10 * a_bytes < p_bytes
    dpo = out["cells"]["dpo"]["tiny"]
    assert dpo["plain"]["arguments"] - dpo["lora=16"]["arguments"] == 3 * (p_bytes - a_bytes)
    # Outputs: adapters and their moments (3A) plus scalars (guard, metrics, counts); the base
    # is never returned.
    assert 3 * a_bytes <= dpo["lora=16"]["outputs"] < 3 * a_bytes + 1024
    assert dpo["plain"]["outputs"] >= 3 * p_bytes
    # PPO: the reference policy is the policy's base (no resident bytes), the reward model
    # stays; the critic is a second adapted backbone, so its base is an argument too.
    ppo = out["cells"]["ppo"]["tiny"]
    reward = bm._nbytes(bm._abstract_model(cfg, "reward")[1])
    assert ppo["plain"]["resident"] == p_bytes + reward and ppo["lora=16"]["resident"] == reward
    assert ppo["lora=16"]["arguments"] < ppo["plain"]["arguments"] / 2
    sft = out["cells"]["sft"]["tiny"]
    # SFT: 3P (no reference) against P + 3A.
    assert sft["plain"]["arguments"] - sft["lora=16"]["arguments"] == 2 * p_bytes - 3 * a_bytes


def test_configs_flag_restricts_and_rejects_unknown_names():
    with pytest.raises(SystemExit, match="unknown configurations"):
        bm.main(["--sizes", "tiny", "--configs", "plain,lora=8"])


def test_largest_fitting_on_a_made_up_table():
    params = {"a": 100, "b": 300, "c": 1000, "d": 200}
    table = {"a": {"plain": 10 * G, "all": 2 * G},
             "b": {"plain": 20 * G, "all": 5 * G},
             "c": {"plain": 90 * G, "all": 16 * G},
             # Fewer parameters than b but listed last, and fits where b does not.
             "d": {"plain": 15 * G, "all": None}}
    assert bm.largest_fitting(table, params, 16 * G) == {"plain": "d", "all": "c"}
    assert bm.largest_fitting(table, params, 20 * G) == {"plain": "b", "all": "c"}
    assert bm.largest_fitting(table, params, 90 * G) == {"plain": "c", "all": "c"}
    assert bm.largest_fitting(table, params, 1 * G) == {"plain": None, "all": None}


def test_accelerator_estimate_removes_what_remat_saves_but_one_block():
    cells = {"plain": {"total": 100, "saved": 60},
             "remat=full": {"total": 99, "saved": 20, "saved_plain": 60},
             "worse": {"total": 50, "saved": 30, "saved_plain": 10}}   # never added back
    est = bm.accelerator_estimate(cells, None, n_layers=4)
    assert est == {"plain": 100, "remat=full": 99 - 40 * 3 / 4, "worse": 50}
