"""Hugging Face checkpoints in and out (rlhf_jax/hf.py) against `transformers` itself.

Every family is built small and random from its transformers config class (GQA, a head_dim
that is not d_model / n_heads where the family allows it, Gemma sequences longer than the
sliding window), saved with `save_pretrained` and compared: logits of a left-padded batch,
greedy KV-cache generation, the sequence-classification (reward) head, export back to
transformers, import -> export -> import bitwise, sharded and bf16 checkpoints, and the
errors a broken directory gets. Nothing is downloaded.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax import hf, model as M, sampling  # noqa: E402
from rlhf_jax.errors import CheckpointError, ConfigError  # noqa: E402

V = 96
TOL = 1e-4        # fp32 logit parity
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def family_configs():
    """model_type -> transformers config; each exercises the family's own options."""
    T = transformers
    return {
        "gpt2": T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2),
        # Llama 3.1-style rope scaling, with a short original context so it bites here.
        "llama": T.LlamaConfig(**COMMON, head_dim=16, tie_word_embeddings=False,
                               rope_parameters=dict(rope_type="llama3", rope_theta=500000.0,
                                                    factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0,
                                                    original_max_position_embeddings=16)),
        "qwen2": T.Qwen2Config(**COMMON, tie_word_embeddings=True,
                               rope_parameters=dict(rope_type="default", rope_theta=1e6)),
        "qwen3": T.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False),
        "gemma2": T.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=24,
                                 sliding_window=4, attn_logit_softcapping=5.0,
                                 final_logit_softcapping=3.0),
        "gemma3_text": T.Gemma3TextConfig(
            **COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0,
                                                    rope_theta=1e6),
                             "sliding_attention": dict(rope_type="default", rope_theta=1e4)}),
    }


FAMILIES = list(family_configs())


def _randomise(module, seed):
    """Weights ~ N(0, 0.2): large enough that every norm scale, bias and soft-cap matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    return module.eval()


def build(family, directory, *, kind="policy", seed=0, dtype=None, **save_kw):
    cfg = family_configs()[family]
    cfg._attn_implementation = "eager"
    auto = (transformers.AutoModelForCausalLM if kind == "policy"
            else transformers.AutoModelForSequenceClassification)
    if kind == "reward":
        cfg.num_labels = 1
    m = _randomise(auto.from_config(cfg), seed)
    if dtype is not None:
        m = m.to(dtype)
    m.save_pretrained(directory, **save_kw)
    return m


def batch(t=12, pad=3, seed=0):
    """Two rows of t tokens, the second left-padded by `pad` (ids 3.. avoid pad/bos/eos)."""
    ids = np.random.default_rng(seed).integers(3, V, (2, t))
    mask = np.ones((2, t), np.int64)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def hf_logits(m, ids, mask):
    pos = np.maximum(mask.cumsum(-1) - 1, 0)     # as transformers' generate places them
    with torch.no_grad():
        out = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (directory, transformers model), built once."""
    root = tmp_path_factory.mktemp("hf")
    return {f: (root / f, build(f, root / f)) for f in FAMILIES}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return {f: hf.load(d, tokenizer=False) for f, (d, _) in checkpoints.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, checkpoints, loaded):
    _, m = checkpoints[family]
    graphdef, params, cfg, _ = loaded[family]
    assert cfg.family == family
    ids, mask = batch()
    ours = np.asarray(M.apply(graphdef, params, jnp.asarray(ids), mask_bt=jnp.asarray(mask))[0])
    ref = hf_logits(m, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ref[real]).max() > 0.5                   # not a vacuous comparison
    # docs/model.md quotes these (pytest tests/test_hf.py -k logits_match -s prints them).
    print(f"\n{family}: max |logit difference| {np.abs(ours - ref)[real].max():.1e}")
    np.testing.assert_allclose(ours[real], ref[real], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family, checkpoints, loaded):
    """KV-cache decoding past the sliding window (Gemma: window 4, 6 + 8 tokens)."""
    _, m = checkpoints[family]
    graphdef, params, _, _ = loaded[family]
    ids, mask = batch(t=6, pad=2, seed=1)
    with torch.no_grad():
        ref = m.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         max_new_tokens=8, min_new_tokens=8, do_sample=False,
                         pad_token_id=0, eos_token_id=None).numpy()[:, 6:]
    tokens, _, _ = sampling.generate((graphdef, params), jnp.asarray(ids), jnp.asarray(mask),
                                     jax.random.key(0), max_new_tokens=8, temperature=0.0,
                                     eos_id=-1, pad_id=0)
    np.testing.assert_array_equal(np.asarray(tokens), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_and_reimports_bitwise(family, loaded, tmp_path):
    graphdef, params, cfg, _ = loaded[family]
    out = hf.save(tmp_path / "out", params, cfg, _TinyTokenizer(), write_tokenizer=False)
    m2 = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    ids, mask = batch(seed=2)
    ours = np.asarray(M.apply(graphdef, params, jnp.asarray(ids), mask_bt=jnp.asarray(mask))[0])
    real = mask.astype(bool)
    np.testing.assert_allclose(hf_logits(m2.eval(), ids, mask)[real], ours[real], atol=TOL,
                               rtol=0)
    _, params2, cfg2, _ = hf.load(out, tokenizer=False)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _TinyTokenizer:
    """Special ids for config.json when the test writes no tokenizer files."""
    bos_id, eos_id, pad_id, stop_ids = 1, 2, 0, (2,)


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma3_text"])
def test_reward_head_matches_sequence_classification(family, tmp_path):
    m = build(family, tmp_path / "rm", kind="reward", seed=3)
    graphdef, params, cfg, _ = hf.load(tmp_path / "rm", kind="reward", tokenizer=False)
    ids, mask = batch(seed=4)
    with torch.no_grad():
        ref = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))).logits
    ours = M.apply_reward(graphdef, params, jnp.asarray(ids), mask_bt=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(ours), ref[:, 0].numpy(), atol=TOL, rtol=0)
    # ... and back: a reward model exports as a one-label classifier with the same scores.
    out = hf.save(tmp_path / "rm_out", params, cfg, _TinyTokenizer(), kind="reward",
                  write_tokenizer=False)
    m2 = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        again = m2(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))).logits
    np.testing.assert_allclose(again[:, 0].numpy(), ref[:, 0].numpy(), atol=TOL, rtol=0)


