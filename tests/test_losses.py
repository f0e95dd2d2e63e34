"""Golden values, gradients and properties of the losses in rlhf_jax.losses."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from _pairs import weighted_mean
from rlhf_jax import losses, registry


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
    "gspo": lambda s: losses.gspo(
        logps=jnp.array([[-100.0, 0.0, -5.0], [0.0, 0.0, 0.0]]) * s,
        old_logps=jnp.array([[0.0, -100.0, -5.0], [0.0, 0.0, 0.0]]) * s,
        advantages=jnp.array([1e30, -1e4]) * s, mask=jnp.array([[1, 1, 1], [0, 0, 0]])),
    "cispo": lambda s: losses.cispo(
        logps=jnp.array([[-1e4, 0.0, -5.0]]) * s, old_logps=jnp.array([[0.0, -1e4, -5.0]]),
        advantages=jnp.array([[1e30, -1e4, 1.0]]) * s, mask=jnp.ones((1, 3)),
        clip_eps_low=0.5),
    "sapo": lambda s: losses.sapo(
        logps=jnp.array([[-1e4, 0.0, -5.0]]) * s, old_logps=jnp.array([[0.0, -1e4, -5.0]]),
        advantages=jnp.array([[1e30, -1e4, 1.0]]) * s, mask=jnp.ones((1, 3)), tau_pos=1e-3),
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
    "gspo": lambda x, m: losses.gspo(logps=x["lp"], old_logps=x["old"], advantages=x["a"],
                                     mask=m, clip_eps=0.1, clip_eps_high=0.1),
    "cispo": lambda x, m: losses.cispo(logps=x["lp"], old_logps=x["old"], advantages=x["a"],
                                       mask=m, clip_eps_low=0.1),
    "sapo": lambda x, m: losses.sapo(logps=x["lp"], old_logps=x["old"], advantages=x["a"],
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


# --- The preference batch contract --------------------------------------------------------------
# Every pref_loss takes the whole batch with row weights and returns weighted means over rows
# (losses.py, "The preference-loss batch contract").

def _batch(b=5, seed=0):
    """A batch of b pairs with every input any registered pref_loss declares."""
    rng = np.random.default_rng(seed)
    f = lambda *lo_hi: jnp.asarray(rng.uniform(*lo_hi, size=b), jnp.float32)  # noqa: E731
    return dict(policy_chosen_logps=f(-20.0, -5.0), policy_rejected_logps=f(-20.0, -5.0),
                ref_chosen_logps=f(-20.0, -5.0), ref_rejected_logps=f(-20.0, -5.0),
                chosen_lengths=jnp.asarray(rng.integers(1, 12, size=b), jnp.float32),
                rejected_lengths=jnp.asarray(rng.integers(1, 12, size=b), jnp.float32),
                chosen_nll=f(0.5, 3.0))


def _logps(batch):
    """The four summed log-probs of a batch (what the DPO-family losses take)."""
    return {k: v for k, v in batch.items() if k.endswith("_logps")}


def _call(fn, inputs, **extra):
    return registry.call(fn, **inputs, **extra)


def _kto_batch(b=5, seed=1):
    """Unpaired KTO rows: log-probs, desirable flags and mismatched-completion log-probs."""
    rng = np.random.default_rng(seed)
    f = lambda: jnp.asarray(rng.uniform(-15.0, -5.0, size=b), jnp.float32)  # noqa: E731
    return dict(policy_logps=f(), ref_logps=f(), kl_policy_logps=f(), kl_ref_logps=f(),
                desirable=jnp.asarray(np.arange(b) % 2 == 0, jnp.float32))


# Every pref_loss by name, and every unpaired_loss (KTO's unpaired rows) beside them.
_UNPAIRED = registry.names("unpaired_loss")
_PREF = {name: (registry.get("pref_loss", name), _batch) for name in
         registry.names("pref_loss")}
_PREF.update({name: (registry.get("unpaired_loss", name), _kto_batch) for name in _UNPAIRED})
# AOT pairs rows by rank over the batch: it has no micro-batch decomposition (tested below).
_SPLITTABLE = sorted(set(_PREF) - {"aot_pair"})


@pytest.mark.parametrize("name", sorted(_PREF))
def test_pref_weights_of_one_are_no_weights(name):
    fn, make = _PREF[name]
    x = make()
    loss, metrics = _call(fn, x)
    loss1, metrics1 = _call(fn, x, weights=jnp.ones(5))
    assert float(loss1) == pytest.approx(float(loss), rel=1e-6, abs=1e-7)
    for k in metrics:
        assert float(metrics1[k]) == pytest.approx(float(metrics[k]), rel=1e-6, abs=1e-7), k
    assert {k.split("/")[0] for k in metrics} == {"dpo" if name == "cdpo" else name}
    assert {"loss", "margin", "accuracy"} <= {k.split("/")[1] for k in metrics}


@functools.cache
def _value_and_grad(name):
    """jit of ((loss, metrics), d loss / d policy log-probs) of a _PREF loss, compiled once per
    input structure: the eager loss is many small dispatches."""
    fn, _ = _PREF[name]
    key = _policy_key(name)

    def run(inputs, extra):
        return jax.value_and_grad(lambda p: _call(fn, {**inputs, key: p}, **extra),
                                  has_aux=True)(inputs[key])

    return jax.jit(run)


def _weighted_combination(values, sums):
    return sum(v * s for v, s in zip(values, sums)) / sum(sums)


@pytest.mark.parametrize("name", _SPLITTABLE)
def test_pref_micro_batches_add_up_to_the_whole_batch(name):
    # Uneven weights and halves of different sizes: (S1 L1 + S2 L2) / (S1 + S2) is the whole
    # batch's loss, metrics included, once the batch statistic (if any) of the whole batch is
    # passed to both halves.
    fn, make = _PREF[name]
    x = make()
    w = jnp.array([1.0, 2.0, 0.5, 1.0, 3.0])
    (whole, whole_m), g_whole = _value_and_grad(name)(x, {"weights": w})
    stat = losses.batch_reference_point(fn, **x, weights=w)
    assert (stat is None) == (name not in ("bco_pair", "kto", "kto_pair")), name
    extra = {} if stat is None else {"reference_point": stat}
    parts, grads, sums = [], [], []
    for rows in (slice(0, 2), slice(2, 5)):
        part = {k: v[rows] for k, v in x.items()}
        out, grad = _value_and_grad(name)(part, {"weights": w[rows], **extra})
        parts.append(out)
        grads.append(grad)
        sums.append(float(jnp.sum(w[rows])))
    assert _weighted_combination([float(p[0]) for p in parts], sums) == pytest.approx(
        float(whole), rel=1e-5)
    for k, v in whole_m.items():
        combined = _weighted_combination([float(p[1][k]) for p in parts], sums)
        assert combined == pytest.approx(float(v), rel=1e-5, abs=1e-6), k
    # The gradient adds up the same way.
    g_parts = [g * s / sum(sums) for g, s in zip(grads, sums)]
    np.testing.assert_allclose(np.concatenate(g_parts), g_whole, rtol=1e-5, atol=1e-7)


def _policy_key(name):
    return "policy_logps" if name in _UNPAIRED else "policy_chosen_logps"


@pytest.mark.parametrize("name", sorted(_PREF))
def test_pref_padding_rows_change_nothing(name):
    _, make = _PREF[name]
    x = make()
    w = jnp.array([1.0, 2.0, 0.5, 1.0, 3.0])
    # Two padding rows, weight 0 and NaN, inserted at 1 and 4: row 1 holds NaN in every
    # input, row 4 inf or -inf (alternating over the inputs).
    at = np.array([0, 2, 3, 5, 6])
    padded = {k: jnp.full(7, jnp.nan).at[4].set(jnp.inf if i % 2 else -jnp.inf).at[at].set(v)
              for i, (k, v) in enumerate(x.items())}
    w_pad = jnp.full(7, jnp.nan).at[1].set(0.0).at[at].set(w)
    (loss, metrics), grad = _value_and_grad(name)(x, {"weights": w})
    (loss_p, metrics_p), grad_p = _value_and_grad(name)(padded, {"weights": w_pad})
    assert float(loss_p) == pytest.approx(float(loss), rel=1e-6, abs=1e-7)
    for k in metrics:
        assert float(metrics_p[k]) == pytest.approx(float(metrics[k]), rel=1e-6, abs=1e-7), k
    np.testing.assert_allclose(np.asarray(grad_p)[at], grad, rtol=1e-6, atol=1e-8)
    assert np.all(np.asarray(grad_p)[[1, 4]] == 0.0)


@pytest.mark.parametrize("name", sorted(set(registry.names("pref_loss"))
                                        - {"aot_pair", "bco_pair", "kto_pair"}))
def test_pref_losses_without_a_batch_statistic_match_the_per_pair_path(name):
    # The preference trainer's former path (vmap over single pairs, then a weighted mean) is
    # the batch loss for every loss that is a mean of per-pair terms.
    from rlhf_jax.trainers import preference
    fn = registry.get("pref_loss", name)
    x = _batch()
    w = jnp.array([1.0, 0.0, 2.0, 1.0, 1.0])
    loss, metrics = jax.jit(lambda x: weighted_mean(*preference.per_pair(fn, **x),
                                                               w))(x)
    (direct, direct_m), _ = _value_and_grad(name)(x, {"weights": w})
    assert float(direct) == pytest.approx(float(loss), rel=1e-5)
    for k in metrics:
        assert float(direct_m[k]) == pytest.approx(float(metrics[k]), rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("name", sorted(set(_PREF) - set(_UNPAIRED)))
def test_pref_gradient_raises_chosen_relative_to_rejected(name):
    # One step along -grad widens log pi(y+) - log pi(y-) on every pair of a batch near the
    # reference (policy = reference + small offsets), where each loss still has a gradient.
    fn = registry.get("pref_loss", name)
    x = dict(_batch(), ref_chosen_logps=jnp.array([-10.0, -12.0, -8.0, -9.0, -11.0]),
             ref_rejected_logps=jnp.array([-11.0, -9.0, -10.0, -12.0, -8.0]))
    offsets_c = jnp.array([0.1, -0.2, 0.0, 0.05, -0.1])
    offsets_r = jnp.array([0.0, 0.1, -0.1, 0.05, 0.2])
    x["policy_chosen_logps"] = x["ref_chosen_logps"] + offsets_c
    x["policy_rejected_logps"] = x["ref_rejected_logps"] + offsets_r

    def loss(pc, pr):
        return _call(fn, {**x, "policy_chosen_logps": pc, "policy_rejected_logps": pr})[0]

    pc, pr = x["policy_chosen_logps"], x["policy_rejected_logps"]
    gc, gr = jax.grad(loss, argnums=(0, 1))(pc, pr)
    step = 1e-2
    before = pc - pr
    after = (pc - step * gc) - (pr - step * gr)
    assert np.all(np.asarray(after - before) > 0), (name, gc, gr)
    assert float(loss(pc - step * gc, pr - step * gr)) < float(loss(pc, pr))


# --- New preference losses: golden values by hand -------------------------------------------------
# _pref_inputs(): log-ratios lr(y+) = [0.5, -1.0], lr(y-) = [-1.0, 1.0]. With beta = 0.5 the
# implicit rewards are r+ = [0.25, -0.5], r- = [-0.5, 0.5] and the DPO logit h = r+ - r- =
# [0.75, -1.0]. Reference numbers: softplus(x) = log(1 + e^x), sigmoid(x) = 1 / (1 + e^-x):
#   softplus(-0.75) = log(1.4723666) = 0.3868710    softplus(0.75) = 0.75 + 0.3868710 = 1.1368710
#   softplus(1.0)   = log(3.7182818) = 1.3132617    softplus(-1.0) = 1.3132617 - 1 = 0.3132617
#   sigmoid(0.75) = 0.6791787, sigmoid(-1.0) = 0.2689414, sigmoid(0.25) = 0.5621765,
#   sigmoid(-0.5) = 0.3775407.

def _golden(name, **kw):
    return _call(registry.get("pref_loss", name), _pref_inputs(), beta=0.5, **kw)


def test_hinge_golden():
    # max(0, 1 - h) = [max(0, 0.25), max(0, 2.0)] -> mean (0.25 + 2.0) / 2 = 1.125.
    loss, m = _golden("hinge")
    assert float(loss) == pytest.approx(1.125, rel=1e-6)
    assert float(m["hinge/margin"]) == pytest.approx((0.75 - 1.0) / 2, rel=1e-6)
    assert float(m["hinge/accuracy"]) == 0.5
    # Past the margin (h >= 1) the loss is 0 and so is the gradient.
    sep = dict(_pref_inputs(), policy_chosen_logps=jnp.array([-7.0, -7.0]))  # h = 4.5, 3.0
    g = jax.grad(lambda p: losses.hinge(**{**sep, "policy_chosen_logps": p}, beta=0.5)[0])(
        sep["policy_chosen_logps"])
    assert float(losses.hinge(**sep, beta=0.5)[0]) == 0.0 and np.all(np.asarray(g) == 0.0)


def test_robust_dpo_golden():
    # eps = 0.1: ((0.9 softplus(-h) - 0.1 softplus(h)) / 0.8 per pair:
    #   pair 1: (0.9 * 0.3868710 - 0.1 * 1.1368710) / 0.8 = (0.3481839 - 0.1136871) / 0.8
    #           = 0.2931210
    #   pair 2: (0.9 * 1.3132617 - 0.1 * 0.3132617) / 0.8 = (1.1819355 - 0.0313262) / 0.8
    #           = 1.4382617
    #   mean = 0.8656913
    loss, _ = _golden("robust_dpo", label_smoothing=0.1)
    assert float(loss) == pytest.approx(0.8656913, rel=1e-6)
    # eps = 0 is DPO.
    assert float(_golden("robust_dpo", label_smoothing=0.0)[0]) == pytest.approx(
        float(_golden("dpo")[0]), rel=1e-6)


def test_robust_dpo_is_unbiased_under_label_flips():
    # E over a flip with probability eps of the robust loss = the DPO loss of the clean label.
    x, eps = _pref_inputs(), 0.2
    flipped = dict(x, policy_chosen_logps=x["policy_rejected_logps"],
                   policy_rejected_logps=x["policy_chosen_logps"],
                   ref_chosen_logps=x["ref_rejected_logps"],
                   ref_rejected_logps=x["ref_chosen_logps"])
    expected = ((1 - eps) * losses.robust_dpo(**x, label_smoothing=eps)[0]
                + eps * losses.robust_dpo(**flipped, label_smoothing=eps)[0])
    assert float(expected) == pytest.approx(float(losses.dpo(**x)[0]), rel=1e-5)


def test_exo_pair_golden():
    # eps = 0.1, p = sigmoid(h) = [0.6791787, 0.2689414], log p = -softplus(-h) =
    # [-0.3868710, -1.3132617], log(1 - p) = -softplus(h) = [-1.1368710, -0.3132617];
    # log 0.9 = -0.1053605, log 0.1 = -2.3025851:
    #   pair 1: 0.6791787 * (-0.3868710 + 0.1053605) + 0.3208213 * (-1.1368710 + 2.3025851)
    #         = -0.1911943 + 0.3739843 = 0.1827900
    #   pair 2: 0.2689414 * (-1.3132617 + 0.1053605) + 0.7310586 * (-0.3132617 + 2.3025851)
    #         = -0.3248555 + 1.4543128 = 1.1294573
    #   mean = 0.6561236
    loss, m = _golden("exo_pair", label_smoothing=0.1)
    assert float(loss) == pytest.approx(0.6561236, rel=1e-6)
    assert float(m["exo_pair/chosen_reward"]) == pytest.approx((0.25 - 0.5) / 2, rel=1e-6)
    # Its minimum is at p = 1 - eps (the KL of a distribution to itself is 0): h = log 9.
    x = dict(_pref_inputs(), policy_chosen_logps=jnp.array([-10.5 + math.log(9.0)]),
             ref_chosen_logps=jnp.array([-10.5]), policy_rejected_logps=jnp.array([-10.0]),
             ref_rejected_logps=jnp.array([-10.0]))
    assert float(losses.exo_pair(**x, beta=1.0, label_smoothing=0.1)[0]) == pytest.approx(
        0.0, abs=1e-6)


def test_nca_pair_golden():
    # softplus(-r+) + softplus(r+) / 2 + softplus(r-) / 2:
    #   pair 1 (r+ = 0.25, r- = -0.5): 0.5759394 + 0.8259394 / 2 + 0.4740770 / 2 = 1.2259476
    #   pair 2 (r+ = -0.5, r- = 0.5): 0.9740770 + 0.4740770 / 2 + 0.9740770 / 2 = 1.6981540
    #   mean = 1.4620508
    loss, _ = _golden("nca_pair")
    assert float(loss) == pytest.approx(1.4620508, rel=1e-6)


def test_bco_pair_golden_and_reference_point():
    # delta = mean over pairs of (r+ + r-) / 2 = ((0.25 - 0.5) / 2 + (-0.5 + 0.5) / 2) / 2
    #       = -0.0625. softplus(-(r+ - delta)) + softplus(r- - delta):
    #   pair 1: softplus(-0.3125) + softplus(-0.4375) = 0.5490549 + 0.4981345 = 1.0471894
    #   pair 2: softplus(0.4375) + softplus(0.5625) = 0.9356345 + 1.0134373 = 1.9490718
    #   mean = 1.4981306
    loss, m = _golden("bco_pair")
    assert float(m["bco_pair/reference_point"]) == pytest.approx(-0.0625, rel=1e-6)
    assert float(loss) == pytest.approx(1.4981306, rel=1e-6)
    fn = registry.get("pref_loss", "bco_pair(beta=0.5)")
    assert float(losses.batch_reference_point(fn, **_pref_inputs())) == pytest.approx(-0.0625)
    # A given delta is used as is, and carries no gradient (it is a constant either way).
    given, m = _golden("bco_pair", reference_point=0.0)
    # softplus(-0.25) + softplus(-0.5) = 0.5759394 + 0.4740770; softplus(0.5) + softplus(0.5)
    # = 2 * 0.9740770 -> mean (1.0500164 + 1.9481540) / 2 = 1.4990852
    assert float(given) == pytest.approx(1.4990852, rel=1e-6)
    g = jax.grad(lambda r: losses.bco_pair(**_pref_inputs(), reference_point=r)[0])(0.3)
    assert float(g) == 0.0


def test_sppo_hard_golden():
    # beta = 0.5: targets +-1 / (2 beta) = +-1; (a - 1)^2 + (b + 1)^2:
    #   pair 1 (a = 0.5, b = -1.0): 0.25 + 0 = 0.25;  pair 2 (a = -1, b = 1): 4 + 4 = 8
    #   mean = 4.125
    loss, _ = _golden("sppo_hard")
    assert float(loss) == pytest.approx(4.125, rel=1e-6)
    # Each log-ratio is pulled to its own target: at a = 1, b = -1 the gradient is 0.
    at_target = dict(_pref_inputs(), policy_chosen_logps=jnp.array([-9.5, -10.0]),
                     policy_rejected_logps=jnp.array([-11.0, -11.0]))
    g = jax.grad(lambda p: losses.sppo_hard(**{**at_target, "policy_chosen_logps": p},
                                            beta=0.5)[0])(at_target["policy_chosen_logps"])
    np.testing.assert_allclose(g, 0.0, atol=1e-7)


def test_apo_golden():
    # apo_zero: sigmoid(-r+) + sigmoid(r-):
    #   pair 1: sigmoid(-0.25) + sigmoid(-0.5) = 0.4378235 + 0.3775407 = 0.8153642
    #   pair 2: sigmoid(0.5) + sigmoid(0.5) = 2 * 0.6224593 = 1.2449187;  mean = 1.0301414
    assert float(_golden("apo_zero")[0]) == pytest.approx(1.0301414, rel=1e-6)
    # apo_down: sigmoid(r+) + sigmoid(-(r+ - r-)):
    #   pair 1: sigmoid(0.25) + sigmoid(-0.75) = 0.5621765 + 0.3208213 = 0.8829978
    #   pair 2: sigmoid(-0.5) + sigmoid(1.0) = 0.3775407 + 0.7310586 = 1.1085992
    #   mean = 0.9957985
    assert float(_golden("apo_down")[0]) == pytest.approx(0.9957985, rel=1e-6)
    # apo_down lowers the chosen likelihood too (its data's chosen answers are worse).
    x = _pref_inputs()
    g = jax.grad(lambda p: losses.apo_down(**{**x, "policy_chosen_logps": p})[0])(
        x["policy_chosen_logps"])
    assert np.all(np.asarray(g) > 0)


def test_rpo_golden():
    # DPO per pair softplus(-h) = [0.3868710, 1.3132617] plus alpha * NLL with alpha = 0.5,
    # NLL = [2.5, 6.0]: [0.3868710 + 1.25, 1.3132617 + 3.0] = [1.6368710, 4.3132617];
    # mean 2.9750663 (DPO part 0.8500663, NLL part 4.25 * 0.5 = 2.125).
    loss, m = _golden("rpo", alpha=0.5, chosen_nll=jnp.array([2.5, 6.0]))
    assert float(loss) == pytest.approx(2.9750663, rel=1e-6)
    assert float(m["rpo/dpo_loss"]) == pytest.approx(0.8500663, rel=1e-6)
    assert float(m["rpo/nll"]) == pytest.approx(4.25, rel=1e-6)
    assert float(m["rpo/dpo_loss"]) == pytest.approx(float(_golden("dpo")[0]), rel=1e-6)


def test_aot_pair_sorts_chosen_and_rejected_separately():
    # Sorted lr(y+) = [-1.0, 0.5], sorted lr(y-) = [-1.0, 1.0]: rank differences [0.0, -0.5],
    # h = 0.5 * [0, -0.5] = [0, -0.25]; loss = (softplus(0) + softplus(0.25)) / 2
    # = (0.6931472 + 0.8259394) / 2 = 0.7595433 (DPO on the unsorted pairs: 0.8500663).
    loss, m = _golden("aot_pair")
    assert float(loss) == pytest.approx(0.7595433, rel=1e-6)
    assert float(m["aot_pair/dominance"]) == pytest.approx(0.25)  # ranks: a tie and a loss
    assert float(m["aot_pair/accuracy"]) == 0.5                     # pairs: one win, one loss
    # Permuting the chosen rows alone (breaking the pairs) changes nothing: only the two
    # distributions matter.
    x = _logps(_batch(6))
    perm = np.array([3, 0, 5, 1, 2, 4])
    shuffled = dict(x, policy_chosen_logps=x["policy_chosen_logps"][perm],
                    ref_chosen_logps=x["ref_chosen_logps"][perm])
    assert float(losses.aot_pair(**shuffled)[0]) == pytest.approx(
        float(losses.aot_pair(**x)[0]), rel=1e-6)
    # It is the DPO loss of the rank-matched pairs, and on one pair it is DPO.
    lr_c = np.sort(np.asarray(x["policy_chosen_logps"] - x["ref_chosen_logps"]))
    lr_r = np.sort(np.asarray(x["policy_rejected_logps"] - x["ref_rejected_logps"]))
    ranked = dict(policy_chosen_logps=lr_c, ref_chosen_logps=np.zeros(6),
                  policy_rejected_logps=lr_r, ref_rejected_logps=np.zeros(6))
    assert float(losses.aot_pair(**x)[0]) == pytest.approx(float(losses.dpo(**ranked)[0]),
                                                           rel=1e-6)
    one = {k: v[:1] for k, v in _pref_inputs().items()}
    assert float(losses.aot_pair(**one)[0]) == pytest.approx(float(losses.dpo(**one)[0]))


def test_aot_pair_is_batch_level_and_padding_is_not_ranked():
    # lr(y+) = [0, 10, 5, 6], lr(y-) = [2, 3, 1, 9]. The whole batch ranks them into
    # differences [0 - 1, 5 - 2, 6 - 3, 10 - 9] = [-1, 3, 3, 1]; its halves rank theirs into
    # [0 - 2, 10 - 3] = [-2, 7] and [5 - 1, 6 - 9] = [4, -3]: other pairs, another loss.
    x = dict(policy_chosen_logps=jnp.array([0.0, 10.0, 5.0, 6.0]),
             policy_rejected_logps=jnp.array([2.0, 3.0, 1.0, 9.0]),
             ref_chosen_logps=jnp.zeros(4), ref_rejected_logps=jnp.zeros(4))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    whole, _ = losses.aot_pair(**x, beta=1.0)
    assert float(whole) == pytest.approx((sp(1) + 2 * sp(-3) + sp(-1)) / 4, rel=1e-6)
    halves = [losses.aot_pair(**{k: v[s] for k, v in x.items()}, beta=1.0)[0]
              for s in (slice(0, 2), slice(2, 4))]
    assert float(sum(halves)) / 2 == pytest.approx((sp(2) + sp(-7) + sp(-4) + sp(3)) / 4,
                                                   rel=1e-6)
    assert abs(float(sum(halves)) / 2 - float(whole)) > 0.1
    x = _logps(_batch(4))
    # A padding row (weight 0) takes no rank: with it, the loss is that of the real rows.
    w = jnp.array([1.0, 1.0, 0.0, 1.0])
    real = {k: v[np.array([0, 1, 3])] for k, v in x.items()}
    assert float(losses.aot_pair(**x, weights=w)[0]) == pytest.approx(
        float(losses.aot_pair(**real)[0]), rel=1e-6)


# --- KTO --------------------------------------------------------------------------------------

def test_kto_golden():
    # r = log pi - log pi_ref = [1.0, -0.5, 2.0], desirable [1, 0, 0]; mismatched log-ratios
    # [0.4, 0.2, 0.0] -> z0 = max(0, 0.2) = 0.2. beta = 1, lambda_D = 1, lambda_U = 1.5:
    #   row 1 (desirable):   1 - sigmoid(1.0 - 0.2) = sigmoid(-0.8) = 0.3100255
    #   row 2 (undesirable): 1.5 * sigmoid(-0.5 - 0.2) = 1.5 * 0.3318122 = 0.4977183
    #   row 3 (undesirable): 1.5 * sigmoid(2.0 - 0.2) = 1.5 * 0.8581489 = 1.2872234
    #   mean = 2.0949672 / 3 = 0.6983224
    x = dict(policy_logps=jnp.array([-9.0, -10.5, -8.0]), ref_logps=jnp.array([-10.0] * 3),
             desirable=jnp.array([1.0, 0.0, 0.0]),
             kl_policy_logps=jnp.array([-9.6, -9.8, -10.0]), kl_ref_logps=jnp.full(3, -10.0))
    loss, m = losses.kto(**x, beta=1.0, desirable_weight=1.0, undesirable_weight=1.5)
    assert float(m["kto/reference_point"]) == pytest.approx(0.2, rel=1e-5)
    assert float(loss) == pytest.approx(0.6983224, rel=1e-5)
    # Rows on their side of z0: row 1 (0.8 above) yes, row 2 (0.7 below) yes, row 3 no;
    # signed distances [0.8, 0.7, -1.8] -> margin -0.1.
    assert float(m["kto/accuracy"]) == pytest.approx(2 / 3)
    assert float(m["kto/margin"]) == pytest.approx(-0.1, abs=1e-6)
    # z0 is never negative, and is a constant.
    neg = dict(x, kl_policy_logps=jnp.full(3, -12.0))
    assert float(losses.kto(**neg)[1]["kto/reference_point"]) == 0.0
    g = jax.grad(lambda k: losses.kto(**{**x, "kl_policy_logps": k})[0])(x["kl_policy_logps"])
    assert np.all(np.asarray(g) == 0.0)
    # Without mismatched completions, z0 comes from the rows' own log-ratios:
    # max(0, (1.0 - 0.5 + 2.0) / 3) = 0.8333333.
    own = {k: x[k] for k in ("policy_logps", "ref_logps", "desirable")}
    assert float(losses.kto(**own)[1]["kto/reference_point"]) == pytest.approx(2.5 / 3)
    with pytest.raises(ValueError, match="both kl_policy_logps and kl_ref_logps"):
        losses.kto(**own, kl_policy_logps=x["kl_policy_logps"])


def test_kto_is_the_unpaired_loss_with_its_ranges_declared():
    # Its rows are single completions: a kind of its own, which the preference trainer's
    # config.pref_loss may name (trainers/preference.py), never a paired pref_loss.
    assert "kto" in registry.names("unpaired_loss") and "kto" not in registry.names("pref_loss")
    fn = registry.get("unpaired_loss", "kto(beta=0.5, undesirable_weight=1.5)")
    assert fn.func is losses.kto and fn.keywords == {"beta": 0.5, "undesirable_weight": 1.5}
    with pytest.raises(ValueError, match="unpaired_loss kto: beta=0 must be a number > 0"):
        registry.get("unpaired_loss", "kto(beta=0)")
    with pytest.raises(ValueError, match="desirable_weight=-1.0 must be a number >= 0"):
        registry.get("unpaired_loss", "kto(desirable_weight=-1.0)")


def test_kto_gradient_raises_desirable_and_lowers_undesirable():
    x = dict(policy_logps=jnp.array([-9.0, -10.5, -8.0]), ref_logps=jnp.array([-10.0] * 3),
             desirable=jnp.array([1.0, 0.0, 0.0]))
    g = jax.grad(lambda p: losses.kto(**{**x, "policy_logps": p})[0])(x["policy_logps"])
    assert float(g[0]) < 0 < float(g[1]) and float(g[2]) > 0


def test_kto_pair_golden_and_equals_kto_on_the_unpaired_rows():
    # Given z0 = 0.5, beta = 0.5: per pair (sigmoid(beta (z0 - lr+)) + sigmoid(beta (lr- - z0)))
    # / 2:  pair 1: (sigmoid(0) + sigmoid(-0.75)) / 2 = (0.5 + 0.3208213) / 2 = 0.4104106
    #       pair 2: (sigmoid(0.75) + sigmoid(0.25)) / 2 = (0.6791787 + 0.5621765) / 2
    #               = 0.6206776;  mean = 0.5155441
    loss, m = _golden("kto_pair", reference_point=0.5)
    assert float(loss) == pytest.approx(0.5155441, rel=1e-6)
    # From the batch: z0 = max(0, mean((0.5 - 1.0) / 2, (-1.0 + 1.0) / 2)) = max(0, -0.125) = 0.
    loss, m = _golden("kto_pair")
    assert float(m["kto_pair/reference_point"]) == 0.0
    # kto on the 2B rows of pairs_to_unpaired, with the same z0, is the same loss.
    x = _batch(4)
    w = jnp.array([1.0, 0.0, 2.0, 1.0])
    rows = losses.pairs_to_unpaired(
        prompts=jnp.arange(4), chosen=(x["policy_chosen_logps"], x["ref_chosen_logps"]),
        rejected=(x["policy_rejected_logps"], x["ref_rejected_logps"]), weights=w)
    pair_loss, pair_m = losses.kto_pair(**_logps(x), weights=w)
    z0 = pair_m["kto_pair/reference_point"]
    kto_loss, _ = losses.kto(policy_logps=rows["completions"][0],
                             ref_logps=rows["completions"][1], desirable=rows["desirable"],
                             weights=rows["weights"], reference_point=z0)
    assert float(kto_loss) == pytest.approx(float(pair_loss), rel=1e-6)
    # Its reference point is kto's own-rows estimate over those 2B rows.
    assert float(z0) == pytest.approx(float(losses.kto_reference_point(
        policy_logps=rows["completions"][0], ref_logps=rows["completions"][1],
        weights=rows["weights"])), rel=1e-6)


def test_pairs_to_unpaired_rows_and_mismatched_completions():
    prompts = jnp.array([[10, 11], [20, 21], [30, 31]])
    chosen, rejected = jnp.array([1, 2, 3]), jnp.array([-1, -2, -3])
    out = losses.pairs_to_unpaired(prompts=prompts, chosen=chosen, rejected=rejected,
                                   weights=jnp.array([1.0, 1.0, 0.0]))
    np.testing.assert_array_equal(out["prompts"][:, 0], [10, 20, 30, 10, 20, 30])
    np.testing.assert_array_equal(out["completions"], [1, 2, 3, -1, -2, -3])
    np.testing.assert_array_equal(out["desirable"], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["weights"], [1, 1, 0, 1, 1, 0])
    # Row k holds row k - 1's completion: from another prompt for every row.
    np.testing.assert_array_equal(out["kl_completions"], [-3, 1, 2, 3, -1, -2])
    owner = {c: p for c, p in zip([1, 2, 3, -1, -2, -3], [10, 20, 30, 10, 20, 30])}
    for k in range(6):
        assert owner[int(out["kl_completions"][k])] != int(out["prompts"][k, 0])
    # Real where both row k and row k - 1 are real (pair 3 is padding: rows 2 and 5).
    np.testing.assert_array_equal(out["kl_weights"], [0, 1, 0, 0, 1, 0])
    # The KTO paper's z0 from those rows: a toy "model" whose log-prob of completion c after
    # prompt p is -|c| - p / 10 (reference: -|c|) gives kl log-ratios -p / 10.
    logp = lambda p, c: -jnp.abs(c) - p / 10.0  # noqa: E731
    ref = lambda p, c: -jnp.abs(c) * 1.0  # noqa: E731
    p = out["prompts"][:, 0].astype(jnp.float32)
    z0 = losses.kto_reference_point(
        policy_logps=logp(p, out["completions"]), ref_logps=ref(p, out["completions"]),
        kl_policy_logps=logp(p, out["kl_completions"]), kl_ref_logps=ref(p, out["kl_completions"]),
        kl_weights=out["kl_weights"])
    assert float(z0) == 0.0  # max(0, mean(-2.0, -2.0)): all log-ratios are negative here
    z0 = losses.kto_reference_point(
        policy_logps=p, ref_logps=p, kl_policy_logps=p / 10.0, kl_ref_logps=jnp.zeros(6),
        kl_weights=out["kl_weights"])
    assert float(z0) == pytest.approx((2.0 + 2.0) / 2)  # rows 1 and 4 hold prompt 20


# --- GSPO, CISPO, SAPO ------------------------------------------------------------------------
# One [2, 3] example for all three: the second row's last token is padding (NaN there).
#   log-ratios d = log pi - log pi_old: row 1 [0.3, -0.1, 0.1], row 2 [-0.2, 0.0, pad]
#   token ratios exp(d): row 1 [1.3498588, 0.9048374, 1.1051709], row 2 [0.8187308, 1.0]
#   log pi: row 1 [-1.0, -2.0, -0.5], row 2 [-1.5, -0.7, pad];  advantages A = [2.0, -1.0]

_LP = jnp.array([[-1.0, -2.0, -0.5], [-1.5, -0.7, jnp.nan]])
_D = jnp.array([[0.3, -0.1, 0.1], [-0.2, 0.0, jnp.nan]])
_OLD = _LP - _D
_ADV = jnp.array([2.0, -1.0])
_M = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _policy(name, lp=_LP, **kw):
    return registry.call(registry.get("policy_loss", name), logps=lp, old_logps=_OLD,
                         advantages=_ADV, mask=_M, **kw)


def test_gspo_golden():
    # Sequence ratios s = exp(mean d): row 1 exp(0.3 / 3) = exp(0.1) = 1.1051709,
    # row 2 exp(-0.2 / 2) = exp(-0.1) = 0.9048374. Clip range [1 - 0.05, 1 + 0.2]:
    #   row 1: min(1.1051709 * 2, clip(1.1051709) * 2) = 2.2103418 (inside the range)
    #   row 2: min(0.9048374 * -1, 0.95 * -1) = -0.95 (clipped: below 1 - 0.05 with A < 0)
    # Every token of a row carries its row's objective. seq_mean_token_mean:
    # (2.2103418 + -0.95) / 2 = 0.6301709 -> loss -0.6301709; token_mean:
    # (3 * 2.2103418 + 2 * -0.95) / 5 = 0.9462051 -> loss -0.9462051.
    kw = dict(clip_eps=0.05, clip_eps_high=0.2)
    loss, m = _policy("gspo", **kw)
    assert float(loss) == pytest.approx(-0.6301709, rel=1e-6)
    assert float(_policy("gspo", agg="token_mean", **kw)[0]) == pytest.approx(-0.9462051,
                                                                             rel=1e-6)
    assert float(m["gspo/clipfrac"]) == pytest.approx(2 / 5)  # row 2's two tokens
    assert float(m["gspo/seq_ratio_mean"]) == pytest.approx((1.1051709 + 0.9048374) / 2)
    assert float(m["gspo/seq_ratio_max"]) == pytest.approx(1.1051709, rel=1e-6)
    # Gradient: row 1 unclipped, d loss / d log pi_t = -(1/2) (1/3) s A = -2.2103418 / 6
    # = -0.3683903 on each of its tokens (through s, i.e. every token); row 2 clipped: 0.
    g = jax.grad(lambda lp: _policy("gspo", lp=lp, **kw)[0])(_LP)
    np.testing.assert_allclose(g[0], [-0.3683903] * 3, rtol=1e-5)
    np.testing.assert_array_equal(g[1], [0.0, 0.0, 0.0])
    # The default clip range is the paper's (3e-4, 4e-4): both rows are clipped.
    loss, m = _policy("gspo")
    assert float(loss) == pytest.approx(-(1.0004 * 2 + 0.9997 * -1) / 2, rel=1e-6)


def test_gspo_token_form_equals_the_sequence_form():
    # GSPO's eq. 5 with per-sequence ratios, written directly: its value and gradient are the
    # token form's (the same s_i on every token, the gradient s_i A_i mean_t grad log pi).
    rng = np.random.default_rng(0)
    lp = jnp.asarray(-rng.uniform(0.1, 3.0, size=(4, 5)), jnp.float32)
    old = lp - jnp.asarray(rng.normal(0, 0.05, size=(4, 5)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=4), jnp.float32)
    mask = jnp.asarray(np.arange(5)[None] < np.array([5, 3, 1, 4])[:, None], jnp.float32)

    def sequence_form(lp):
        n = mask.sum(-1)
        s = jnp.exp(jnp.sum((lp - old) * mask, -1) / n)
        obj = jnp.minimum(s * adv, jnp.clip(s, 1 - 0.02, 1 + 0.03) * adv)
        return -jnp.mean(obj)

    def token(lp):
        return losses.gspo(logps=lp, old_logps=old, advantages=adv, mask=mask, clip_eps=0.02,
                           clip_eps_high=0.03)[0]

    assert float(token(lp)) == pytest.approx(float(sequence_form(lp)), rel=1e-6)
    np.testing.assert_allclose(jax.grad(token)(lp), jax.grad(sequence_form)(lp), rtol=1e-5,
                               atol=1e-7)


def test_cispo_golden():
    # Weights sg(clip(r, -, 1 + 0.2)): row 1 [1.2 (clipped from 1.3498588), 0.9048374,
    # 1.1051709], row 2 [0.8187308, 1.0] (no lower bound). Terms w A log pi:
    #   row 1: 1.2 * 2 * -1 = -2.4;  0.9048374 * 2 * -2 = -3.6193497;  1.1051709 * 2 * -0.5
    #          = -1.1051709
    #   row 2: 0.8187308 * -1 * -1.5 = 1.2280961;  1.0 * -1 * -0.7 = 0.7
    # token_mean: loss = -(sum) / 5 = -(-5.1964245) / 5 = 1.0392849.
    loss, m = _policy("cispo", clip_eps_high=0.2)
    assert float(loss) == pytest.approx(1.0392849, rel=1e-6)
    assert float(m["cispo/clipfrac"]) == pytest.approx(1 / 5)
    # d loss / d log pi_t = -w_t A_t / 5: the clipped token keeps its gradient, -1.2 * 2 / 5.
    g = jax.grad(lambda lp: _policy("cispo", lp=lp, clip_eps_high=0.2)[0])(_LP)
    np.testing.assert_allclose(g[0], [-0.48, -0.3619350, -0.4420684], rtol=1e-5)
    np.testing.assert_allclose(g[1], [0.1637462, 0.2, 0.0], rtol=1e-5)
    # A lower bound clips row 2's first weight up to 0.9: 0.9 * -1 * -1.5 = 1.35 instead.
    loss_low, m = _policy("cispo", clip_eps_high=0.2, clip_eps_low=0.1)
    assert float(loss_low) == pytest.approx(1.0392849 - (1.35 - 1.2280961) / 5, rel=1e-6)
    assert float(m["cispo/clipfrac"]) == pytest.approx(2 / 5)


def test_sapo_golden():
    # tau_pos = 2 (row 1, A > 0), tau_neg = 4 (row 2): f(r) = sigmoid(tau (r - 1)) * 4 / tau.
    #   row 1: tau (r - 1) = [0.6997176, -0.1903252, 0.2103418] -> sigmoid = [0.6681252,
    #          0.4525618, 0.5523924] -> f = 2 * sigmoid = [1.3362503, 0.9051236, 1.1047849];
    #          f * A = [2.6725006, 1.8102473, 2.2095697]; row mean 2.2307726
    #   row 2: tau (r - 1) = [-0.7250770, 0.0] -> sigmoid = [0.3262760, 0.5] -> f = [0.3262760,
    #          0.5]; f * A = [-0.3262760, -0.5]; row mean -0.4131380
    # seq_mean_token_mean: (2.2307726 - 0.4131380) / 2 = 0.9088173 -> loss -0.9088173.
    loss, m = _policy("sapo", tau_pos=2.0, tau_neg=4.0)
    assert float(loss) == pytest.approx(-0.9088173, rel=1e-6)
    # Gradient weights w = 4 sigmoid (1 - sigmoid) r: row 1 [1.1972380, 0.8966925,
    # 1.0930363], row 2 [0.7198935, 1.0]; their mean over the 5 tokens:
    assert float(m["sapo/gate_mean"]) == pytest.approx(
        (1.1972380 + 0.8966925 + 1.0930363 + 0.7198935 + 1.0) / 5, rel=1e-6)
    # d loss / d log pi_t = -(1 / 2) (1 / |y|) w_t A_t.
    g = jax.grad(lambda lp: _policy("sapo", lp=lp, tau_pos=2.0, tau_neg=4.0)[0])(_LP)
    np.testing.assert_allclose(g[0], -np.array([1.1972380, 0.8966925, 1.0930363]) * 2 / 6,
                               rtol=1e-5)
    np.testing.assert_allclose(g[1], [0.7198935 / 4, 1.0 / 4, 0.0], rtol=1e-5)


@pytest.mark.parametrize("name", ["gspo", "cispo", "sapo"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean",
                                 "seq_mean_token_sum_norm(norm=4)"])
def test_ratio_losses_at_ratio_one_have_the_reinforce_gradient(name, agg):
    # On-policy (log pi = log pi_old) each loss's gradient is REINFORCE's, -A grad log pi
    # aggregated the same way: GSPO's s = 1 inside its clip range, CISPO's weight 1, SAPO's
    # gate slope 4 sigmoid(0) (1 - sigmoid(0)) * 1 = 1.
    lp = jnp.where(_M > 0, _LP, 0.0)
    adv = jnp.array([[2.0, 2.0, 2.0], [-1.0, 0.5, 3.0]])  # per token, for CISPO and SAPO

    def grad_of(loss_name, a):
        return jax.grad(lambda x: registry.call(
            registry.get("policy_loss", loss_name), logps=x, old_logps=lp, advantages=a,
            mask=_M, agg=agg)[0])(lp)

    a = _ADV if name == "gspo" else adv
    np.testing.assert_allclose(grad_of(name, a), grad_of("reinforce", a), rtol=1e-6,
                               atol=1e-8)


@pytest.mark.parametrize("name", ["gspo", "cispo", "sapo"])
def test_ratio_losses_gradient_raises_good_tokens_and_lowers_bad_ones(name):
    # Slightly off-policy, within GSPO's clip range when it is widened to 0.2.
    kw = {"clip_eps": 0.2, "clip_eps_high": 0.2} if name == "gspo" else {}
    lp = jnp.where(_M > 0, _LP, 0.0)
    old = lp - 0.01
    g = jax.grad(lambda x: registry.call(registry.get("policy_loss", name), logps=x,
                                         old_logps=old, advantages=_ADV, mask=_M, **kw)[0])(lp)
    assert np.all(np.asarray(g[0]) < 0)          # A = +2: descending raises log pi
    assert np.all(np.asarray(g[1, :2]) > 0)      # A = -1: descending lowers log pi
    assert float(g[1, 2]) == 0.0                 # padding
