"""GAE against a Python loop, sequence-level baselines, whitening and KL-shaped rewards."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlhf_jax import advantages, kl, losses, registry


def _random_batch(seed, b=6, t=9):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(b, t)).astype(np.float32)
    values = rng.normal(size=(b, t)).astype(np.float32)
    lengths = rng.integers(0, t + 1, size=b)
    lengths[0], lengths[1] = t, 0  # a full row and an empty row
    starts = np.minimum(rng.integers(0, 3, size=b), t - lengths)  # responses after a prompt
    pos = np.arange(t)[None, :]
    mask = ((pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])).astype(np.float32)
    return rewards, values, mask


def _gae_loop(rewards, values, mask, gamma, lam):
    """Reference: a plain Python loop over each row's valid tokens, no bootstrap at the end."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        valid = np.flatnonzero(mask[b])
        if not len(valid):
            continue
        first, end = valid[0], valid[-1] + 1
        running = 0.0
        for t in reversed(range(first, end)):
            next_value = values[b, t + 1] if t + 1 < end else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv, (adv + values) * mask


@pytest.mark.parametrize("seed,gamma,lam", [(0, 1.0, 0.95), (1, 0.99, 0.9), (2, 0.9, 0.5)])
def test_gae_matches_python_loop(seed, gamma, lam):
    r, v, m = _random_batch(seed)
    adv, ret = jax.jit(lambda r, v, m: advantages.gae(rewards=r, values=v, mask=m, gamma=gamma,
                                                       lam=lam))(r, v, m)
    ref_adv, ref_ret = _gae_loop(r, v, m, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)


def test_gae_lambda_zero_is_one_step_td_error():
    r, v, m = _random_batch(3)
    adv, _ = advantages.gae(rewards=r, values=v, mask=m, gamma=0.9, lam=0.0)
    next_v = np.concatenate([v[:, 1:] * m[:, 1:], np.zeros((v.shape[0], 1))], axis=1)
    np.testing.assert_allclose(adv, (r + 0.9 * next_v - v) * m, atol=1e-6)


def test_gae_gamma_lambda_one_is_return_minus_value():
    r, v, m = _random_batch(4)
    adv, ret = advantages.gae(rewards=r, values=v, mask=m, gamma=1.0, lam=1.0)
    return_to_go = np.flip(np.cumsum(np.flip(r * m, 1), 1), 1) * m
    np.testing.assert_allclose(adv, (return_to_go - v) * m, atol=1e-5)
    np.testing.assert_allclose(ret, return_to_go, atol=1e-5)
    g, g2 = advantages.reward_to_go(rewards=r, mask=m)
    np.testing.assert_allclose(g, return_to_go, atol=1e-5)
    np.testing.assert_array_equal(g, g2)


