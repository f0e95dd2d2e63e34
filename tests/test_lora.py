"""LoRA adapters (`lora` in every stage): zero-initialised adapters compute the base model
bitwise, adapters off is the base (the reference), merged weights give the adapter forward;
SFT, the reward model, DPO, GRPO and PPO train only adapters (and heads), checkpoint only them
and hand on merged weights W + A @ B * alpha / r (to the next stage and to tools.export_hf);
a LoRA stage resumes bitwise; bad specs are one-line config errors."""

import functools
import json
import math
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from _stages import crash_after_the_first_step, tiny_sft_stage
from experiments import dpo as dpo_exp
from experiments import ppo as ppo_exp
from experiments import reward as rm_exp
from experiments import sft as sft_exp
from rlhf_jax import checkpoint, experiment, hf, model, registry, sharding
from rlhf_jax.checkpoint import complete_steps
from rlhf_jax.errors import CheckpointError, ConfigError
from rlhf_jax.metrics import read_metrics
from rlhf_jax.trainers import common, preference, sft
from tools import export_hf

SPEC = "lora(rank=4, alpha=8)"


def _mesh():
    return sharding.make_mesh((-1, 1, 1)), sharding.DEFAULT_RULES


def _with_lora(cfg, spec=SPEC, kind="policy", seed=0):
    g, p = model.create(cfg, kind=kind)
    mesh, rules = _mesh()
    return (g, p) + common.add_adapters(g, p, cfg, ml_collections.ConfigDict({"lora": spec}),
                                        kind=kind, mesh=mesh, rules=rules, seed=seed)


@jax.jit
def _random_b(params, seed=1):
    key = jax.random.key(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: 0.05 * jax.random.normal(jax.random.fold_in(key, hash(str(path)) % 2**31),
                                                 x.shape, x.dtype)
        if model.path_names(path)[-1] == "lora_b" else x, params)


# Jitted with the graphdef static: one compile per model, not an op-by-op eager forward.
@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens):
    return model.apply(graphdef, params, tokens)[0]


@functools.partial(jax.jit, static_argnums=0)
def _logps(graphdef, params, tokens):
    mask = jnp.ones_like(tokens)
    return common.sequence_logps(graphdef, params, tokens, mask, mask)[0]


@functools.partial(jax.jit, static_argnums=0)
def _grads(graphdef, params, tokens):
    def f(q):
        if "head" in q:
            return jnp.sum(model.apply_reward(graphdef, q, tokens,
                                              mask_bt=jnp.ones_like(tokens)))
        return jnp.sum(model.apply(graphdef, q, tokens)[0] ** 2)
    return jax.grad(f)(params)


def _size(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_adapters_start_as_the_base_merge_exactly_and_switch_off_to_the_base():
    cfg = model.get_config("tiny")
    g, p, gl, pl, cl = _with_lora(cfg, "lora(rank=4, alpha=8, targets=('q', 'k', 'v', 'o', "
                                       "'mlp'))")
    assert cl.lora_projections == {"q", "k", "v", "o", "gate", "up", "down"}
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    base = _logits(g, p, tokens)
    # B = 0: the adapted model is the base model, bitwise.
    np.testing.assert_array_equal(_logits(gl, pl, tokens), base)
    # Trained (random) B: the merged plain weights give the adapter forward.
    trained = _random_b(pl)
    adapted = _logits(gl, trained, tokens)
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-3
    merged, plain = model.merge_adapters(trained, cl)
    assert plain == cfg
    mp = jax.tree.map(lambda x: x, p)
    from flax import nnx
    nnx.replace_by_pure_dict(mp, merged)
    np.testing.assert_allclose(_logits(g, mp, tokens), adapted, atol=1e-5, rtol=0)
    # Adapters off is the base model: the reference log-probs equal the base's exactly.
    off = model.adapters_off(trained)
    np.testing.assert_array_equal(_logits(gl, off, tokens), base)
    np.testing.assert_array_equal(_logps(gl, off, tokens), _logps(g, p, tokens))
    # The base leaves of `off` are the policy's own arrays (no second copy of the weights).
    for path, x in jax.tree_util.tree_leaves_with_path(off):
        if model.path_names(path)[-1] not in model.ADAPTER_KEYS:
            leaf = trained
            for n in model.path_names(path):
                leaf = leaf[n]
            assert x is leaf[...] or x is leaf
    # Gradients reach only the adapters; the optimizer state holds adapter-sized moments.
    grads = _grads(gl, trained, tokens)
    for path, x in jax.tree_util.tree_leaves_with_path(grads):
        if model.is_trainable(path):
            continue
        assert not np.any(np.asarray(x)), path
    assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(model.trainable_part(grads)))
    opt = common.make_optimizer(common.optim_config(), 10, lora=True)
    state = opt.init(pl)
    n_adapters = _size(model.trainable_part(pl))
    assert _size(state) <= 2 * n_adapters + 2
    assert _size(state) < 0.5 * _size(p)
    updates, _ = jax.jit(opt.update)(grads, state, trained)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        assert model.is_trainable(path) or not np.any(np.asarray(u))


