"""Golden values, gradients and properties of the losses in rlhf_jax.losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlhf_jax import losses


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# --- Bradley–Terry ------------------------------------------------------------------------------

def test_bradley_terry_seed_worked_example():
    # Concept card, practice "easy": r(preferred)=1.0, r(other)=1.5 -> P=0.3775, loss 0.9741.
    rc, rr = jnp.array([1.0]), jnp.array([1.5])
    loss, metrics = losses.bradley_terry(chosen_rewards=rc, rejected_rewards=rr)
    assert _sigmoid(-0.5) == pytest.approx(0.3775, abs=5e-5)
    assert float(loss) == pytest.approx(0.9741, abs=5e-5)
    assert float(jnp.exp(-loss)) == pytest.approx(0.3775, abs=5e-5)
    assert float(metrics["rm/accuracy"]) == 0.0
    assert float(metrics["rm/margin"]) == pytest.approx(-0.5)


def test_bradley_terry_gradient_is_sigmoid_delta_minus_one():
    rc, rr = jnp.array([1.0, 3.0, -2.0]), jnp.array([1.5, 0.0, -2.0])
    grad_c, grad_r = jax.grad(
        lambda a, b: losses.bradley_terry(chosen_rewards=a, rejected_rewards=b)[0],
        argnums=(0, 1))(rc, rr)
    delta = np.asarray(rc - rr)
    expected = (1.0 / (1.0 + np.exp(-delta)) - 1.0) / 3.0  # mean over 3 pairs
    np.testing.assert_allclose(grad_c, expected, rtol=1e-6)
    np.testing.assert_allclose(grad_r, -expected, rtol=1e-6)
    assert grad_c[0] < 0 < grad_r[0]  # push r+ up, r- down


def test_bradley_terry_margin_and_centering():
    rc, rr, m = jnp.array([2.0, 0.5]), jnp.array([1.0, 1.0]), jnp.array([0.5, 1.0])
    loss, _ = losses.bradley_terry(chosen_rewards=rc, rejected_rewards=rr, margin=m,
                                   center_coef=0.01)
    delta = np.array([1.0, -0.5]) - np.array([0.5, 1.0])
    expected = np.mean(np.log1p(np.exp(-delta))) + 0.01 * np.mean((np.array([3.0, 1.5])) ** 2)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


@settings(deadline=None, max_examples=25)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=8), st.floats(-1e3, 1e3))
def test_bradley_terry_shift_invariance(values, shift):
    half = len(values) // 2
    rc, rr = jnp.array(values[:half]), jnp.array(values[half:2 * half])
    base, _ = losses.bradley_terry(chosen_rewards=rc, rejected_rewards=rr)
    shifted, _ = losses.bradley_terry(chosen_rewards=rc + shift, rejected_rewards=rr + shift)
    # Adding c to every reward changes no preference probability (up to float32 rounding of
    # the shifted rewards themselves).
    assert float(shifted) == pytest.approx(float(base), abs=1e-4 * (1 + abs(shift)))


def test_plackett_luce_matches_brute_force_and_reduces_to_bradley_terry():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(5, 4)).astype(np.float32)
    loss, metrics = losses.plackett_luce(rewards=jnp.asarray(r))
    brute = 0.0
    for row in r:
        for k in range(4):
            brute -= row[k] - np.log(np.sum(np.exp(row[k:])))
    assert float(loss) == pytest.approx(brute / 5, rel=1e-5)
    pl2, _ = losses.plackett_luce(rewards=jnp.asarray(r[:, :2]))
    bt, _ = losses.bradley_terry(chosen_rewards=r[:, 0], rejected_rewards=r[:, 1])
    assert float(pl2) == pytest.approx(float(bt), rel=1e-6)
    ordered = jnp.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    _, m = losses.plackett_luce(rewards=ordered)
    assert float(m["rm/top1_accuracy"]) == 0.5
    assert float(m["rm/pairwise_accuracy"]) == 0.5
    _, m = losses.plackett_luce(rewards=jnp.zeros((4, 3)))  # all tied: no better than chance
    assert float(m["rm/top1_accuracy"]) == pytest.approx(1 / 3)
    assert float(m["rm/pairwise_accuracy"]) == 0.5


# --- PPO ----------------------------------------------------------------------------------------

def _ppo_token(p_old, p_new, adv, **kw):
    logps = jnp.log(jnp.array([[p_new]]))
    old = jnp.log(jnp.array([[p_old]]))
    return losses.ppo_clip(logps=logps, old_logps=old, advantages=jnp.array([[adv]]),
                           mask=jnp.ones((1, 1)), **kw)


def test_ppo_seed_example_positive_advantage_is_capped_at_4_8():
    # Concept card, worked example 3: ratio 0.06 / 0.02 = 3, A=+4, eps=0.2 -> 1.2 * 4 = 4.8.
    loss, metrics = _ppo_token(0.02, 0.06, 4.0, clip_eps=0.2)
    assert -float(loss) == pytest.approx(4.8, rel=1e-5)
    assert float(metrics["ppo/clipfrac"]) == 1.0
    assert float(metrics["ppo/ratio_mean"]) == pytest.approx(3.0, rel=1e-5)


def test_ppo_negative_advantage_above_clip_range_is_not_clipped():
    # Concept card practice "hard" (pi_old=0.10, pi_new=0.13, A=-3). The card answers -3.6 by
    # taking a max for negative advantages; Schulman et al. 2017, eq. 7, always takes the min,
    # which gives min(1.3 * -3, 1.2 * -3) = -3.9: the unclipped term, with a live gradient
    # that keeps pushing the probability of the bad token down.
    p_old, adv = 0.10, -3.0
    loss, metrics = _ppo_token(p_old, 0.13, adv, clip_eps=0.2)
    assert -float(loss) == pytest.approx(-3.9, rel=1e-5)
    assert float(metrics["ppo/clipfrac"]) == 0.0
    grad = jax.grad(lambda lp: losses.ppo_clip(
        logps=lp, old_logps=jnp.log(jnp.array([[p_old]])), advantages=jnp.array([[adv]]),
        mask=jnp.ones((1, 1)))[0])(jnp.log(jnp.array([[0.13]])))
    # d loss / d logp = -ratio * A = 3.9 > 0: gradient descent lowers log pi of the bad token.
    assert float(grad[0, 0]) == pytest.approx(3.9, rel=1e-5)


def test_ppo_negative_advantage_below_clip_range_is_clipped_with_zero_gradient():
    p_old, adv = 0.10, -3.0
    loss, metrics = _ppo_token(p_old, 0.05, adv, clip_eps=0.2)  # ratio 0.5 < 0.8
    assert -float(loss) == pytest.approx(0.8 * -3.0, rel=1e-5)
    assert float(metrics["ppo/clipfrac"]) == 1.0
    grad = jax.grad(lambda lp: losses.ppo_clip(
        logps=lp, old_logps=jnp.log(jnp.array([[p_old]])), advantages=jnp.array([[adv]]),
        mask=jnp.ones((1, 1)))[0])(jnp.log(jnp.array([[0.05]])))
    assert float(grad[0, 0]) == 0.0


def test_ppo_asymmetric_and_dual_clip():
    loss, _ = _ppo_token(0.1, 0.2, 1.0, clip_eps=0.2, clip_eps_high=0.28)
    assert -float(loss) == pytest.approx(1.28, rel=1e-5)
    # ratio 10 with A=-1: the min picks -10; the dual clip floors it at c * A = -3.
    loss, metrics = _ppo_token(0.01, 0.1, -1.0, dual_clip=3.0)
    assert -float(loss) == pytest.approx(-3.0, rel=1e-5)
    assert float(metrics["ppo/dual_clipfrac"]) == 1.0
    loss, _ = _ppo_token(0.01, 0.1, -1.0)
    assert -float(loss) == pytest.approx(-10.0, rel=1e-5)


def test_ppo_constants_have_no_gradient_and_per_sequence_advantages_broadcast():
    b = t = 3  # B == T: a [B] advantage must still go along the batch, not the tokens
    logps = jnp.full((b, t), -1.0)
    adv_b = jnp.array([1.0, -2.0, 3.0])
    mask = jnp.ones((b, t))
    l1, _ = losses.ppo_clip(logps=logps, old_logps=logps, advantages=adv_b, mask=mask)
    l2, _ = losses.ppo_clip(logps=logps, old_logps=logps, advantages=adv_b[:, None], mask=mask)
    assert float(l1) == float(l2) == pytest.approx(-2.0 / 3)
    g_adv, g_old = jax.grad(lambda a, o: losses.ppo_clip(logps=logps, old_logps=o, advantages=a,
                                                         mask=mask)[0], argnums=(0, 1))(
        jnp.ones((b, t)), logps)
    assert float(jnp.abs(g_adv).sum()) == 0.0 and float(jnp.abs(g_old).sum()) == 0.0


def test_ppo_masked_tokens_do_not_count():
    logps = jnp.log(jnp.array([[0.5, 0.9, 0.1]]))
    old = jnp.log(jnp.array([[0.5, 0.1, 0.1]]))
    adv = jnp.array([[2.0, 100.0, 1.0]])
    mask = jnp.array([[1, 0, 1]])
    loss, metrics = losses.ppo_clip(logps=logps, old_logps=old, advantages=adv, mask=mask)
    assert -float(loss) == pytest.approx(1.5, rel=1e-6)
    assert float(metrics["ppo/ratio_max"]) == pytest.approx(1.0, rel=1e-6)


def test_value_loss_clipping():
    values, old = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 0.0]])
    returns = jnp.array([[2.0, 0.5]])
    loss, metrics = losses.value_loss(values=values, old_values=old, returns=returns,
                                      mask=jnp.ones((1, 2)), clip_eps=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> max 3.24; token 1: 0.25.
    assert float(loss) == pytest.approx(0.5 * (3.24 + 0.25) / 2, rel=1e-6)
    assert float(metrics["value/clipfrac"]) == 0.5
    loss, _ = losses.value_loss(values=values, old_values=old, returns=returns,
                                mask=jnp.ones((1, 2)), clip_eps=None)
    assert float(loss) == pytest.approx(0.5 * (1.0 + 0.25) / 2, rel=1e-6)


def test_explained_variance():
    t = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    m = jnp.ones((1, 4))
    assert float(losses.explained_variance(predictions=t, targets=t, mask=m)) == 1.0
    assert float(losses.explained_variance(predictions=jnp.full_like(t, 2.5), targets=t,
                                           mask=m)) == pytest.approx(0.0, abs=1e-6)


def test_reinforce_and_entropy():
    logps = jnp.array([[-1.0, -2.0]])
    loss, _ = losses.reinforce(logps=logps, advantages=jnp.array([[2.0, 1.0]]),
                               mask=jnp.array([[1, 1]]))
    assert float(loss) == pytest.approx((2.0 + 2.0) / 2)
    logits = jnp.zeros((1, 2, 4))
    loss, metrics = losses.entropy(logits=logits, mask=jnp.ones((1, 2)))
    assert float(metrics["policy/entropy"]) == pytest.approx(math.log(4), rel=1e-6)
    assert float(loss) == pytest.approx(-math.log(4), rel=1e-6)
    masked = jnp.array([[[0.0, 0.0, -jnp.inf, -jnp.inf]]])  # top-k filtered to two tokens
    assert float(losses.token_entropy(masked)[0, 0]) == pytest.approx(math.log(2), rel=1e-6)


# --- Direct alignment ---------------------------------------------------------------------------

def _pref_inputs():
    return dict(policy_chosen_logps=jnp.array([-10.0, -12.0]),
                policy_rejected_logps=jnp.array([-11.0, -9.0]),
                ref_chosen_logps=jnp.array([-10.5, -11.0]),
                ref_rejected_logps=jnp.array([-10.0, -10.0]))


def test_dpo_value_and_implicit_rewards():
    x = _pref_inputs()
    loss, m = losses.dpo(**x, beta=0.1)
    chosen = 0.1 * np.array([0.5, -1.0])
    rejected = 0.1 * np.array([-1.0, 1.0])
    h = chosen - rejected
    assert float(loss) == pytest.approx(np.mean(np.log1p(np.exp(-h))), rel=1e-6)
    assert float(m["dpo/chosen_reward"]) == pytest.approx(chosen.mean(), rel=1e-6)
    assert float(m["dpo/rejected_reward"]) == pytest.approx(rejected.mean(), rel=1e-6)
    assert float(m["dpo/margin"]) == pytest.approx(h.mean(), rel=1e-6)
    assert float(m["dpo/accuracy"]) == 0.5


def test_dpo_gradient_raises_chosen_lowers_rejected():
    x = _pref_inputs()
    g = jax.grad(lambda pc, pr: losses.dpo(**{**x, "policy_chosen_logps": pc,
                                                "policy_rejected_logps": pr})[0],
                 argnums=(0, 1))(x["policy_chosen_logps"], x["policy_rejected_logps"])
    assert np.all(np.asarray(g[0]) < 0)  # descending the loss raises log pi(y+)
    assert np.all(np.asarray(g[1]) > 0)  # and lowers log pi(y-)


def test_cdpo_label_smoothing():
    x = _pref_inputs()
    plain, _ = losses.dpo(**x, beta=0.3)
    smoothed0, _ = losses.dpo(**x, beta=0.3, label_smoothing=0.0)
    assert float(plain) == float(smoothed0)
    c, _ = losses.cdpo(**x, beta=0.3, label_smoothing=0.2)
    h = 0.3 * (np.array([0.5, -1.0]) - np.array([-1.0, 1.0]))
    expected = np.mean(0.8 * np.log1p(np.exp(-h)) + 0.2 * np.log1p(np.exp(h)))
    assert float(c) == pytest.approx(expected, rel=1e-6)


def test_ipo_simpo_orpo_formulas():
    x = _pref_inputs()
    lc, lr = jnp.array([4.0, 2.0]), jnp.array([5.0, 3.0])
    loss, _ = losses.ipo(**x, tau=0.25, chosen_lengths=lc, rejected_lengths=lr)
    h = np.array([0.5, -1.0]) / np.array([4.0, 2.0]) - np.array([-1.0, 1.0]) / np.array([5, 3])
    assert float(loss) == pytest.approx(np.mean((h - 2.0) ** 2), rel=1e-6)
    loss, _ = losses.ipo(**x, tau=0.25)
    h = np.array([0.5, -1.0]) - np.array([-1.0, 1.0])
    assert float(loss) == pytest.approx(np.mean((h - 2.0) ** 2), rel=1e-6)

    loss, m = losses.simpo(policy_chosen_logps=x["policy_chosen_logps"],
                           policy_rejected_logps=x["policy_rejected_logps"],
                           chosen_lengths=lc, rejected_lengths=lr, beta=2.0, gamma=0.5)
    z = 2.0 * np.array([-10 / 4, -12 / 2]) - 2.0 * np.array([-11 / 5, -9 / 3]) - 0.5
    assert float(loss) == pytest.approx(np.mean(np.log1p(np.exp(-z))), rel=1e-6)

    nll = jnp.array([2.5, 6.0])
    loss, m = losses.orpo(policy_chosen_logps=x["policy_chosen_logps"],
                          policy_rejected_logps=x["policy_rejected_logps"],
                          chosen_lengths=lc, rejected_lengths=lr, chosen_nll=nll, lam=0.1)
    a_c, a_r = np.array([-10 / 4, -12 / 2]), np.array([-11 / 5, -9 / 3])
    log_odds = lambda a: a - np.log1p(-np.exp(a))  # noqa: E731
    lor = log_odds(a_c) - log_odds(a_r)
    expected = np.mean(np.asarray(nll)) + 0.1 * np.mean(np.log1p(np.exp(-lor)))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(m["orpo/log_odds_ratio"]) == pytest.approx(lor.mean(), rel=1e-5)


# --- dtypes and extreme inputs ------------------------------------------------------------------

def test_bf16_inputs_compute_in_float32():
    x = {k: v.astype(jnp.bfloat16) for k, v in _pref_inputs().items()}
    loss, m = losses.dpo(**x)
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in m.values())
    lp = jnp.full((2, 3), -1.0, jnp.bfloat16)
    loss, _ = losses.ppo_clip(logps=lp, old_logps=lp, advantages=jnp.ones((2, 3), jnp.bfloat16),
                              mask=jnp.ones((2, 3), jnp.bfloat16))
    assert loss.dtype == jnp.float32


EXTREME_CASES = {
    "bradley_terry": lambda s: losses.bradley_terry(
        chosen_rewards=jnp.array([1e4, -1e4]) * s, rejected_rewards=jnp.array([-1e4, 1e4]) * s,
        margin=jnp.array([1.0, 1.0]), center_coef=0.01),
    "plackett_luce": lambda s: losses.plackett_luce(rewards=jnp.array([[1e4, -1e4, 0.0]]) * s),
    "dpo": lambda s: losses.dpo(policy_chosen_logps=jnp.array([-100.0, 0.0]) * s,
                                policy_rejected_logps=jnp.array([0.0, -100.0]) * s,
                                ref_chosen_logps=jnp.array([0.0, -100.0]) * s,
                                ref_rejected_logps=jnp.array([-100.0, 0.0]) * s,
                                label_smoothing=0.1),
    "ipo": lambda s: losses.ipo(policy_chosen_logps=jnp.array([-100.0]) * s,
                                policy_rejected_logps=jnp.array([0.0]) * s,
                                ref_chosen_logps=jnp.array([0.0]) * s,
                                ref_rejected_logps=jnp.array([-100.0]) * s,
                                chosen_lengths=jnp.array([0.0]), rejected_lengths=jnp.array([3])),
    "simpo": lambda s: losses.simpo(policy_chosen_logps=jnp.array([-1e4, 0.0]) * s,
                                    policy_rejected_logps=jnp.array([0.0, -1e4]) * s,
                                    chosen_lengths=jnp.array([1, 0]),
                                    rejected_lengths=jnp.array([1, 1])),
    "orpo": lambda s: losses.orpo(policy_chosen_logps=jnp.array([-100.0, 0.0, -1e-9]) * s,
                                  policy_rejected_logps=jnp.array([0.0, -100.0, -1e4]) * s,
                                  chosen_lengths=jnp.array([1, 1, 1]),
                                  rejected_lengths=jnp.array([1, 1, 1]),
                                  chosen_nll=jnp.array([100.0, 0.0, 0.0]) * s),
    "ppo_clip": lambda s: losses.ppo_clip(
        logps=jnp.array([[-100.0, 0.0, -5.0], [0.0, 0.0, 0.0]]) * s,
        old_logps=jnp.array([[0.0, -100.0, -5.0], [0.0, 0.0, 0.0]]) * s,
        advantages=jnp.array([[1e4, -1e4, 1.0], [1.0, 1.0, 1.0]]) * s,
        mask=jnp.array([[1, 1, 1], [0, 0, 0]]), dual_clip=3.0),
    "ppo_clip_all_masked": lambda s: losses.ppo_clip(
        logps=jnp.full((2, 3), -100.0) * s, old_logps=jnp.zeros((2, 3)),
        advantages=jnp.full((2, 3), 1e4), mask=jnp.zeros((2, 3)), agg="seq_mean_token_mean"),
    "value_loss": lambda s: losses.value_loss(
        values=jnp.array([[1e4, 0.0]]) * s, old_values=jnp.array([[-1e4, 0.0]]),
        returns=jnp.array([[0.0, 1e4]]), mask=jnp.array([[1, 0]])),
    "reinforce": lambda s: losses.reinforce(
        logps=jnp.array([[-100.0, 0.0]]) * s, advantages=jnp.array([[1e4, -1e4]]),
        mask=jnp.zeros((1, 2))),
    "entropy": lambda s: losses.entropy(
        logits=jnp.array([[[1e4, -1e4, 0.0]]]) * s, mask=jnp.ones((1, 1))),
    # -inf entries are added as constants so that d/ds stays a question about the loss.
    "entropy_with_-inf_logits": lambda s: losses.entropy(
        logits=jnp.array([[[0.0, 1.0, 0.0]]]) * s + jnp.array([0.0, 0.0, -jnp.inf]),
        mask=jnp.ones((1, 1))),
    "ppo_clip_-inf_padding": lambda s: losses.ppo_clip(
        logps=jnp.array([[-1.0, 0.0]]) * s + jnp.array([0.0, -jnp.inf]),
        old_logps=jnp.array([[-1.2, -jnp.inf]]),
        advantages=jnp.array([[1.0, 1.0]]), mask=jnp.array([[1, 0]])),
    "reinforce_-inf_padding": lambda s: losses.reinforce(
        logps=jnp.array([[-1.0, 0.0]]) * s + jnp.array([0.0, -jnp.inf]),
        advantages=jnp.array([1.0]), mask=jnp.array([[1, 0]])),
}


@pytest.mark.parametrize("name", sorted(EXTREME_CASES))
def test_finite_values_and_gradients_on_extreme_inputs(name):
    fn = EXTREME_CASES[name]
    loss, metrics = fn(1.0)
    assert np.isfinite(float(loss)), name
    for key, value in metrics.items():
        assert np.isfinite(float(value)), (name, key)
    grad = jax.grad(lambda s: fn(s)[0])(1.0)
    assert np.isfinite(float(grad)), name


# --- fail well: huge values, zero coefficients, padding -----------------------------------------

@pytest.mark.parametrize("r", [1.8e19, 1e30, 3e38, -3e38])
def test_bradley_terry_default_is_finite_for_any_finite_reward(r):
    # With center_coef=0, 0 * (r+ + r-)^2 = 0 * inf was NaN for |r| >= ~1.8e19.
    rc = rr = jnp.array([r], jnp.float32)
    loss, metrics = losses.bradley_terry(chosen_rewards=rc, rejected_rewards=rr)
    assert float(loss) == pytest.approx(math.log(2))
    grad = jax.grad(lambda a: losses.bradley_terry(chosen_rewards=a, rejected_rewards=rr)[0])(rc)
    assert float(grad[0]) == pytest.approx(-0.5)
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_bradley_terry_traced_center_coef():
    # A traced coefficient of 0 must skip the term too (value and gradient), and a traced
    # non-zero one must give the same loss as a Python one.
    def value_and_grad(coef, rc, rr):
        return jax.value_and_grad(lambda a: losses.bradley_terry(
            chosen_rewards=a, rejected_rewards=rr, center_coef=coef)[0])(rc)

    huge = jnp.array([1e30], jnp.float32)
    loss, grad = jax.jit(value_and_grad)(0.0, huge, huge)
    assert float(loss) == pytest.approx(math.log(2)) and float(grad[0]) == pytest.approx(-0.5)
    rc, rr = jnp.array([2.0, 0.5]), jnp.array([1.0, 1.0])
    traced, _ = jax.jit(value_and_grad)(0.01, rc, rr)
    static, _ = value_and_grad(0.01, rc, rr)
    assert float(traced) == pytest.approx(float(static), rel=1e-6)
    assert float(static) > float(value_and_grad(0.0, rc, rr)[0])


def test_ppo_clip_is_finite_for_a_huge_negative_advantage_at_the_ratio_clamp():
    # ratio = exp(20) (the log-ratio clamp) times A = -1e30 overflowed float32: the loss was inf.
    loss, metrics = losses.ppo_clip(logps=jnp.array([[0.0]]), old_logps=jnp.array([[-30.0]]),
                                    advantages=jnp.array([[-1e30]]), mask=jnp.ones((1, 1)))
    expected = losses.ADVANTAGE_CLAMP * math.exp(20.0)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    grad = jax.grad(lambda lp: losses.ppo_clip(
        logps=lp, old_logps=jnp.array([[-30.0]]), advantages=jnp.array([[-1e30]]),
        mask=jnp.ones((1, 1)))[0])(jnp.array([[0.0]]))
    assert np.all(np.isfinite(grad))  # 0: the log-ratio is at its clamp


def test_explained_variance_is_floored_not_minus_inf():
    # Var(R) ~ 1e-37 > 0 and Var(R - V) ~ 1e30: the ratio overflowed to -inf, with a NaN gradient.
    t = jnp.array([[0.0, 1e-18, 0.0, 0.0]])
    p = jnp.array([[1e15, -1e15, 0.0, 0.0]])
    m = jnp.ones((1, 4))
    ev = losses.explained_variance(predictions=p, targets=t, mask=m)
    assert float(ev) == float(np.float32(losses.EXPLAINED_VARIANCE_FLOOR))
    grad = jax.grad(lambda x: losses.explained_variance(predictions=x, targets=t, mask=m))(p)
    assert np.all(np.isfinite(grad))
    # Within range it is unchanged.
    t = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    ev = losses.explained_variance(predictions=t + jnp.array([[0.5, -0.5, 0.5, -0.5]]),
                                   targets=t, mask=m)
    assert float(ev) == pytest.approx(1.0 - 0.25 / 1.25, rel=1e-6)


_PAD_MASK = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
_PAD_NAN_MASK = jnp.where(_PAD_MASK > 0, 1.0, jnp.nan)  # NaN in a mask is padding


def _pad(x, fill):
    return jnp.where(_PAD_MASK > 0, jnp.asarray(x, jnp.float32), fill)


_MASKED_LOSSES = {
    "ppo_clip": lambda x, m: losses.ppo_clip(logps=x["lp"], old_logps=x["old"],
                                             advantages=x["a"], mask=m, dual_clip=3.0),
    "reinforce": lambda x, m: losses.reinforce(logps=x["lp"], advantages=x["a"], mask=m,
                                               agg="seq_mean_token_mean"),
    "value_loss": lambda x, m: losses.value_loss(values=x["lp"], old_values=x["old"],
                                                 returns=x["a"], mask=m),
    "entropy": lambda x, m: losses.entropy(logits=x["lp"][..., None] * jnp.arange(3.0),
                                           mask=m),
}


@pytest.mark.parametrize("name", sorted(_MASKED_LOSSES))
@pytest.mark.parametrize("fill", [jnp.nan, jnp.inf, -jnp.inf, 1e30])
def test_padding_changes_neither_loss_metrics_nor_gradient(name, fill):
    # The mask used to multiply: value_loss's gradient was NaN with NaN padded values, and
    # reinforce's with an inf padded advantage (0 * inf in the backward pass).
    fn = _MASKED_LOSSES[name]
    clean = {"lp": jnp.array([[-1.0, -2.0, -0.5], [-0.3, -1.0, -1.0]]),
             "old": jnp.array([[-1.1, -1.5, -0.5], [-0.2, -1.0, -1.0]]),
             "a": jnp.array([[1.0, -2.0, 0.5], [3.0, 1.0, 1.0]])}
    dirty = {k: _pad(v, fill) for k, v in clean.items()}

    def run(x, m):
        (loss, metrics), grad = jax.value_and_grad(lambda lp: fn({**x, "lp": lp}, m),
                                                   has_aux=True)(x["lp"])
        return loss, metrics, grad

    loss, metrics, grad = run(clean, _PAD_MASK)
    for x, m in ((dirty, _PAD_MASK), (dirty, _PAD_NAN_MASK)):
        loss2, metrics2, grad2 = run(x, m)
        assert float(loss2) == float(loss)
        assert {k: float(v) for k, v in metrics2.items()} == {
            k: float(v) for k, v in metrics.items()}
        np.testing.assert_array_equal(grad2, grad)
    assert np.all(np.asarray(grad)[_PAD_MASK == 0] == 0.0)