def test_group_normalized_and_leave_one_out():
    r = np.array([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0], np.float32)
    adv = np.asarray(advantages.group_normalized(r, 4))
    for g in range(2):
        grp = r[4 * g:4 * g + 4]
        np.testing.assert_allclose(adv[4 * g:4 * g + 4],
                                   (grp - grp.mean()) / (grp.std() + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(advantages.group_normalized(r, 4, scale=False),
                               r - np.repeat(r.reshape(2, 4).mean(1), 4), rtol=1e-6)
    loo = np.asarray(advantages.leave_one_out(r, 4))
    for i in range(8):
        g = i // 4
        others = [r[j] for j in range(4 * g, 4 * g + 4) if j != i]
        assert loo[i] == pytest.approx(r[i] - np.mean(others), rel=1e-6)
    # RLOO's advantage is G / (G - 1) times the mean-baseline advantage.
    np.testing.assert_allclose(loo, 4 / 3 * (r - np.repeat(r.reshape(2, 4).mean(1), 4)),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of the number of samples"):
        advantages.group_normalized(r, 3)
    with pytest.raises(ValueError, match="at least 2"):
        advantages.leave_one_out(r, 1)


def test_sequence_estimators_broadcast_the_sequence_return():
    r = np.zeros((4, 3), np.float32)
    r[:, -1] = [1.0, 3.0, 0.0, 2.0]
    m = np.ones((4, 3), np.float32)
    m[1, 2] = 0  # row 1's score is on a padded position: it does not count
    adv, ret = advantages.grpo(rewards=r, mask=m, group_size=2)
    seq = np.array([1.0, 0.0, 0.0, 2.0])
    np.testing.assert_allclose(ret, seq[:, None] * m)
    expected = np.asarray(advantages.group_normalized(seq, 2))
    np.testing.assert_allclose(adv, expected[:, None] * m, rtol=1e-6)
    adv, _ = advantages.dr_grpo(rewards=r, mask=m, group_size=2)
    np.testing.assert_allclose(adv, np.array([0.5, -0.5, -1.0, 1.0])[:, None] * m)
    adv, _ = advantages.rloo(rewards=r, mask=m, group_size=2)
    np.testing.assert_allclose(adv, np.array([1.0, -1.0, -2.0, 2.0])[:, None] * m)


def test_best_of_n_keeps_the_top_of_each_group_and_its_loss_is_sft_on_them():
    rewards = np.zeros((6, 4), np.float32)
    rewards[:, 3] = [0.5, 2.0, 2.0, -1.0, 3.0, 1.0]        # scores at the last token
    mask = np.ones((6, 4), np.float32)
    mask[1, 2:] = 0                                          # a shorter response
    adv, ret = advantages.best_of_n(rewards=rewards, mask=mask, group_size=3)
    # Groups [0.5, 2.0 (row 1: its score sits past its mask), 2.0] and [-1, 3, 1].
    np.testing.assert_array_equal(np.asarray(adv)[:, 0], [0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(np.asarray(adv), np.asarray(adv)[:, :1] * mask)
    adv2, _ = advantages.best_of_n(rewards=rewards, mask=mask, group_size=3, top=2)
    np.testing.assert_array_equal(np.asarray(adv2)[:, 0], [1, 0, 1, 0, 1, 1])
    # Ties go to the earlier row.
    tied, _ = advantages.best_of_n(rewards=np.ones((4, 1)), mask=np.ones((4, 1)), group_size=2)
    np.testing.assert_array_equal(np.asarray(tied)[:, 0], [1, 0, 1, 0])
    # reinforce on these weights = the NLL of the kept tokens over all tokens (token_mean).
    logps = -np.arange(24, dtype=np.float32).reshape(6, 4) / 10
    loss, _ = losses.reinforce(logps=logps, advantages=adv, mask=mask)
    kept = np.asarray(adv) > 0
    assert float(loss) == pytest.approx(-logps[kept].sum() / mask.sum())
    with pytest.raises(ValueError, match="top=3 must be in"):
        advantages.best_of_n(rewards=rewards, mask=mask, group_size=3, top=3)


def test_whiten():
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, size=(4, 6)).astype(np.float32)
    m = (rng.random((4, 6)) > 0.3).astype(np.float32)
    w = np.asarray(advantages.whiten(x, m))
    valid = w[m > 0]
    assert valid.mean() == pytest.approx(0.0, abs=1e-5)
    assert valid.std() == pytest.approx(1.0, abs=1e-4)
    assert np.all(w[m == 0] == 0)
    w2 = np.asarray(advantages.whiten(x, m, shift_mean=False))
    assert w2[m > 0].mean() == pytest.approx(x[m > 0].mean(), rel=1e-5)
    assert w2[m > 0].std() == pytest.approx(1.0, abs=1e-4)


def test_kl_shaped_rewards_place_score_at_last_token():
    logps = jnp.array([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = jnp.array([[-1.5, -2.0, -2.0], [-1.0, -2.0, -1.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    scores = jnp.array([5.0, -1.0])
    r = advantages.kl_shaped_rewards(scores=scores, logps=logps, ref_logps=ref, mask=mask,
                                     kl_coef=0.1)
    expected = np.array([[-0.05, 5.0, 0.0], [0.0, -0.1, -1.0]])
    np.testing.assert_allclose(r, expected, atol=1e-6)
    # Summed over a row: the score minus beta times the sequence KL estimate.
    seq_kl = np.sum(kl.estimate(logps=logps, ref_logps=ref, kind="k3", mask=mask), axis=1)
    r3 = advantages.kl_shaped_rewards(scores=scores, logps=logps, ref_logps=ref, mask=mask,
                                      kl_coef=0.2, estimator="k3")
    np.testing.assert_allclose(np.sum(r3, axis=1), scores - 0.2 * seq_kl, rtol=1e-6)


def test_last_token_index():
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]])
    np.testing.assert_array_equal(advantages.last_token_index(mask), [1, 3, 0, 2])


def test_finite_on_extreme_and_degenerate_inputs():
    empty = jnp.zeros((2, 3))
    assert np.all(np.asarray(advantages.whiten(jnp.full((2, 3), 1e4), empty)) == 0)
    # A group whose rewards are all equal has zero advantage, not 0/0.
    np.testing.assert_array_equal(advantages.group_normalized(jnp.full((4,), 1e4), 2), 0.0)
    logps = jnp.array([[-100.0, 0.0, -3.0]])
    ref = jnp.array([[0.0, -100.0, -3.0]])
    for est in ("k1", "k2", "k3"):
        r = advantages.kl_shaped_rewards(scores=jnp.array([1e4]), logps=logps, ref_logps=ref,
                                         mask=jnp.ones((1, 3)), kl_coef=0.1, estimator=est)
        adv, ret = advantages.gae(rewards=r, values=jnp.full((1, 3), 1e4), mask=jnp.ones((1, 3)))
        assert np.all(np.isfinite(adv)) and np.all(np.isfinite(ret)), est
    grad = jax.grad(lambda lp: jnp.sum(advantages.kl_shaped_rewards(
        scores=jnp.array([1.0]), logps=lp, ref_logps=ref, mask=jnp.ones((1, 3)), kl_coef=0.1,
        estimator="k3")))(logps)
    assert np.all(np.isfinite(grad))


# --- tied groups: exactly zero, whatever the value ----------------------------------------------

def _baselined(group_size):
    """The group baselines as [B] -> [B] functions, eager and jitted."""
    fns = {
        "grpo": lambda r: advantages.group_normalized(r, group_size),
        "grpo_eps0": lambda r: advantages.group_normalized(r, group_size, eps=0.0),
        "dr_grpo": lambda r: advantages.group_normalized(r, group_size, scale=False),
        "rloo": lambda r: advantages.leave_one_out(r, group_size),
    }
    return {**fns, **{f"jit_{k}": jax.jit(f) for k, f in fns.items()}}


@pytest.mark.parametrize("value,group_size", [(0.7, 8), (123.4, 16), (1e4, 2), (-3.3, 5),
                                              (0.1, 3), (1e30, 4), (-0.0, 2)])
def test_a_tied_group_has_exactly_zero_advantage(value, group_size):
    # The float32 mean of equal rewards is off by ~1e-7 |r|, and GRPO divided that by
    # (std + 1e-6): eight rewards of 0.7 all got +0.056, sixteen of 123.4 all got -0.94.
    r = jnp.full((2 * group_size,), value, jnp.float32)
    for name, fn in _baselined(group_size).items():
        np.testing.assert_array_equal(fn(r), 0.0, err_msg=name)


@settings(deadline=None, max_examples=30)
@given(st.floats(-1e30, 1e30).map(np.float32), st.integers(2, 9),
       st.lists(st.floats(-100, 100, width=32), min_size=9, max_size=9))
def test_tied_groups_are_zero_beside_untied_ones(value, group_size, other):
    # A tied group contributes nothing whatever its value, and leaves its neighbours' groups
    # as they would be alone.
    untied = jnp.asarray(other[:group_size], jnp.float32)
    r = jnp.concatenate([jnp.full((group_size,), value, jnp.float32), untied])
    for name, fn in _baselined(group_size).items():
        if name.startswith("jit_"):
            continue  # one compile per group size is too many for a property test
        out = np.asarray(fn(r))
        np.testing.assert_array_equal(out[:group_size], 0.0, err_msg=name)
        np.testing.assert_array_equal(out[group_size:], np.asarray(fn(untied)), err_msg=name)


def test_group_normalized_gradient_is_finite_at_a_tie_and_eps_zero_is_defined():
    # jnp.std has an infinite derivative at 0, which made the whole gradient NaN for a tied
    # group; eps=0 gave 0/0 = NaN values.
    w = jnp.array([1.0, -2.0, 0.5, 3.0])
    for eps in (1e-6, 0.0):
        grad = jax.grad(lambda r: jnp.sum(w * advantages.group_normalized(r, 4, eps=eps)))(
            jnp.full((4,), 0.7))
        np.testing.assert_array_equal(grad, 0.0)
    # Untied: eps=0 is the plain (r - mean) / std.
    r = np.array([1.0, 2.0, 4.0, 9.0], np.float32)
    np.testing.assert_allclose(advantages.group_normalized(r, 4, eps=0.0),
                               (r - r.mean()) / r.std(), rtol=1e-6)
    # Returns differing only below the smallest normal float (found by the property test:
    # 3 and 4 x 1.1754944e-38) flush to zero deviations: a tie, not NaN / -inf.
    subnormal = jnp.array([3.5264832e-38, 4.7019776e-38, 4.7019776e-38, 4.7019776e-38])
    for eps in (1e-6, 0.0):
        np.testing.assert_array_equal(jax.jit(
            lambda r: advantages.group_normalized(r, 4, eps=eps))(subnormal), 0.0)
    # ... with a finite gradient even when the spread is ~1e-32 (squares of it underflow).
    tiny = jnp.array([3.9e-32, 0.0, 0.0, 0.0])
    assert np.all(np.isfinite(jax.grad(
        lambda r: jnp.sum(w * advantages.group_normalized(r, 4)))(tiny)))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        advantages.group_normalized(r, 4, eps=-1e-6)


def test_sequence_estimators_give_tied_groups_zero():
    # Rows with the same sequence return, however the reward is spread over tokens.
    rewards = np.zeros((4, 3), np.float32)
    rewards[:2, 2] = 0.7
    rewards[2:, 1] = 123.4
    mask = np.ones((4, 3), np.float32)
    for fn in (advantages.grpo, advantages.dr_grpo, advantages.rloo):
        adv, _ = fn(rewards=rewards, mask=mask, group_size=2)
        np.testing.assert_array_equal(adv, 0.0, err_msg=fn.__name__)


# --- REINFORCE++: global normalisation -----------------------------------------------------------

def test_reinforce_pp_golden():
    # Per-token rewards with the KL inside (-beta KL_t) and the score on the last token:
    #   row 1 [-0.1, -0.2, 2.0]      -> returns-to-go [1.7, 1.8, 2.0]
    #   row 2 [0.1, -1.0, (padding)] -> returns-to-go [-0.9, -1.0]
    # Over the 5 valid tokens: mean 3.6 / 5 = 0.72; deviations [0.98, 1.08, 1.28, -1.62, -1.72];
    # squares sum 0.9604 + 1.1664 + 1.6384 + 2.6244 + 2.9584 = 9.348, variance 9.348 / 5 =
    # 1.8696, std 1.3673332; advantages = deviations / (1.3673332 + 1e-6) =
    # [0.7167231, 0.7898581, 0.9361281, -1.1847872, -1.2579222].
    rewards = np.array([[-0.1, -0.2, 2.0], [0.1, -1.0, np.nan]], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    adv, ret = advantages.reinforce_pp(rewards=rewards, mask=mask)
    np.testing.assert_allclose(adv, [[0.7167231, 0.7898581, 0.9361281],
                                     [-1.1847872, -1.2579222, 0.0]], rtol=1e-5)
    np.testing.assert_allclose(ret, [[1.7, 1.8, 2.0], [-0.9, -1.0, 0.0]], rtol=1e-6)
    # Discounted: gamma = 0.5 gives row 1 returns [-0.1 - 0.1 + 0.5, -0.2 + 1.0, 2.0].
    _, ret = advantages.reinforce_pp(rewards=rewards, mask=mask, gamma=0.5)
    np.testing.assert_allclose(ret[0], [0.3, 0.8, 2.0], rtol=1e-6)


def test_reinforce_pp_normalises_over_the_batch_not_per_group():
    r, _, m = _random_batch(3)
    adv, _ = advantages.reinforce_pp(rewards=r, mask=m)
    g, _ = advantages.reward_to_go(rewards=r, mask=m)
    valid = m > 0
    ref = (np.asarray(g)[valid] - np.asarray(g)[valid].mean()) / (np.asarray(g)[valid].std()
                                                                 + 1e-6)
    np.testing.assert_allclose(np.asarray(adv)[valid], ref, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(adv)[~valid] == 0)
    # Score-only rewards (no KL): every token of a row carries the sequence return, and the
    # statistics are those of the batch. Unlike GRPO, a group of two equal returns is not 0.
    scores = np.array([1.0, 1.0, 0.0, 3.0], np.float32)
    rewards = np.zeros((4, 2), np.float32)
    rewards[:, -1] = scores
    adv, _ = advantages.reinforce_pp(rewards=rewards, mask=np.ones((4, 2)))
    z = (scores - scores.mean()) / (scores.std() + 1e-6)
    np.testing.assert_allclose(adv, np.stack([z, z], 1), rtol=1e-5)
    grpo, _ = advantages.grpo(rewards=rewards, mask=np.ones((4, 2)), group_size=2)
    assert np.all(np.asarray(grpo)[:2] == 0) and np.all(np.asarray(adv)[:2] != 0)


@pytest.mark.parametrize("value", [0.7, 123.4, -3.3, 1e30, 0.0])
def test_reinforce_pp_tied_batch_is_exactly_zero(value):
    # A score on the last token only, equal everywhere: every valid return is equal, so there
    # is no preference to normalise (as group_normalized does for one group).
    rewards = np.zeros((8, 3), np.float32)
    rewards[:, -1] = value
    mask = np.ones((8, 3), np.float32)
    for fn in (advantages.reinforce_pp, jax.jit(advantages.reinforce_pp)):
        adv, _ = fn(rewards=rewards, mask=mask)
        np.testing.assert_array_equal(adv, 0.0)
    grad = jax.grad(lambda r: jnp.sum(advantages.reinforce_pp(rewards=r, mask=mask)[0]
                                      * jnp.arange(24.0).reshape(8, 3)))(rewards)
    assert np.all(np.isfinite(grad))
    # Nothing valid at all: zeros.
    adv, ret = advantages.reinforce_pp(rewards=rewards, mask=np.zeros((8, 3)))
    np.testing.assert_array_equal(adv, 0.0)
    np.testing.assert_array_equal(ret, 0.0)
    # eps = 0 is safe on an untied batch.
    adv, _ = advantages.reinforce_pp(rewards=np.array([[1.0], [2.0]]), mask=np.ones((2, 1)),
                                     eps=0.0)
    np.testing.assert_allclose(adv, [[-1.0], [1.0]], rtol=1e-6)


def test_reinforce_pp_is_registered_without_a_group():
    fn = registry.get("advantage", "reinforce_pp(gamma=0.99)")
    assert not registry.accepts(fn, "group_size")  # one sample per prompt is fine
    with pytest.raises(ValueError, match="eps=-1"):
        registry.get("advantage", "reinforce_pp(eps=-1.0)")


# --- padding never reaches a valid position -----------------------------------------------------

# Mask with a full row, a shorter one, one that starts after a prompt, and an empty one.
_MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], np.float32)


def _with_padding(x, fills=(np.nan, np.inf, -np.inf, 1e30)):
    """x with each padded position of _MASK set to one of `fills`, in turn."""
    x = np.array(x, np.float32)
    pad = np.argwhere(_MASK == 0)
    for i, (b, t) in enumerate(pad):
        x[b, t] = fills[i % len(fills)]
    return x


def _estimator_calls():
    rng = np.random.default_rng(7)
    r = rng.normal(size=(4, 4)).astype(np.float32)
    v = rng.normal(size=(4, 4)).astype(np.float32)
    lp = -np.abs(rng.normal(size=(4, 4))).astype(np.float32)
    ref = -np.abs(rng.normal(size=(4, 4))).astype(np.float32)
    calls = {
        "gae": (lambda r, v, lp, ref, m: advantages.gae(rewards=r, values=v, mask=m)),
        "reward_to_go": (lambda r, v, lp, ref, m: advantages.reward_to_go(rewards=r, mask=m)),
        "whiten": lambda r, v, lp, ref, m: advantages.whiten(r, m),
        "whiten_rescale": lambda r, v, lp, ref, m: advantages.whiten(r, m, shift_mean=False),
    }
    calls["reinforce_pp"] = (
        lambda r, v, lp, ref, m: advantages.reinforce_pp(rewards=r, mask=m, gamma=0.9))
    calls["batch_normalized"] = lambda r, v, lp, ref, m: advantages.batch_normalized(r, m)
    for name in ("grpo", "dr_grpo", "rloo", "best_of_n"):
        calls[name] = functools.partial(
            lambda r, v, lp, ref, m, fn: fn(rewards=r, mask=m, group_size=2),
            fn=getattr(advantages, name))
    scores = rng.normal(size=4).astype(np.float32)  # per row: nothing of it is padding
    for est in registry.names("kl_estimator"):
        calls[f"kl_shaped_{est}"] = functools.partial(
            lambda r, v, lp, ref, m, est: advantages.kl_shaped_rewards(
                scores=scores, logps=lp, ref_logps=ref, mask=m, kl_coef=0.1, estimator=est),
            est=est)
    return calls, (r, v, lp, ref)


@pytest.mark.parametrize("name", sorted(_estimator_calls()[0]))
def test_padding_never_reaches_a_valid_position(name):
    # Before, the mask multiplied instead of selecting: one NaN reward at a padded position
    # turned gae's, reward_to_go's, grpo's and rloo's whole row (and group) NaN, and an inf
    # padded value whiten's padded outputs NaN.
    calls, clean = _estimator_calls()
    fn = calls[name]
    dirty = tuple(_with_padding(x) for x in clean)
    nan_mask = np.where(_MASK > 0, 1.0, np.nan).astype(np.float32)  # NaN counts as padding
    expected = fn(*clean, _MASK)
    for inputs, mask in ((dirty, _MASK), (clean, nan_mask), (dirty, nan_mask)):
        for a, b in zip(jax.tree.leaves(fn(*inputs, mask)), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(np.asarray(a)[_MASK == 0], 0.0)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_shaped_rewards_gradient_ignores_minus_inf_padding(estimator):
    # k2 and k3 of (-inf) - (-inf) are NaN; a where on the output kept the value 0 but the
    # gradient NaN at padded positions (and it was summed into the parameters' gradient).
    logps = jnp.array([[-1.0, -2.0, -jnp.inf]])
    ref = jnp.array([[-1.5, -1.0, -jnp.inf]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    f = lambda lp: jnp.sum(advantages.kl_shaped_rewards(  # noqa: E731
        scores=jnp.array([1.0]), logps=lp, ref_logps=ref, mask=mask, kl_coef=0.1,
        estimator=estimator))
    grad = np.asarray(jax.grad(f)(logps))
    assert np.all(np.isfinite(grad)) and grad[0, 2] == 0.0
    clean = np.asarray(jax.grad(f)(logps.at[0, 2].set(-3.0)))
    np.testing.assert_array_equal(grad, clean)


def test_remax_subtracts_the_greedy_return():
    # Sequence returns 0 + 1 = 1 and 2 + 0 = 2 (the padded 9 is not counted); greedy
    # baselines 0.5 and 1.0: advantages 0.5 and 1.0 on every valid token, 0 on padding.
    rewards = jnp.array([[0.0, 1.0], [2.0, 9.0]])
    mask = jnp.array([[1, 1], [1, 0]])
    adv, returns = advantages.remax(rewards=rewards, mask=mask, baseline=jnp.array([0.5, 1.0]))
    np.testing.assert_allclose(adv, [[0.5, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(returns, [[1.0, 1.0], [2.0, 0.0]])