def test_reward_and_value_models_train_their_heads_and_adapters():
    cfg = model.get_config("tiny_gpt2")          # gelu: "mlp" means up and down only
    g, p, gl, pl, cl = _with_lora(cfg, "lora(rank=2, alpha=2, targets=('v', 'mlp'))",
                                  kind="reward")
    assert cl.lora_projections == {"v", "up", "down"}
    part = model.trainable_part(pl)
    assert set(part) == {"backbone", "head"} and set(part["head"]) == {"kernel", "bias"}
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, cfg.vocab_size)
    reward = jax.jit(model.apply_reward, static_argnums=0)
    mask = jnp.ones_like(tokens)
    np.testing.assert_array_equal(reward(gl, pl, tokens, mask_bt=mask),
                                  reward(g, p, tokens, mask_bt=mask))
    grads = _grads(gl, pl, tokens)
    assert np.any(np.asarray(model.trainable_part(grads)["head"]["kernel"]))
    assert not np.any(np.asarray(grads["backbone"]["layers_0"]["mlp"]["up_proj"]["kernel"][...]))


@pytest.mark.parametrize("spec,message", [
    ("lora(rank=0)", "rank=0 must be an int >= 1"),
    ("lora(targets=('x',))", "must be one of 'q'"),
    ("lora(alpha=-1)", "alpha=-1 must be a number > 0"),
    ("lorax", "unknown adapter 'lorax'"),
])
def test_a_bad_lora_spec_is_one_line(spec, message):
    with pytest.raises(ConfigError) as e:
        experiment.load_config(sft_exp.get_config, {"size": "smoke", "lora": spec,
                                                    "init_from": "x"})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_lora_on_a_projection_the_model_lacks_or_without_a_base_is_one_line():
    with pytest.raises(ConfigError) as e:
        _with_lora(model.get_config("tiny_gpt2"), "lora(targets=('gate',))")
    assert "has no gate_proj" in str(e.value) and "\n" not in str(e.value)
    config = experiment.load_config(sft_exp.get_config, {"size": "smoke", "lora": SPEC})
    with pytest.raises(ConfigError, match="set init_from") as e:
        sft.validate(config)
    assert "\n" not in str(e.value)
    assert registry.get("adapter", SPEC)() == {"lora_rank": 4, "lora_alpha": 8.0,
                                               "lora_targets": ("q", "k", "v", "o", "mlp")}


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A workdir with a tiny SFT stage: the frozen base of every LoRA stage here."""
    return tiny_sft_stage(tmp_path_factory.mktemp("lora"))


def _cfg(exp, root, **overrides):
    return experiment.load_config(exp.get_config, {
        "size": "smoke", "data.data_dir": str(root / "data"),
        **{k: str(v) for k, v in overrides.items()}})


def _saved_keys(stage, item):
    """The key paths of the arrays a stage's latest checkpoint holds in `item`, with shapes."""
    step = complete_steps(stage)[-1]
    tree = json.loads((stage / "checkpoints" / str(step) / item / "_METADATA").read_text())
    return {tuple(k["key"] for k in v["key_metadata"]): v["value_metadata"].get("write_shape")
            for v in tree["tree_metadata"].values()
            if v["value_metadata"]["value_type"] != "None"}


def _adapters(stage):
    """(LoRA ModelConfig, the saved trainable part) of a stage's latest checkpoint."""
    mesh, rules = _mesh()
    with checkpoint.Checkpointer(stage) as ckpt:
        meta = ckpt.restore_meta()
        cfg = model.ModelConfig(**meta["model"])
        _, target = common.init_model(cfg, kind=meta["model_kind"], mesh=mesh, rules=rules,
                                      seed=0, abstract_only=True)
        part = ckpt.restore(params=model.trainable_part(target))[0]
    return cfg, part