def test_causal_lm_as_reward_model_gets_a_fresh_head(checkpoints):
    directory, _ = checkpoints["llama"]
    _, params, cfg, _ = hf.load(directory, kind="reward", tokenizer=False, seed=5)
    kernel = np.asarray(params["head"]["kernel"][...])
    assert kernel.shape == (cfg.d_model,) and np.std(kernel) > 0
    assert float(params["head"]["bias"][...]) == 0.0


def test_reward_bias_is_refused_unless_dropped(loaded, tmp_path):
    cfg = loaded["qwen2"][2]
    rm = M.build(cfg, kind="reward")
    from flax import nnx
    rm_params = nnx.state(rm)
    rm_params["head"]["bias"][...] = jnp.float32(0.5)
    with pytest.raises(ConfigError, match="drop_head_bias"):
        hf.save(tmp_path / "rm", rm_params, cfg, _TinyTokenizer(), kind="reward",
                write_tokenizer=False)
    hf.save(tmp_path / "rm", rm_params, cfg, _TinyTokenizer(), kind="reward",
            write_tokenizer=False, drop_head_bias=True)
    assert (tmp_path / "rm" / "model.safetensors").is_file()


def test_sharded_and_bf16_checkpoints(checkpoints, loaded, tmp_path):
    _, m = checkpoints["qwen3"]
    m.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    assert (tmp_path / "sharded" / hf.INDEX).is_file()
    _, params, _, _ = hf.load(tmp_path / "sharded", tokenizer=False)
    for a, b in zip(jax.tree.leaves(loaded["qwen3"][1]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    shard = sorted((tmp_path / "sharded").glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: missing \\(listed in "
                                              "model.safetensors.index.json"):
        hf.load(tmp_path / "sharded", tokenizer=False)

    m.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    m.to(torch.float32)
    _, params, cfg, _ = hf.load(tmp_path / "bf16", tokenizer=False)
    assert cfg.param_dtype == "bfloat16" and cfg.dtype == "bfloat16"
    leaves = jax.tree.leaves(params)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    want = m.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"][...], np.float32),
                                  want)
    # ... and asked for as float32, the same values widened.
    _, params32, _, _ = hf.load(tmp_path / "bf16", tokenizer=False, dtype="float32")
    np.testing.assert_array_equal(np.asarray(params32["embed"]["embedding"][...]), want)

    # Our own writer shards too, and reads back bitwise.
    graphdef, p, cfg, _ = loaded["qwen3"]
    hf.save(tmp_path / "ours", p, cfg, _TinyTokenizer(), write_tokenizer=False,
            max_shard_bytes=30_000)
    assert (tmp_path / "ours" / hf.INDEX).is_file()
    _, back, _, _ = hf.load(tmp_path / "ours", tokenizer=False)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_onto_a_mesh_with_logical_shardings(loaded, checkpoints):
    from rlhf_jax import sharding
    mesh = sharding.make_mesh((-1, 1, 1))
    _, params, _, _ = hf.load(checkpoints["llama"][0], tokenizer=False, mesh=mesh)
    q = params["layers_0"]["attn"]["q_proj"]["kernel"][...]
    assert isinstance(q.sharding, jax.sharding.NamedSharding) and q.sharding.mesh == mesh


# ----------------------------------------------------------------------------------------------
# Failing well: a broken directory gets one line naming the file
# ----------------------------------------------------------------------------------------------


def _copy(checkpoints, family, tmp_path):
    d = tmp_path / family
    shutil.copytree(checkpoints[family][0], d)
    return d


def test_missing_config_and_weights(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        hf.load(tmp_path / "nowhere", tokenizer=False)
    d = _copy(checkpoints, "llama", tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        hf.load(d, tokenizer=False)
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json: missing"):
        hf.load(d, tokenizer=False)


def test_unsupported_architecture(checkpoints, tmp_path):
    d = _copy(checkpoints, "llama", tmp_path)
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "model_type": "mixtral"}))
    with pytest.raises(ConfigError, match=r"model_type 'mixtral' is not supported; supported"):
        hf.load(d, tokenizer=False)
    (d / "config.json").write_text(json.dumps({**c, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}))
    with pytest.raises(ConfigError, match="rope scaling 'yarn'"):
        hf.load(d, tokenizer=False)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not readable JSON"):
        hf.load(d, tokenizer=False)


def test_shape_mismatch_and_damaged_weights(checkpoints, tmp_path):
    d = _copy(checkpoints, "qwen2", tmp_path)
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight' has shape \(48, 32\)"):
        hf.load(d, tokenizer=False)
    (d / "config.json").write_text(json.dumps(c))
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
        hf.load(d, tokenizer=False)


def test_policy_from_a_classifier_checkpoint_is_refused(tmp_path):
    build("qwen3", tmp_path / "rm", kind="reward")
    with pytest.raises(CheckpointError, match="kind='reward'"):
        hf.load(tmp_path / "rm", tokenizer=False)


_MESH_WORKER = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from rlhf_jax import hf, model as M, sharding
directory, ids, mask = sys.argv[1], np.array(json.loads(sys.argv[2])), np.array(json.loads(sys.argv[3]))
out = {}
for shape in [(8, 1, 1), (2, 2, 2), (1, 4, 2)]:
    mesh = sharding.make_mesh(shape)
    graphdef, params, _, _ = hf.load(directory, tokenizer=False, mesh=mesh)
    q = params["layers_0"]["attn"]["q_proj"]["kernel"][...]
    gate = params["layers_0"]["mlp"]["gate_proj"]["kernel"][...]
    logits = M.apply(graphdef, params, jnp.asarray(ids), mask_bt=jnp.asarray(mask))[0]
    out[str(shape)] = {"q": str(q.sharding.spec), "gate": str(gate.sharding.spec),
                       "shards": len(gate.addressable_shards), "logits": np.asarray(logits).tolist()}
print(json.dumps(out))
"""


def test_load_straight_onto_an_8_device_mesh(checkpoints, loaded):
    """Each tensor lands with its logical-axis sharding (fsdp on embed, tensor on heads and
    mlp) on meshes of 8 simulated devices, and the logits equal the one-device load's."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ids, mask = batch(seed=6)
    proc = subprocess.run([sys.executable, "-c", _MESH_WORKER, str(checkpoints["llama"][0]),
                           json.dumps(ids.tolist()), json.dumps(mask.tolist())],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    graphdef, params, _, _ = loaded["llama"]
    ref = np.asarray(M.apply(graphdef, params, jnp.asarray(ids), mask_bt=jnp.asarray(mask))[0])
    real = mask.astype(bool)
    for shape, r in out.items():
        np.testing.assert_allclose(np.asarray(r["logits"])[real], ref[real], atol=1e-5, rtol=0)
    assert out["(2, 2, 2)"]["gate"] == "P('fsdp', 'tensor')"
    assert out["(1, 4, 2)"]["q"] == "P('fsdp', 'tensor', None)"
    assert out["(8, 1, 1)"]["gate"] == "P(None, None)"     # replicated


def test_older_config_spellings_read_the_same(checkpoints):
    """Checkpoints on the hub written by older transformers spell rope and layer types
    differently (top-level rope_theta / rope_scaling, rope_local_base_freq,
    sliding_window_pattern); they map onto the same ModelConfig."""
    new = json.loads((checkpoints["gemma3_text"][0] / "config.json").read_text())
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 2.0},
               rope_local_base_freq=1e4, sliding_window_pattern=3)
    assert hf.model_config_from_hf(old) == hf.model_config_from_hf(new)
    new = json.loads((checkpoints["llama"][0] / "config.json").read_text())
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rope_theta=500000.0, rope_scaling=dict(
        new["rope_parameters"], rope_type="llama3"))
    del old["rope_scaling"]["rope_theta"]
    assert hf.model_config_from_hf(old) == hf.model_config_from_hf(new)


