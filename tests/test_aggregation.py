"""Loss aggregation: micro-batches and gradient accumulation equal the whole batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import aggregate, aggregation, losses, registry


def _batch(seed=0, b=7, t=11):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, t)).astype(np.float32)
    lengths = rng.integers(0, t + 1, size=b)
    lengths[2] = 0  # an empty row
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    return x, mask


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean",
                                  "seq_mean_token_sum_norm(norm=32)"])
def test_micro_batches_summed_as_parts_equal_whole_batch(mode):
    x, m = _batch()
    whole = float(aggregate(x, m, mode))
    splits = [(0, 3), (3, 4), (4, 7)]  # uneven micro-batches
    total = denom = 0.0
    for lo, hi in splits:
        s, d = aggregation.parts(x[lo:hi], m[lo:hi], mode)
        total, denom = total + float(s), denom + float(d)
    assert total / denom == pytest.approx(whole, rel=1e-5)
    # With the whole batch's denominator passed in, micro-batch losses add up to the whole.
    norm = aggregation.denominator(m, mode)
    summed = sum(float(aggregate(x[lo:hi], m[lo:hi], mode, normalizer=norm)) for lo, hi in splits)
    assert summed == pytest.approx(whole, rel=1e-5)


def test_mode_values():
    x = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], np.float32)
    m = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
    assert float(aggregate(x, m, "token_mean")) == pytest.approx(10 / 4)
    assert float(aggregate(x, m, "seq_mean_token_mean")) == pytest.approx((2 + 4) / 2)
    assert float(aggregate(x, m, "seq_mean_token_sum_norm(norm=3)")) == pytest.approx(
        (6 / 3 + 4 / 3) / 2)
    assert float(aggregate(x, m, "seq_mean_token_sum_norm(norm=10)")) == pytest.approx(0.5)
    assert float(aggregate(x, np.zeros_like(m), "token_mean")) == 0.0
    with pytest.raises(TypeError, match="needs norm"):
        aggregate(x, m, "seq_mean_token_sum_norm")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean",
                                  "seq_mean_token_sum_norm(norm=16)"])
def test_micro_batches_padded_to_different_lengths(mode):
    # Bucketed batching pads each micro-batch to its own length; the parts must not care.
    x, m = _batch(seed=3, t=9)
    whole = float(aggregate(x, m, mode))
    short = int(m[:3].sum(axis=1).max())  # the first micro-batch fits in fewer columns
    pieces = [(x[:3, :max(short, 1)], m[:3, :max(short, 1)]), (x[3:], m[3:])]
    total = denom = 0.0
    for xi, mi in pieces:
        s, d = aggregation.parts(xi, mi, mode)
        total, denom = total + float(s), denom + float(d)
    assert total / denom == pytest.approx(whole, rel=1e-5)


def test_non_finite_values_at_padded_positions_do_not_leak():
    x = np.array([[1.0, np.inf], [2.0, np.nan]], np.float32)
    m = np.array([[1, 0], [1, 0]], np.float32)
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm(norm=2)"):
        assert np.isfinite(float(aggregate(x, m, mode))), mode


def test_gradient_accumulation_equals_whole_batch_gradient():
    rng = np.random.default_rng(1)
    b, t = 6, 5
    logps = jnp.asarray(rng.normal(-2, 0.3, size=(b, t)), jnp.float32)
    old = logps + jnp.asarray(rng.normal(0, 0.2, size=(b, t)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)
    mask = jnp.asarray(np.arange(t)[None] < rng.integers(1, t + 1, size=b)[:, None], jnp.float32)
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm(norm=5)"):
        def loss_fn(lp, sl, normalizer=None):
            return losses.ppo_clip(logps=lp, old_logps=old[sl], advantages=adv[sl],
                                   mask=mask[sl], agg=agg, normalizer=normalizer)[0]
        whole = jax.grad(loss_fn)(logps, slice(None))
        norm = aggregation.denominator(mask, agg)
        accumulated = jnp.concatenate([
            jax.grad(loss_fn)(logps[lo:hi], slice(lo, hi), norm) for lo, hi in [(0, 2), (2, 6)]])
        np.testing.assert_allclose(accumulated, whole, rtol=1e-5, atol=1e-7)


def test_all_modes_are_registered():
    assert registry.names("loss_agg") == ["seq_mean_token_mean", "seq_mean_token_sum_norm",
                                          "token_mean"]


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean",
                                  "seq_mean_token_sum_norm(norm=4)"])
def test_nan_in_the_mask_is_padding_not_a_nan_count(mode):
    # Valid means mask > 0, so a NaN entry is padding. token_mean used to count sum(mask) and
    # seq_mean_token_mean sum(mask, -1): a NaN entry made the denominator, and the loss, NaN.
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    zeros = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    nans = np.where(zeros > 0, 1.0, np.nan).astype(np.float32)
    s0, d0 = aggregation.parts(x, zeros, mode)
    s1, d1 = aggregation.parts(x, nans, mode)
    assert (float(s0), float(d0)) == (float(s1), float(d1))
    assert float(aggregation.denominator(nans, mode)) == float(d0)
    assert float(aggregation.masked_mean(x, nans)) == pytest.approx(7 / 3)


def test_gradient_at_padded_positions_is_exactly_zero_whatever_they_hold():
    x = jnp.array([[1.0, jnp.inf], [2.0, jnp.nan]])
    m = jnp.array([[1.0, 0.0], [1.0, jnp.nan]])
    for mode in registry.names("loss_agg"):
        spec = mode + ("(norm=2)" if mode == "seq_mean_token_sum_norm" else "")
        grad = jax.grad(lambda v: aggregate(v, m, spec))(x)
        np.testing.assert_array_equal(np.asarray(grad)[:, 1], 0.0)
        assert np.all(np.isfinite(grad)), mode
