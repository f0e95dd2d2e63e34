"""GAE against a Python loop, sequence-level baselines, whitening and KL-shaped rewards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import advantages, kl, losses


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
