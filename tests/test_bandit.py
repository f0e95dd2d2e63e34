"""The tabular optimum of DPO and IPO on a 6-armed bandit.

The policy is a softmax over 6 arms. Preference pairs (y, y') are drawn from pi_ref x pi_ref and
labelled y > y' with the Bradley–Terry probability sigmoid(r(y) - r(y')). Minimising each loss
over the whole population of pairs (an exact expectation, no sampling) must reach its known
optimum:
  DPO: pi*(y) proportional to pi_ref(y) exp(r(y) / beta)   (Rafailov et al. 2023, eq. 4)
  IPO: pi*(y) proportional to pi_ref(y) exp(p(y > mu) / tau), p(y > mu) = E_{y'~mu} p(y > y')
       with mu = pi_ref the pair-sampling distribution   (Azar et al. 2023, sec. 5)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import losses

PI_REF = jnp.array([0.30, 0.25, 0.15, 0.12, 0.10, 0.08])
REWARDS = jnp.array([0.0, 1.0, -0.5, 2.0, 0.5, 1.5])
N = 6


def _pairs():
    i, j = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    i, j = i.ravel(), j.ravel()
    p_win = jax.nn.sigmoid(REWARDS[i] - REWARDS[j])  # P(i > j)
    return i, j, PI_REF[i] * PI_REF[j] * p_win  # weight of "i chosen over j"


def _population_loss(loss_fn):
    i, j, w = _pairs()
    log_ref = jnp.log(PI_REF)

    def objective(theta):
        logp = jax.nn.log_softmax(theta)
        per_pair = jax.vmap(lambda a, b: loss_fn(
            policy_chosen_logps=logp[a][None], policy_rejected_logps=logp[b][None],
            ref_chosen_logps=log_ref[a][None], ref_rejected_logps=log_ref[b][None])[0])(i, j)
        return jnp.sum(w * per_pair)

    return objective


def _minimise(objective, steps=300):
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    @jax.jit
    def step(theta, state):
        value, grad = value_and_grad(theta, state=state)
        updates, state = opt.update(grad, state, theta, value=value, grad=grad,
                                    value_fn=objective)
        return optax.apply_updates(theta, updates), state

    theta = jnp.log(PI_REF)  # start at the reference policy
    state = opt.init(theta)
    for _ in range(steps):
        theta, state = step(theta, state)
    return jax.nn.softmax(theta)


def _tv(p, q):
    return 0.5 * float(jnp.sum(jnp.abs(p - q)))


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_dpo_reaches_the_kl_regularised_optimum(beta):
    pi = _minimise(_population_loss(lambda **kw: losses.dpo(**kw, beta=beta)))
    target = PI_REF * jnp.exp(REWARDS / beta)
    target = target / jnp.sum(target)
    assert _tv(pi, target) < 1e-3


def test_ipo_reaches_its_own_optimum():
    tau = 0.5
    pi = _minimise(_population_loss(lambda **kw: losses.ipo(**kw, tau=tau)))
    p_beats_mu = jnp.sum(jax.nn.sigmoid(REWARDS[:, None] - REWARDS[None, :]) * PI_REF[None, :],
                         axis=1)
    target = PI_REF * jnp.exp(p_beats_mu / tau)
    target = target / jnp.sum(target)
    assert _tv(pi, target) < 1e-3
    # ... which is not DPO's optimum for any matching beta: IPO's target saturates in r.
    dpo_target = PI_REF * jnp.exp(REWARDS / tau)
    assert _tv(pi, dpo_target / jnp.sum(dpo_target)) > 0.05
