"""The model's memory options (ModelConfig.remat, logits_chunk, attention) compute what the
plain path computes, and save what they claim to (docs/model.md, "Memory options").

Run with -s to see the measured memory figures."""

import dataclasses
import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import hf, model as M, rollout, schema
from rlhf_jax.errors import ConfigError
from rlhf_jax.trainers import common, fields

SMALL = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_len=64)


def _family(name, **options):
    """A tiny ModelConfig with the options `hf.FAMILIES[name]` fixes (as tests/test_hf.py's)."""
    return M.ModelConfig(**{**SMALL, **hf.FAMILIES[name].options, **options}, family=name)


CONFIGS = {
    # Untied unembedding, q/k norms, one kv head (MQA).
    "qwen3_mqa": _family("qwen3", head_dim=16, n_kv_heads=1, n_layers=1),
    # Tied, GQA, a sliding-window layer and a full one, Gemma's norms and query scale.
    "gemma3": _family("gemma3_text", head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                      layer_types=("sliding", "full"), rope_local_theta=1e4),
}
# Gemma 2's soft-caps (attention and final logits) on the Gemma 3 weights: no parameters.
SOFTCAPS = dict(attn_softcap=5.0, final_softcap=3.0)

B, T = 3, 12
TOKENS = jax.random.randint(jax.random.key(0), (B, T), 3, 64)
# Row 0 full, row 1 left-padded (a prompt), row 2 right-padded (an early EOS).
MASK = jnp.ones((B, T), bool).at[1, :4].set(False).at[2, 9:].set(False)


@functools.lru_cache(maxsize=None)
def _params(name):
    return jax.jit(lambda: M.create(CONFIGS[name], seed=0)[1])()   # compiled: faster than eager


def _graphdef(cfg):
    return nnx.split(nnx.eval_shape(lambda: M.build(cfg)))[0]


@functools.lru_cache(maxsize=None)
def _forward_and_grads(cfg):
    """(logits, gradients of a masked mean-square of the logits) of `cfg`'s model at TOKENS."""
    graphdef = _graphdef(cfg)
    base = dataclasses.replace(cfg, **M.RUNTIME_DEFAULTS)
    name = next(k for k, c in CONFIGS.items() if c == base)

    def loss(p):
        logits, _ = M.apply(graphdef, p, TOKENS, mask_bt=MASK)
        return jnp.mean(jnp.where(MASK[..., None], logits, 0.0) ** 2), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(_params(name))
    return logits, grads


def _tree_close(a, b, *, rtol, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------------------------
# Config surface
# ----------------------------------------------------------------------------------------------


def test_runtime_fields_validate_and_default_to_the_plain_path():
    assert M.RUNTIME_DEFAULTS == {"remat": "none", "logits_chunk": 0, "attention": "einsum"}
    for bad, match in (({"remat": "some"}, "remat="), ({"attention": "flash"}, "attention="),
                       ({"logits_chunk": -1}, "logits_chunk=")):
        with pytest.raises(ConfigError, match=match):
            M.ModelConfig(**bad)
    # The SFT model schema declares them with the same choices.
    for key, good, bad in (("remat", "dots", "some"), ("attention", "dot_product", "flash"),
                           ("logits_chunk", 128, -1)):
        schema.check({key: good}, fields.MODEL)
        with pytest.raises(ConfigError, match=key):
            schema.check({key: bad}, fields.MODEL)


def test_old_meta_and_hf_export_ignore_runtime_fields():
    cfg = CONFIGS["gemma3"].replace(remat="full", logits_chunk=8, attention="dot_product")
    old_meta = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in M.RUNTIME_FIELDS}
    rebuilt = M.ModelConfig(**{**M.RUNTIME_DEFAULTS, **old_meta})   # as common.load_stage
    assert rebuilt == cfg.replace(**M.RUNTIME_DEFAULTS)
    # A resumed stage whose saved config predates the keys sees their neutral values.
    assert all(common.ADDED_KEYS[f"model.{k}"] == v for k, v in M.RUNTIME_DEFAULTS.items())
    tok = types.SimpleNamespace(bos_id=1, pad_id=0, eos_id=2)
    assert hf.hf_config(cfg, tok) == hf.hf_config(cfg.replace(**M.RUNTIME_DEFAULTS), tok)
    assert not set(M.RUNTIME_FIELDS) & set(hf.hf_config(cfg, tok))


# ----------------------------------------------------------------------------------------------
# Rematerialisation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,remat", [("gemma3", "full"), ("qwen3_mqa", "dots")])
def test_remat_gives_the_plain_values_and_gradients(name, remat):
    logits0, grads0 = _forward_and_grads(CONFIGS[name])
    logits1, grads1 = _forward_and_grads(CONFIGS[name].replace(remat=remat))
    # The forward runs the same operations: identical. The backward recomputes them inside
    # another fusion, which may round differently in the last bit.
    np.testing.assert_array_equal(logits1, logits0)
    _tree_close(grads1, grads0, rtol=1e-5, atol=1e-6)


