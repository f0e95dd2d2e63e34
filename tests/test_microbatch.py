"""The memory features in every trainer: with micro_batches=k, model.remat and
model.logits_chunk on, a stage ends where the plain one does.

Each pair of runs starts from the same checkpoint and data and takes a few optimizer steps; the
parameters must agree to float32 summation-order error (the micro-batches hold different
numbers of real tokens, so a mean of micro-batch means would not: see accumulate.py; remat
recomputes the same values; chunked log-probs sum the same terms in another order).
"""

import jax
import numpy as np
import pytest

from _stages import tiny_sft_stage
from experiments import dpo as dpo_exp
from experiments import grpo as grpo_exp
from experiments import ppo as ppo_exp
from experiments import reward as reward_exp
from experiments import sft as sft_exp
from rlhf_jax import experiment
from rlhf_jax.errors import ConfigError
from rlhf_jax.trainers import accumulate, common, preference, reward, rl, sft


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny SFT stage (the other stages' init_from) and the shared data."""
    return tiny_sft_stage(tmp_path_factory.mktemp("micro"))


def _load(get_config, workdir, **overrides):
    return experiment.load_config(get_config, {
        "size": "smoke", "data.data_dir": str(workdir / "data"),
        **{k: str(v) for k, v in overrides.items()}})


def _max_difference(stage_a, stage_b, kind="policy") -> float:
    a, b = (jax.device_get(common.load_stage(s, kind=kind)[1]) for s in (stage_a, stage_b))
    return max(float(np.max(np.abs(x - y)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# Every memory option on at once (one more compile per trainer, not three).
MEMORY = {"model.remat": "dots", "model.logits_chunk": 8}


def _compare(train, get_config, workdir, name, k, tol, kind="policy", **overrides):
    """Trains a stage from the SFT stage plainly and with micro_batches=k and the memory
    options, each in its own workdir (some stages' directories are fixed); returns the largest
    parameter gap."""
    stages = [train(_load(get_config, workdir, micro_batches=m, init_from=workdir / "sft",
                          **(MEMORY if m > 1 else {}), **overrides), workdir / f"{name}_m{m}")
              for m in (1, k)]
    gap = _max_difference(*stages, kind=kind)
    print(f"{name}: micro_batches={k}, remat, logits_chunk vs plain: max |param difference| "
          f"{gap:.2e}")
    assert gap < tol, (name, gap)
    return gap


def test_split_keeps_the_pair_layout():
    batch = {"tokens": np.arange(8 * 3).reshape(8, 3), "valid": np.arange(4)}
    micro = jax.device_get(accumulate.split(batch, 2, rows=4))
    # Pairs 0-1 (chosen rows 0, 1; rejected rows 4, 5) and pairs 2-3.
    np.testing.assert_array_equal(micro["tokens"][0], batch["tokens"][[0, 1, 4, 5]])
    np.testing.assert_array_equal(micro["tokens"][1], batch["tokens"][[2, 3, 6, 7]])
    np.testing.assert_array_equal(micro["valid"], [[0, 1], [2, 3]])


def test_sft_micro_batches_equal_the_whole_batch(workdir):
    # 16 reviews of different lengths: the 4 micro-batches hold different token counts.
    _compare(sft.train, sft_exp.get_config, workdir, "sft", 4, 1e-6, steps=3, save_every=3,
             eval_batches=0)


def test_reward_model_micro_batches_equal_the_whole_batch(workdir):
    _compare(reward.train, reward_exp.get_config, workdir, "rm", 2, 1e-5, kind="reward",
             steps=3, eval_batches=1)


@pytest.mark.parametrize("loss,k,extra", [
    ("dpo(beta=0.2)", 4, {}),
    # A batch statistic (BCO's reward shift): computed once over the whole batch.
    ("bco_pair", 2, {}),
    # Unpaired rows with KTO's reference point from the whole batch's mismatched rows.
    ("kto(beta=0.2)", 2, {"data.split_pairs": True}),
])
def test_preference_micro_batches_equal_the_whole_batch(workdir, loss, k, extra):
    name = "pref_" + loss.split("(")[0]
    _compare(preference.train, dpo_exp.get_config, workdir, name, k, 1e-5, pref_loss=loss,
             steps=3, eval_batches=0, **{"gen.n_prompts": 0}, **extra)


@pytest.mark.parametrize("get_config,name", [
    (ppo_exp.get_config, "ppo"),                     # GAE with a critic, token_mean
    (grpo_exp.get_config, "grpo"),                   # group advantages, seq_mean_token_mean
])
def test_rl_micro_batches_equal_the_whole_minibatch(workdir, get_config, name):
    _compare(rl.train, get_config, workdir, name, 2, 1e-5, reward="gold",
             eval_every=0, steps=2)


def test_micro_batches_that_do_not_divide_the_batch_are_refused(workdir):
    config = _load(sft_exp.get_config, workdir, micro_batches=3)
    with pytest.raises(ConfigError, match=r"micro_batches=3 does not divide data.batch_size=16; "
                                          r"use one of \[1, 2, 4, 8, 16\]"):
        sft.validate(config)
    config = _load(dpo_exp.get_config, workdir, micro_batches=2, pref_loss="aot_pair")
    with pytest.raises(ConfigError, match="pairs rows across the whole batch"):
        preference.validate(config)
    config = _load(grpo_exp.get_config, workdir, micro_batches=2,
                   online_pref_loss="dpo(beta=0.1)", **{"ppo.minibatches": 1})
    with pytest.raises(ConfigError, match="set micro_batches=1"):
        rl.validate(config)


def test_the_mesh_line_says_the_shape_the_batch_split_and_the_rules():
    from rlhf_jax import sharding
    mesh = sharding.make_mesh((-1, 1, 1))
    line = common.mesh_line(mesh, {**sharding.DEFAULT_RULES, "embed": None}, 32)
    assert line.startswith("mesh data=1 fsdp=1 tensor=1 (1 device, 1 process); batch 32 = 32 "
                           "per data shard on (data, fsdp); rules vocab->tensor embed->- ")


def test_rollout_scoring_in_chunks_gives_the_same_numbers():
    from rlhf_jax import model, rewards, rollout
    from flax import nnx
    cfg = model.get_config("tiny")
    graphdef, params = nnx.split(model.build(cfg, seed=0))
    rng = np.random.default_rng(0)
    n, p, length = 8, 5, 6
    prompt = rng.integers(4, cfg.vocab_size, (n, p)).astype(np.int32)
    prompt_mask = (np.arange(p)[None] >= rng.integers(0, 3, n)[:, None]).astype(np.int32)
    completion = rng.integers(4, cfg.vocab_size, (n, length)).astype(np.int32)
    completion_mask = (np.arange(length)[None] < rng.integers(1, length + 1, n)[:, None])
    kw = dict(graphdef=graphdef, terms=rewards.parse("length_penalty(target=3)"),
              params={"policy": params, "ref": jax.tree.map(lambda x: x * 0.9, params)},
              prompt=prompt, prompt_mask=prompt_mask, completion=completion,
              completion_mask=completion_mask.astype(np.int32),
              sample_logps=np.zeros((n, length), np.float32), temperature=1.0, stop_ids=3,
              recompute=True)
    whole = jax.device_get(rollout.score(**kw))
    chunked = jax.device_get(rollout.score(**kw, chunks=4))
    assert set(whole) == set(chunked)
    for key in whole:
        np.testing.assert_allclose(np.asarray(chunked[key], np.float64),
                                   np.asarray(whole[key], np.float64), rtol=1e-6, atol=1e-6,
                                   err_msg=key)


# --- bfloat16 parameters with float32 optimizer state ------------------------------------------

def _optimizer(state_dtype):
    return common.make_optimizer(common.optim_config(lr=1e-2, warmup_steps=0,
                                                     weight_decay=0.1, state_dtype=state_dtype),
                                 total_steps=10)


def _tree(dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 2)
    return {"w": jax.random.normal(keys[0], (6, 5)).astype(dtype),
            "b": jax.random.normal(keys[1], (5,)).astype(dtype)}


def test_float32_state_is_plain_adam_on_float32_parameters():
    import optax
    runs = []
    for state_dtype in ("param", "float32"):
        opt = _optimizer(state_dtype)
        params = _tree(np.float32, 0)
        state = opt.init(params)
        for i in range(3):
            updates, state = opt.update(_tree(np.float32, i + 1), state, params)
            params = optax.apply_updates(params, updates)
        runs.append(params)
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
        np.testing.assert_array_equal(a, b)


def test_float32_state_with_bfloat16_parameters_rounds_a_float32_update_once():
    import jax.numpy as jnp
    import optax
    params, grads = _tree(jnp.bfloat16, 0), _tree(jnp.bfloat16, 1)
    opt = _optimizer("float32")
    state = opt.init(params)
    moments = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    assert moments and all(x.dtype == jnp.float32 for x in moments)
    updates, state = opt.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    # The same step in float32 from the same (bf16-valued) numbers, rounded once at the end.
    up = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
    plain = _optimizer("param")
    ref_updates, _ = plain.update(up(grads), plain.init(up(params)), up(params))
    want = jax.tree.map(lambda p, u: (p + u).astype(jnp.bfloat16), up(params), ref_updates)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # Today's default keeps Adam's moments in the parameters' dtype.
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(_optimizer("param").init(params))
               if x.ndim > 0)


def _saved_dtypes(stage_dir, item):
    import orbax.checkpoint as ocp
    step = max(int(p.name) for p in (stage_dir / "checkpoints").iterdir() if p.name.isdigit())
    meta = ocp.StandardCheckpointer().metadata(stage_dir / "checkpoints" / str(step) / item)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "dtype"))
    return [(tuple(x.shape), str(x.dtype)) for x in leaves]


def test_dpo_with_bfloat16_parameters_and_float32_state(workdir):
    """A stage loading a float32 checkpoint stores it in bfloat16 (model.param_dtype) and keeps
    Adam's moments in float32 (optim.state_dtype): the checkpoint holds bf16 parameters and
    float32 moments; the losses follow the float32 run's, and the update the parameters took
    (from their bf16-rounded start) points where the float32 run's does. Measured: losses
    within 2.0e-4, cosine of the two updates 0.9+."""
    import jax.numpy as jnp
    from rlhf_jax.metrics import read_metrics

    def run(name, **overrides):
        return preference.train(_load(dpo_exp.get_config, workdir, init_from=workdir / "sft",
                                      steps=3, eval_batches=0, **{"gen.n_prompts": 0},
                                      **overrides), workdir / name)
    plain = run("dpo_fp32")
    half = run("dpo_bf16", **{"model.param_dtype": "bfloat16", "optim.state_dtype": "float32"})
    params = _saved_dtypes(half, "params")
    assert params and {d for _, d in params} == {"bfloat16"}, params
    moments = [d for shape, d in _saved_dtypes(half, "train") if len(shape) > 1]
    assert moments and set(moments) == {"float32"}, moments
    losses = [[m["pref/loss"] for m in read_metrics(s)] for s in (plain, half)]
    loss_gap = float(np.max(np.abs(np.subtract(*losses))))
    flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float32))  # noqa: E731
                                     for x in jax.tree.leaves(jax.device_get(t))])
    start = common.load_stage(workdir / "sft")[1]
    step32 = flat(common.load_stage(plain)[1]) - flat(start)
    step16 = flat(common.load_stage(half)[1]) - flat(common.cast_params(start, jnp.bfloat16))
    cosine = float(step32 @ step16 / np.linalg.norm(step32) / np.linalg.norm(step16))
    print(f"DPO bf16 parameters + float32 state vs float32: losses within {loss_gap:.1e}, "
          f"cosine of the parameter updates {cosine:.3f}")
    assert len(losses[0]) == len(losses[1]) == 3 and loss_gap < 2e-3, losses
    assert cosine > 0.8, cosine
