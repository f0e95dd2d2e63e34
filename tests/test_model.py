"""Transformer forward, padding/positions, heads, backbone copy, token log-probs and entropy."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import model as M

VARIANTS = {
    "llama_style": M.get_config("tiny"),
    "gpt2_style": M.get_config("tiny_gpt2"),
    "mixed": M.get_config("tiny", norm="layernorm", activation="gelu", tie_embeddings=True,
                          n_kv_heads=1),
}


def _forward(graphdef):
    return jax.jit(functools.partial(M.apply, graphdef))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    cfg = VARIANTS[request.param]
    graphdef, params = M.create(cfg, seed=1)
    return cfg, graphdef, params, _forward(graphdef)


def test_shapes_and_dtypes(variant):
    cfg, _, params, forward = variant
    tokens = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
    logits, hidden = forward(params, tokens)
    assert logits.shape == (2, 5, cfg.vocab_size) and logits.dtype == jnp.float32
    assert hidden.shape == (2, 5, cfg.d_model)


def test_causal(variant):
    _, _, params, forward = variant
    tokens = jnp.asarray([[3, 4, 5, 6, 7, 8]], jnp.int32)
    changed = tokens.at[0, 4].set(40)
    a, _ = forward(params, tokens)
    b, _ = forward(params, changed)
    np.testing.assert_allclose(a[0, :4], b[0, :4], atol=1e-6)
    assert not np.allclose(a[0, 4:], b[0, 4:])


def test_left_padding_with_positions_matches_unpadded(variant):
    _, _, params, forward = variant
    real = jnp.asarray([[5, 9, 2, 7]], jnp.int32)
    padded = jnp.asarray([[0, 0, 0, 5, 9, 2, 7]], jnp.int32)
    mask = padded != 0
    ref, _ = forward(params, real)
    # mask-only call derives positions = cumsum(mask) - 1; explicit positions give the same.
    out, _ = forward(params, padded, mask_bt=mask)
    out2, _ = forward(params, padded, mask_bt=mask, positions_bt=M.default_positions(mask))
    np.testing.assert_allclose(out[0, 3:], ref[0], atol=1e-5)
    np.testing.assert_allclose(out2, out, atol=0)
    assert np.isfinite(np.asarray(out)).all()


def test_right_padding_does_not_change_real_tokens(variant):
    _, _, params, forward = variant
    tokens = jnp.asarray([[5, 9, 2, 7, 0, 0]], jnp.int32)
    mask = tokens != 0
    ref, _ = forward(params, tokens[:, :4])
    out, _ = forward(params, tokens, mask_bt=mask)
    np.testing.assert_allclose(out[0, :4], ref[0], atol=1e-5)


def test_regular_parameter_names():
    _, params = M.create(M.get_config("tiny"))
    names = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(params)}
    for expected in ("embed/embedding", "layers_0/attn/q_proj/kernel",
                     "layers_1/attn/o_proj/kernel", "layers_0/mlp/gate_proj/kernel",
                     "layers_0/mlp/down_proj/kernel", "layers_0/attn_norm/scale",
                     "final_norm/scale", "lm_head/kernel"):
        assert expected in names, sorted(names)
    axes = M.param_logical_axes(params)
    assert axes["layers_0"]["attn"]["q_proj"]["kernel"] == ("embed", "heads", "kv")
    assert axes["lm_head"]["kernel"] == ("embed", "vocab")
    # Tied embeddings have no lm_head.
    _, tied = M.create(M.get_config("tiny_gpt2"))
    assert "lm_head" not in tied and "pos_embed" in tied


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="n_kv_heads"):
        M.ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="norm="):
        M.ModelConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="Unknown model preset"):
        M.get_config("huge")


def test_bfloat16_compute_keeps_fp32_params_and_logits():
    cfg = M.get_config("tiny", dtype="bfloat16")
    graphdef, params = M.create(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits, hidden = _forward(graphdef)(params, jnp.ones((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16


def test_token_logprobs_and_entropy_against_reference():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 11)) * 3
    tokens = jax.random.randint(jax.random.key(1), (2, 3), 0, 11)
    mask = jnp.asarray([[1, 1, 0], [1, 0, 0]], bool)
    for temperature in (1.0, 0.7):
        logp_full = jax.nn.log_softmax(logits / temperature, axis=-1)
        ref = np.take_along_axis(np.asarray(logp_full), np.asarray(tokens)[..., None], -1)[..., 0]
        got = M.token_logprobs(logits, tokens, temperature=temperature)
        np.testing.assert_allclose(got, ref, atol=1e-6)
        got = M.token_logprobs(logits, tokens, mask, temperature=temperature)
        np.testing.assert_allclose(got, np.where(mask, ref, 0.0), atol=1e-6)
        ent_ref = -np.sum(np.exp(logp_full) * logp_full, axis=-1)
        np.testing.assert_allclose(M.entropy(logits, temperature=temperature), ent_ref,
                                   atol=1e-5)
    # Uniform logits: entropy log V; bf16 input is computed in fp32.
    uniform = jnp.zeros((1, 2, 11), jnp.bfloat16)
    np.testing.assert_allclose(M.entropy(uniform), math.log(11), rtol=1e-6)
    assert M.token_logprobs(uniform, jnp.zeros((1, 2), jnp.int32)).dtype == jnp.float32


def test_token_logprobs_alignment_convention():
    # A sequence's log-likelihood: logits[:, :-1] score tokens[:, 1:].
    cfg = M.get_config("tiny")
    graphdef, params = M.create(cfg)
    seq = jnp.asarray([[3, 8, 1, 9]], jnp.int32)
    logits, _ = M.apply(graphdef, params, seq)
    lp = M.token_logprobs(logits[:, :-1], seq[:, 1:])
    manual = [float(jax.nn.log_softmax(logits[0, t])[seq[0, t + 1]]) for t in range(3)]
    np.testing.assert_allclose(lp[0], manual, atol=1e-6)


def test_reward_head_init_and_eos_readout():
    cfg = M.get_config("tiny", d_model=256, n_heads=4, n_kv_heads=4, d_ff=64, n_layers=1)
    graphdef, params = M.create(cfg, kind="reward", seed=0)
    kernel = np.asarray(params["head"]["kernel"][...])
    assert kernel.shape == (256,)
    assert abs(kernel.std() / (1 / math.sqrt(257)) - 1) < 0.15
    assert float(params["head"]["bias"][...]) == 0.0
    reward = jax.jit(functools.partial(M.apply_reward, graphdef))
    tokens = jnp.asarray([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    r = reward(params, tokens, mask_bt=mask)
    assert r.shape == (2,) and r.dtype == jnp.float32
    # Pad content after the last real token is ignored; the row equals its unpadded version.
    r2 = reward(params, tokens.at[0, 3:].set(33), mask_bt=mask)
    np.testing.assert_allclose(r2, r, atol=1e-6)
    r3 = reward(params, tokens[:1, :3], mask_bt=mask[:1, :3])
    np.testing.assert_allclose(r3[0], r[0], atol=1e-5)


def test_value_head_starts_at_zero():
    graphdef, params = M.create(M.get_config("tiny"), kind="value")
    tokens = jnp.ones((2, 6), jnp.int32)
    values = M.apply_value(graphdef, params, tokens, mask_bt=jnp.ones((2, 6), bool))
    assert values.shape == (2, 6)
    np.testing.assert_array_equal(values, 0.0)


@pytest.mark.parametrize("kind", ["reward", "value"])
def test_init_head_model_from_policy(kind):
    cfg = M.get_config("tiny")
    pol_graph, policy = M.create(cfg, seed=11)
    graphdef, head_params = M.create(cfg, kind=kind, seed=12)
    new = M.init_head_model_from_policy(head_params=head_params, policy_params=policy)
    model = nnx.merge(graphdef, new)
    tokens = jnp.asarray([[4, 5, 6]], jnp.int32)
    hidden, _ = model.backbone.hidden_states(tokens)
    _, ref_hidden = M.apply(pol_graph, policy, tokens)
    np.testing.assert_allclose(hidden, ref_hidden, atol=1e-6)
    # The head keeps its own init; the original head params are untouched.
    np.testing.assert_array_equal(new["head"]["kernel"][...], head_params["head"]["kernel"][...])
    assert not np.allclose(head_params["backbone"]["embed"]["embedding"][...],
                           new["backbone"]["embed"]["embedding"][...])


def test_init_head_model_from_policy_rejects_other_config():
    _, policy = M.create(M.get_config("tiny"))
    _, head = M.create(M.get_config("tiny", d_model=64), kind="reward")
    with pytest.raises(ValueError, match="shape mismatch"):
        M.init_head_model_from_policy(head_params=head, policy_params=policy)


def test_token_logprobs_gradient_matches_autodiff_of_log_softmax():
    logits = jax.random.normal(jax.random.key(3), (2, 3, 7)) * 2
    tokens = jax.random.randint(jax.random.key(4), (2, 3), 0, 7)
    weights = jax.random.normal(jax.random.key(5), (2, 3))
    mask = jnp.asarray([[1, 1, 0], [1, 1, 1]], bool)
    for temperature in (1.0, 0.7):
        ours = jax.grad(lambda z: jnp.sum(weights * M.token_logprobs(
            z, tokens, mask, temperature=temperature)))(logits)
        ref = jax.grad(lambda z: jnp.sum(weights * mask * jnp.take_along_axis(
            jax.nn.log_softmax(z / temperature), tokens[..., None], -1)[..., 0]))(logits)
        np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert jax.grad(lambda z: M.token_logprobs(z, tokens).sum())(
        logits.astype(jnp.bfloat16)).dtype == jnp.bfloat16