def test_remat_keeps_less_for_the_backward_pass():
    """What the backward pass keeps (the vjp's residuals, from shapes alone): 'full' keeps
    each block's input, 'dots' also the projections' outputs, 'none' everything."""
    b, t = 4, 128
    kept = {}
    for remat in ("none", "dots", "full"):
        cfg = M.get_config("tiny", d_model=64, d_ff=256, n_layers=4, max_len=t, remat=remat)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: M.build(cfg)))
        tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)

        def loss(p, tokens):
            return -M.target_logprobs(graphdef, p, tokens, tokens[:, 1:], None)[0].sum()

        residuals = jax.eval_shape(lambda p, x: jax.vjp(lambda p: loss(p, x), p)[1],
                                   abstract, tokens)
        kept[remat] = sum(math.prod(r.shape) * r.dtype.itemsize
                          for r in jax.tree.leaves(residuals))
    print(f"\nvjp residuals, tiny d_model=64 x 4 layers, B={b} T={t}: "
          + ", ".join(f"remat={k} {v / 2**20:.1f} MiB" for k, v in kept.items()))
    assert kept["full"] < kept["dots"] < kept["none"]
    assert kept["full"] < kept["none"] / 4


# ----------------------------------------------------------------------------------------------
# Chunked log-probs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied,softcap,chunk,temperature", [
    (False, 0.0, 4, 1.0),     # divides the 12 positions
    (True, 3.0, 5, 0.7),      # does not (the last chunk is padded); final_softcap (Gemma 2)
    (False, 3.0, 64, 0.7),    # one chunk, larger than the sequence
])
def test_chunked_logprobs_give_the_unchunked_values_and_gradients(tied, softcap, chunk,
                                                                  temperature):
    """`chunked_logprobs` against the whole [B, L, V] logits through `token_logprobs` and
    `entropy`: values and the gradients in the hidden states and the unembedding."""
    b, n, d, v = 3, 12, 8, 40
    keys = jax.random.split(jax.random.key(3), 3)
    hidden = jax.random.normal(keys[0], (b, n, d))
    weight = jax.random.normal(keys[1], (v, d) if tied else (d, v))
    equation = "btd,vd->btv" if tied else "btd,dv->btv"
    targets = jax.random.randint(keys[2], (b, n), 0, v)
    mask = jnp.ones((b, n), bool).at[1, :3].set(False).at[2, 8:].set(False)
    weights = jnp.linspace(0.5, 1.5, n)

    def objective(hidden, weight, chunked):
        if chunked:
            logps, ent = M.chunked_logprobs(hidden, weight, equation, targets, mask, chunk=chunk,
                                            softcap=softcap, temperature=temperature,
                                            with_entropy=True)
        else:
            logits = M.unembed(hidden, weight, equation, softcap=softcap)
            logps = M.token_logprobs(logits, targets, mask, temperature=temperature)
            ent = M.entropy(logits, mask, temperature=temperature)
        return jnp.sum(weights * logps) + 0.1 * jnp.sum(ent), (logps, ent)

    both = jax.jit(lambda h, w: [jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        h, w, chunked) for chunked in (False, True)])
    ((_, (lp0, ent0)), g0), ((_, (lp1, ent1)), g1) = both(hidden, weight)
    np.testing.assert_allclose(lp1, lp0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ent1, ent0, rtol=1e-6, atol=1e-6)
    assert not np.asarray(lp1)[~np.asarray(mask)].any()          # 0 off the mask
    _tree_close(g1, g0, rtol=1e-5, atol=1e-5)


def test_chunked_target_logprobs_through_the_model():
    """End to end with the trunk: an untied lm_head, final_softcap, temperature, padding, a
    completion-shaped target (the last 7 tokens) and a chunk that does not divide it."""
    name = "qwen3_mqa"
    p = 5

    def run(cfg):
        graphdef = _graphdef(cfg.replace(final_softcap=3.0))

        def objective(params):
            logps, ent = M.target_logprobs(graphdef, params, TOKENS, TOKENS[:, p:], MASK[:, p:],
                                           mask_bt=MASK, temperature=0.7, with_entropy=True)
            return jnp.sum(logps) + 0.1 * jnp.sum(ent), (logps, ent)
        return jax.jit(jax.value_and_grad(objective, has_aux=True))(_params(name))

    ((_, (lp0, ent0)), g0) = run(CONFIGS[name])
    ((_, (lp1, ent1)), g1) = run(CONFIGS[name].replace(logits_chunk=3))
    np.testing.assert_allclose(lp1, lp0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ent1, ent0, rtol=1e-6, atol=1e-6)
    _tree_close(g1, g0, rtol=1e-5, atol=1e-5)