def _check_lora_stage(stage, base_stage, *, kind="policy", train_models=()):
    """The checkpoint holds adapters (and heads) only, and the stage loads as the base with
    W + A @ B * alpha / r in every adapted kernel, every other base leaf bitwise unchanged."""
    keys = _saved_keys(stage, "params")
    assert keys and all(any(n in k for n in ("lora_a", "lora_b", "head")) for k in keys), keys
    train = _saved_keys(stage, "train")
    n_trained = sum(math.prod(s or ()) for s in keys.values())
    for name in train_models:        # a model kept in the train state (RL's critic)
        sub = {k: s for k, s in train.items() if k[0] == name}
        assert sub and all(any(n in k for n in ("lora_a", "lora_b", "head")) for k in sub)
        n_trained += sum(math.prod(s or ()) for s in sub.values())
    # The optimizer state: AdamW's two moments of the trained leaves, and step counts.
    opt = sum(math.prod(s or ()) for k, s in train.items() if k[0] == "opt")
    assert opt <= 2 * n_trained + 8
    cfg, part = _adapters(stage)
    _, merged, plain, _, meta = common.load_stage(stage, kind=kind)
    _, plain_base, _, _, _ = common.load_stage(base_stage, kind=kind, new_head=True)
    assert plain.lora_rank == 0 and not model.has_adapters(merged)
    assert meta["lora_base"]["path"] == str(base_stage.absolute())
    merged, plain_base = nnx_dict(merged), nnx_dict(plain_base)
    scale = cfg.lora_alpha / cfg.lora_rank
    moved = 0.0

    def walk(m, b, a, path):
        nonlocal moved
        for k in m:
            if isinstance(m[k], dict):
                walk(m[k], b[k], (a or {}).get(k), path + (k,))
            elif a is not None and "lora_a" in a and k == "kernel":
                delta = np.tensordot(np.asarray(a["lora_a"]), np.asarray(a["lora_b"]), axes=1)
                moved = max(moved, float(np.max(np.abs(delta))))
                np.testing.assert_allclose(m[k], np.asarray(b[k]) + scale * delta, atol=1e-6,
                                           rtol=0, err_msg=str(path))
            elif "head" not in path:
                np.testing.assert_array_equal(m[k], b[k], err_msg=str(path + (k,)))

    walk(merged, plain_base, part, ())
    assert moved > 0          # the adapters trained
    return merged


def nnx_dict(params):
    from flax import nnx
    return jax.tree.map(np.asarray, nnx.to_pure_dict(params))


@pytest.fixture(scope="module")
def sft_lora(base):
    config = _cfg(sft_exp, base, steps=3, save_every=3, eval_batches=1,
                  init_from=base / "sft", lora=SPEC)
    return config, sft.train(config, base / "sft_lora")


def test_sft_trains_and_checkpoints_only_adapters_and_hands_on_merged_weights(base, sft_lora):
    _, stage = sft_lora
    assert all(math.isfinite(v) for row in read_metrics(stage) for v in row.values())
    _check_lora_stage(stage, base / "sft")


def test_an_interrupted_lora_stage_resumes_bitwise(base, sft_lora, monkeypatch):
    config, straight = sft_lora
    config = ml_collections.ConfigDict(config.to_dict())
    config.save_every = 1
    workdir = base / "sft_lora_resumed"
    crash_after_the_first_step(sft.train, config, workdir, monkeypatch)
    assert complete_steps(workdir / "sft") == [1]
    resumed = sft.train(config, workdir)
    (_, a), (_, b) = _adapters(straight), _adapters(resumed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_a_lora_stage_whose_base_now_holds_other_weights_is_refused(base, sft_lora, tmp_path):
    shutil.copytree(base / "sft", tmp_path / "sft")
    config = _cfg(sft_exp, base, steps=1, save_every=1, eval_batches=0,
                  init_from=tmp_path / "sft", lora=SPEC)
    stage = sft.train(config, tmp_path / "l")
    common.load_stage(stage)
    shutil.rmtree(tmp_path / "sft")      # another checkpoint where the base was
    shutil.copytree(sft_lora[1], tmp_path / "sft")
    with pytest.raises(CheckpointError, match="holds LoRA adapters of") as e:
        common.load_stage(stage)
    assert "\n" not in str(e.value)


def test_dpo_reference_is_the_base_and_export_merges(base, tmp_path):
    config = _cfg(dpo_exp, base, stage="dpo_lora", steps=3, save_every=3, log_every=1,
                  lora=SPEC, **{"gen.n_prompts": 8, "gen.batch_size": 8})
    stage = dpo_exp.main(config, base)
    rows = read_metrics(stage)
    # The first step's loss is taken before any update: policy == reference (adapters off),
    # so every implicit reward is exactly 0.
    assert rows[0]["step"] == 1 and rows[0]["dpo/margin"] == 0.0
    assert rows[-1]["dpo/margin"] != 0.0 and math.isfinite(rows[-1]["gold/reward"])
    merged = _check_lora_stage(stage, base / "sft")
    out = tmp_path / "hf"
    export_hf.export(str(stage), str(out))
    _, exported, _, _ = hf.load(out, dtype="float32")
    exported = nnx_dict(exported)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(exported)):
        np.testing.assert_array_equal(x, y)


