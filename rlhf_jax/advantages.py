"""Advantage estimators, reward shaping and normalisation.

The registered `advantage` estimators share one signature so that a config string swaps them:

    fn(*, rewards [B, T], mask [B, T], values [B, T]?, group_size?, ...) -> (advantages, returns)

with per-token (possibly KL-shaped) rewards in, and per-token advantages and returns out, zero
at padded positions. Sequence-level estimators (GRPO, RLOO) use the sequence return, the sum
of a row's rewards, and give every token of the row the same advantage.

Group layout: GRPO and RLOO sample G responses per prompt; rows [g*G, (g+1)*G) of the batch are
the G responses to prompt g (contiguous groups).
"""

import jax
import jax.numpy as jnp

from rlhf_jax import registry
from rlhf_jax.aggregation import last_token_index, masked_mean
from rlhf_jax.kl import estimate


def _f32(x):
    return jnp.asarray(x, jnp.float32)


@registry.register("advantage")
def gae(*, rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16) as a reverse lax.scan.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1}, where
    V_{t+1} and A_{t+1} are taken as 0 past the last valid token (the episode ends at EOS: no
    bootstrap). returns = A + V, the critic's regression target.
    Args: rewards, values, mask: [B, T]; mask 1 on response tokens (a contiguous run).
    Returns: (advantages [B, T], returns [B, T]) in float32, zero where mask is 0.
    lam = 0 gives one-step TD errors; gamma = lam = 1 gives (return-to-go) - V.
    """
    r, v, m = _f32(rewards), _f32(values), _f32(mask)
    next_m = jnp.pad(m[:, 1:], ((0, 0), (0, 1)))
    next_v = jnp.pad(v[:, 1:], ((0, 0), (0, 1))) * next_m
    deltas = r + gamma * next_v - v

    def step(a_next, xs):
        delta_t, cont_t = xs
        a_t = delta_t + gamma * lam * cont_t * a_next
        return a_t, a_t

    _, adv_tb = jax.lax.scan(step, jnp.zeros(r.shape[0], jnp.float32),
                             (deltas.T, next_m.T), reverse=True)
    adv = adv_tb.T * m
    return adv, (adv + v) * m


@registry.register("advantage", "reinforce")
def reward_to_go(*, rewards, mask, gamma=1.0):
    """REINFORCE advantages: the discounted return-to-go G_t = sum_k gamma^k r_{t+k}, no baseline.

    Equal to `gae` with V = 0 and lam = 1. Shapes [B, T]; returns (advantages, returns), equal.
    """
    g, _ = gae(rewards=rewards, values=jnp.zeros(jnp.shape(rewards)), mask=mask, gamma=gamma,
               lam=1.0)
    return g, g


def _groups(x, group_size):
    b = x.shape[0]
    if group_size < 1 or b % group_size:
        raise ValueError(f"batch of {b} rows is not a whole number of groups of {group_size}; "
                         "make the batch size a multiple of the number of samples per prompt")
    return x.reshape(b // group_size, group_size)


def group_normalized(rewards, group_size, scale=True, eps=1e-6):
    """GRPO advantages (Shao et al. 2024, sec. 4.1.2): (r - mean_group) / (std_group + eps).

    Args: rewards [B] (contiguous groups of `group_size`); scale=False keeps only the mean
      baseline (Dr. GRPO, Liu et al. 2025, which drops the std division). The std is the
      population std (ddof 0). Returns [B] float32.
    """
    g = _groups(_f32(rewards), group_size)
    adv = g - jnp.mean(g, axis=1, keepdims=True)
    if scale:
        adv = adv / (jnp.std(g, axis=1, keepdims=True) + eps)
    return adv.reshape(-1)


def leave_one_out(rewards, group_size):
    """RLOO advantages (Kool et al. 2019; Ahmadian et al. 2024, eq. 5): r_i - mean_{j!=i} r_j.

    Args: rewards [B] (contiguous groups of `group_size` >= 2). Returns [B] float32.
    """
    if group_size < 2:
        raise ValueError("leave-one-out needs at least 2 samples per prompt (group_size >= 2)")
    g = _groups(_f32(rewards), group_size)
    baseline = (jnp.sum(g, axis=1, keepdims=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def _sequence_advantage(rewards, mask, seq_adv_fn):
    m = _f32(mask)
    seq_return = jnp.sum(_f32(rewards) * m, axis=-1)
    adv = seq_adv_fn(seq_return)
    return adv[:, None] * m, seq_return[:, None] * m


@registry.register("advantage")
def grpo(*, rewards, mask, group_size, scale=True, eps=1e-6):
    """GRPO: the group-normalised sequence return on every token of the row. [B, T]."""
    return _sequence_advantage(rewards, mask,
                               lambda s: group_normalized(s, group_size, scale=scale, eps=eps))


@registry.register("advantage")
def dr_grpo(*, rewards, mask, group_size):
    """Dr. GRPO (Liu et al. 2025): GRPO's group-mean baseline without the std division. [B, T]."""
    return grpo(rewards=rewards, mask=mask, group_size=group_size, scale=False)