def test_unchunked_path_is_apply_then_token_logprobs_and_callers_chunk():
    """logits_chunk=0 is exactly the computation the callers did before (bitwise); with a chunk
    the callers (common.sequence_logps, rollout.completion_logps) give the same numbers."""
    name = "qwen3_mqa"
    params = _params(name)
    graphdef = _graphdef(CONFIGS[name])
    p = 5                                                    # prompt length
    completion, cmask = TOKENS[:, p:], MASK[:, p:]

    @jax.jit
    def before(params):
        logits, _ = M.apply(graphdef, params, TOKENS, mask_bt=MASK)
        seq = M.token_logprobs(logits[:, :-1], TOKENS[:, 1:], MASK[:, 1:], temperature=0.7)
        comp = M.token_logprobs(logits[:, p - 1:-1], completion, cmask)
        return seq, comp, M.entropy(logits[:, p - 1:-1], cmask)

    def now(graphdef):
        @jax.jit
        def run(params):
            seq, _ = common.sequence_logps(graphdef, params, TOKENS, MASK, MASK,
                                           temperature=0.7)
            comp = rollout.completion_logps(graphdef, params, TOKENS, MASK, completion, cmask)
            _, ent = M.target_logprobs(graphdef, params, TOKENS, completion, cmask,
                                       mask_bt=MASK, with_entropy=True)
            return seq, comp, ent
        return run(params)

    want = before(params)
    for got, ref in zip(now(graphdef), want):
        np.testing.assert_array_equal(got, ref)
    for got, ref in zip(now(_graphdef(CONFIGS[name].replace(logits_chunk=3))), want):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_chunked_logprobs_never_hold_the_full_logits():
    """XLA's compiled memory analysis of one gradient step at a large vocabulary: the scratch
    memory drops by most of the [B, T, V] float32 logits (and their gradient)."""
    b, t, v = 2, 128, 32768
    logits_mib = b * (t - 1) * v * 4 / 2**20
    temp = {}
    for chunk in (0, 16):
        cfg = M.ModelConfig(vocab_size=v, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                            d_ff=32, max_len=t, tie_embeddings=True, logits_chunk=chunk)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: M.build(cfg)))
        tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)

        def loss(p, tokens):
            logps, ent = M.target_logprobs(graphdef, p, tokens, tokens[:, 1:], None,
                                           with_entropy=True)
            return -logps.sum() - 0.01 * ent.sum()

        compiled = jax.jit(jax.grad(loss)).lower(abstract, tokens).compile()
        temp[chunk] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    print(f"\ncompiled temp bytes, V={v} B={b} T={t} (logits {logits_mib:.0f} MiB): "
          f"unchunked {temp[0]:.1f} MiB, logits_chunk=16 {temp[16]:.1f} MiB")
    assert temp[16] < temp[0] - logits_mib


# ----------------------------------------------------------------------------------------------
# Attention through jax.nn.dot_product_attention
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen3_mqa", "gemma3"])
def test_dot_product_attention_matches_the_einsum_path(name):
    """MQA and q/k norms (qwen3), GQA, sliding windows and Gemma's query scale (gemma3); rows
    with left and right padding."""
    logits0, g0 = _forward_and_grads(CONFIGS[name])
    logits1, g1 = _forward_and_grads(CONFIGS[name].replace(attention="dot_product"))
    assert np.isfinite(np.asarray(logits1)).all()     # fully masked (padding) queries included
    keep = np.asarray(MASK)
    np.testing.assert_allclose(np.asarray(logits1)[keep], np.asarray(logits0)[keep],
                               rtol=1e-6, atol=1e-6)
    _tree_close(g1, g0, rtol=1e-5, atol=1e-6)


def test_dot_product_attention_falls_back_where_it_cannot_go():
    """Gemma 2's attention soft-cap, and prefill/decode with a KV cache, run the einsum path
    whatever cfg.attention says: the very same computation (equal jaxprs)."""
    def jaxpr(name, cached, softcap=False, **runtime):
        graphdef = _graphdef(CONFIGS[name].replace(**runtime, **(SOFTCAPS if softcap else {})))

        def forward(params):
            net = nnx.merge(graphdef, params)
            cache = net.init_cache(B, T) if cached else None
            return net.hidden_states(TOKENS, mask_bt=MASK, cache=cache,
                                     cache_index=0 if cached else None,
                                     kv_mask_bs=MASK if cached else None)[0]
        return str(jax.make_jaxpr(forward)(_params(name)))

    for cached, softcap in ((False, True), (True, False)):
        assert (jaxpr("gemma3", cached, softcap, attention="dot_product")
                == jaxpr("gemma3", cached, softcap))
    assert jaxpr("gemma3", False, attention="dot_product") != jaxpr("gemma3", False)