def test_ppo_trains_adapters_on_the_policy_and_the_critic(base):
    """PPO (with GAE: a critic) on the gold reward; GRPO, RLOO, ... share this trainer and its
    LoRA path, minus the critic."""
    ppo = ppo_exp.main(_cfg(ppo_exp, base, stage="ppo_lora", reward="gold", eval_every=2,
                            steps=2, save_every=2, log_every=1, lora=SPEC), base)
    rows = read_metrics(ppo)
    # Step 0's evaluation samples the policy before any update: it is the reference (the
    # sampler's and the scorer's log-probs differ only by rounding).
    assert rows[0]["step"] == 0 and abs(rows[0]["eval/objective/kl"]) < 1e-5
    assert math.isfinite(rows[-1]["eval/objective/kl"])
    _check_lora_stage(ppo, base / "sft", train_models=("value",))


def test_reward_model_trains_adapters_and_its_head(base):
    config = _cfg(rm_exp, base, steps=3, save_every=3, lora=SPEC, init_from=base / "sft")
    stage = rm_exp.main(config, base / "rm_lora")
    merged = _check_lora_stage(stage, base / "sft", kind="reward")
    # The loaded reward model has the trained, normalised head (the last checkpoint's).
    _, part = _adapters(stage)
    for k in ("kernel", "bias"):
        np.testing.assert_array_equal(merged["head"][k], np.asarray(part["head"][k]))
    final = read_metrics(stage)[-1]
    assert math.isfinite(final["rm/eval_accuracy"]) and abs(final["rm/norm_mean_after"]) < 1e-4


def test_lora_with_micro_batches_and_float32_state_ends_where_plain_lora_does(base):
    """The memory options combine with LoRA: micro_batches=2, remat and float32 optimizer
    state (Adam exactly, on float32 weights) give the plain LoRA run's adapters."""
    runs = [preference.train(_cfg(dpo_exp, base, stage=f"dpo_lora_m{m}", steps=3, save_every=3,
                                  eval_batches=0, lora=SPEC, init_from=base / "sft",
                                  micro_batches=m, **{"gen.n_prompts": 0}, **extra),
                             base / f"dpo_lora_m{m}")
            for m, extra in ((1, {}), (2, {"model.remat": "dots",
                                          "optim.state_dtype": "float32"}))]
    a, b = (jax.tree.map(np.asarray, _adapters(s)[1]) for s in runs)
    gap = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                            jax.tree.leaves(b)))
    print(f"LoRA DPO, micro_batches=2 + remat + float32 state vs plain: max |adapter "
          f"difference| {gap:.1e}")
    assert jax.tree.structure(a) == jax.tree.structure(b) and 0 <= gap < 1e-6, gap
    trained = max(float(np.max(np.abs(x))) for path, x in
                  jax.tree_util.tree_leaves_with_path(a) if "lora_b" in jax.tree_util.keystr(path))
    assert trained > 1e-4, trained          # B starts at zero: the adapters did train


def test_a_bfloat16_lora_stage_loads_and_hands_on_in_bfloat16(base):
    """LoRA with bf16 parameters (model.param_dtype) on a float32 SFT stage: the stage loads
    merged in bf16, as its config says (its base read in the dtype it trained on), and a stage
    started from it trains and loads back."""
    lora_stage = preference.train(_cfg(
        dpo_exp, base, stage="dpo_lora_bf16", steps=2, save_every=2, eval_batches=0,
        lora=SPEC, init_from=base / "sft", **{"gen.n_prompts": 0,
                                              "model.param_dtype": "bfloat16",
                                              "optim.state_dtype": "float32"}),
        base / "dpo_lora_bf16")
    _, params, cfg, _, _ = common.load_stage(lora_stage)
    assert cfg.param_dtype == "bfloat16" and cfg.lora_rank == 0
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
    after = preference.train(_cfg(dpo_exp, base, stage="dpo_after_bf16", steps=1, save_every=1,
                                  eval_batches=0, init_from=lora_stage,
                                  **{"gen.n_prompts": 0}), base / "dpo_after_bf16")
    _, params, cfg, _, _ = common.load_stage(after)
    assert cfg.param_dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
