"""KL estimators and KL-coefficient controllers.

Estimators take per-token log-probabilities of the sampled tokens under the policy (`logps`,
the sampling distribution) and the reference (`ref_logps`) and return a per-token estimate of
KL(pi || pi_ref), in float32. With log_ratio = log pi(y) - log pi_ref(y) and y ~ pi:

  k1 = log_ratio                               unbiased, high variance, can be negative
  k2 = 0.5 * log_ratio**2                      biased, low variance, >= 0
  k3 = (ratio - 1) - log(ratio),  ratio = pi_ref(y) / pi(y)
                                               unbiased, low variance, >= 0

(Schulman 2020, "Approximating KL divergence"). The log-ratio is clamped to +-LOG_RATIO_CLAMP
before any exp so that k3 stays finite for arbitrarily far-apart policies.

Controllers are pure: a `KLState` pytree holds the coefficient, and a registered update maps
(state, observed KL, number of samples) to the next state, so the state is jit-friendly and is
saved in a checkpoint like any other array.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax import registry, schema
from rlhf_jax.aggregation import select

# exp(20) ~ 4.9e8 is far from float32 overflow (3.4e38) and far beyond any ratio a healthy run
# produces; clamping only touches samples whose contribution is already meaningless.
LOG_RATIO_CLAMP = 20.0


def _log_ratio(logps, ref_logps):
    return jnp.asarray(logps, jnp.float32) - jnp.asarray(ref_logps, jnp.float32)


@registry.register("kl_estimator", args={})
def k1(*, logps, ref_logps):
    """k1 = log pi - log pi_ref per token (Schulman 2020). Shapes: any, elementwise."""
    return _log_ratio(logps, ref_logps)


@registry.register("kl_estimator", args={})
def k2(*, logps, ref_logps):
    """k2 = 0.5 * (log pi - log pi_ref)^2 per token; biased (Schulman 2020). Elementwise."""
    return 0.5 * jnp.square(_log_ratio(logps, ref_logps))


@registry.register("kl_estimator", args={})
def k3(*, logps, ref_logps):
    """k3 = (r - 1) - log r with r = pi_ref / pi, per token (Schulman 2020). Elementwise.

    Written as exp(-d) - 1 + d with d = log pi - log pi_ref; d is clamped to
    [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] so neither the value nor the gradient overflows.
    """
    d = jnp.clip(_log_ratio(logps, ref_logps), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.expm1(-d) + d


def estimate(*, logps, ref_logps, kind="k1", mask=None):
    """Per-token KL(pi || pi_ref) estimate by a registered estimator name; float32.

    Args:
      logps, ref_logps: [B, T] log-probs of the sampled tokens under pi and pi_ref.
      kind: "k1", "k2" or "k3" (or any registered kl_estimator).
      mask: optional [B, T], valid where mask > 0 (anything else, NaN included, is padding).
        Padded positions come out 0, and whatever they hold (-inf log-probs of padding, NaN)
        reaches neither a valid position nor the gradient: both log-probs are replaced by 0
        before the estimator runs, not only its output (k2 and k3 of -inf - -inf are NaN, and
        a `where` on the output alone would still give a NaN gradient there).
    Returns: [B, T] float32.
    """
    if mask is not None:
        logps, ref_logps = select(logps, mask), select(ref_logps, mask)
    est = registry.get("kl_estimator", kind)(logps=logps, ref_logps=ref_logps)
    return est if mask is None else select(est, mask)


class KLState(NamedTuple):
    """The state of a KL controller: the current coefficient beta (a float32 scalar)."""
    kl_coef: jax.Array


def init_controller(kl_coef: float) -> KLState:
    """The controller state at the start of a run, with beta = kl_coef."""
    return KLState(kl_coef=jnp.asarray(kl_coef, jnp.float32))


@registry.register("kl_controller", "fixed", args={})
def fixed_update(state: KLState, *, kl, n_steps) -> KLState:
    """Fixed controller: beta never changes (Ziegler et al. 2019, sec. 2.2, fixed beta)."""
    del kl, n_steps
    return state


@registry.register("kl_controller", "adaptive", args={
    "target": schema.Float(gt=0, doc="the sequence KL (nats) the coefficient steers towards"),
    "horizon": schema.Float(gt=0, doc="samples over which the coefficient adapts")})
def adaptive_update(state: KLState, *, kl, n_steps, target=6.0, horizon=10000.0) -> KLState:
    """Adaptive controller (Ziegler et al. 2019, sec. 2.2, eq. 2, in the form of their code).

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon),
    where KL is the observed mean sequence KL and n_steps the number of samples in the batch
    that produced it. The paper writes the gain as K_beta = 0.1; the released
    lm-human-preferences code uses n_steps / horizon, which scales the gain with the batch.
    The proportional error is clipped so one noisy batch cannot move beta by more than 20% of
    n_steps / horizon.
    """
    error = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    mult = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / horizon
    return KLState(kl_coef=state.kl_coef * mult)