@registry.register("advantage")
def rloo(*, rewards, mask, group_size):
    """RLOO: the leave-one-out baselined sequence return on every token of the row. [B, T]."""
    return _sequence_advantage(rewards, mask, lambda s: leave_one_out(s, group_size))


def top_of_group(scores, group_size, top=1):
    """1.0 for the `top` highest scores of each group, 0.0 for the rest. [B] float32.

    Ties go to the earlier row of the group, as argmax does."""
    if not 1 <= top < group_size:
        raise ValueError(f"top={top} must be in [1, group_size={group_size}): keeping every "
                         "sample of a group selects nothing")
    g = _groups(_f32(scores), group_size)
    rank = jnp.argsort(jnp.argsort(-g, axis=1, stable=True), axis=1, stable=True)  # 0 = best
    return (rank < top).astype(jnp.float32).reshape(-1)


@registry.register("advantage")
def best_of_n(*, rewards, mask, group_size, top=1):
    """Rejection-sampling fine-tuning: weight 1 on the `top` best of each prompt's G samples
    by sequence return, 0 on the rest.

    With policy_loss="reinforce" the loss is -log pi summed over the kept completions' tokens:
    the SFT loss on the best of n, re-sampled from the current policy every iteration (RAFT,
    Dong et al. 2023; the rejection-sampling stage of Llama 2, Touvron et al. 2023, sec. 3.2.3).
    The weights are a selection, not a baseline: do not whiten them. [B, T].
    """
    return _sequence_advantage(rewards, mask, lambda s: top_of_group(s, group_size, top))


def whiten(x, mask=None, shift_mean=True, eps=1e-8):
    """(x - mean) / std over the valid entries of x; padded entries come out 0.

    shift_mean=False adds the mean back, rescaling only: the form used for rewards, whose
    sign carries meaning (Ziegler et al. 2019; Huang et al. 2022, "The N+ implementation
    details of RLHF with PPO"). The variance is the population variance (ddof 0). Any shape.
    """
    x = _f32(x)
    m = jnp.ones_like(x) if mask is None else _f32(mask)
    mean = masked_mean(x, m)
    var = masked_mean(jnp.square(x - mean), m)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def kl_shaped_rewards(*, scores, logps, ref_logps, mask, kl_coef, estimator="k1"):
    """Per-token rewards -kl_coef * KL_t, plus the sequence score at the last valid token.

    r_t = -beta * k(log pi(y_t), log pi_ref(y_t)) + [t = last] * score  (Ziegler et al. 2019,
    eq. 2 spread over tokens; Stiennon et al. 2020, eq. 1). Summed over a row this is the
    score minus beta times the sequence KL estimate: the KL-regularised return.
    Args: scores [B] (reward-model or gold score of each response); logps, ref_logps,
      mask [B, T]; kl_coef a scalar (may be traced: adaptive beta); estimator a kl_estimator
      name. A row with no valid token has nowhere to hold its score and gets all zeros.
    Returns: [B, T] float32, zero where mask is 0.
    """
    m = _f32(mask)
    kl = estimate(logps=logps, ref_logps=ref_logps, kind=estimator, mask=m)
    at_last = jax.nn.one_hot(last_token_index(m), m.shape[-1], dtype=jnp.float32) * m
    return -_f32(kl_coef) * kl + _f32(scores)[:, None] * at_last