def test_models_trained_here_export_as_the_family_they_match():
    assert hf.family_of(M.get_config("tiny")) == "llama"
    assert hf.family_of(M.get_config("tiny_gpt2")) == "gpt2"
    assert hf.family_of(M.get_config("tiny", qkv_bias=True)) == "qwen2"
    with pytest.raises(ConfigError, match="match no Hugging Face family"):
        hf.family_of(M.get_config("tiny", post_norms=True))


def test_config_reader_follows_transformers_on_edge_cases(checkpoints):
    """Explicit nulls, options transformers ignores, fallbacks it applies, and the options it
    has that this model does not (refused, naming the file)."""
    gemma2 = json.loads((checkpoints["gemma2"][0] / "config.json").read_text())
    cfg = hf.model_config_from_hf({**gemma2, "attn_logit_softcapping": None,
                                   "final_logit_softcapping": None})
    assert cfg.attn_softcap == 0 and cfg.final_softcap == 0      # null is off, not the default
    assert hf.model_config_from_hf({**gemma2, "sliding_window_pattern": 6}).layer_types == (
        "sliding", "full", "sliding")                              # Gemma 2 always alternates
    gemma3 = json.loads((checkpoints["gemma3_text"][0] / "config.json").read_text())
    assert hf.model_config_from_hf({**gemma3, "attn_logit_softcapping": 20.0}).attn_softcap == 0
    llama = json.loads((checkpoints["llama"][0] / "config.json").read_text())
    rope = {k: v for k, v in llama["rope_parameters"].items()
            if k != "original_max_position_embeddings"}
    assert hf.model_config_from_hf({**llama, "rope_parameters": rope}).rope_original_max_len == 64
    qwen3 = json.loads((checkpoints["qwen3"][0] / "config.json").read_text())
    gpt2 = json.loads((checkpoints["gpt2"][0] / "config.json").read_text())
    for bad, match in [({**qwen3, "use_sliding_window": True}, "use_sliding_window"),
                       ({**gemma2, "use_bidirectional_attention": True}, "bidirectional"),
                       ({**gpt2, "scale_attn_weights": False}, "scale_attn_weights"),
                       ({**llama, "num_attention_heads": 0}, "n_heads=0"),
                       ({**llama, "mlp_bias": True}, "mlp_bias")]:
        with pytest.raises(ConfigError, match=match):
            hf.model_config_from_hf(bad, path="x/config.json")
    assert not hf.is_hf_dir("")            # the default init_from, never the current directory


def test_export_writes_both_config_spellings(loaded, tmp_path):
    _, params, cfg, _ = loaded["llama"]
    hf.save(tmp_path, params, cfg, _TinyTokenizer(), write_tokenizer=False)
    c = json.loads((tmp_path / "config.json").read_text())
    assert c["rope_theta"] == 500000.0 and c["rope_scaling"]["rope_type"] == "llama3"
    assert c["torch_dtype"] == c["dtype"] == "float32"


def test_a_safetensors_header_that_is_not_an_object(checkpoints, tmp_path):
    d = _copy(checkpoints, "gpt2", tmp_path)
    header = b"[]      "
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match="header is a JSON list"):
        hf.load(d, tokenizer=False)
