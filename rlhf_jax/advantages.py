"""Advantage estimators, reward shaping and normalisation.

The registered `advantage` estimators share one signature so that a config string swaps them:

    fn(*, rewards [B, T], mask [B, T], values [B, T]?, group_size?, ...) -> (advantages, returns)

with per-token (possibly KL-shaped) rewards in, and per-token advantages and returns out, zero
at padded positions. Sequence-level estimators (GRPO, RLOO) use the sequence return, the sum
of a row's rewards, and give every token of the row the same advantage.

Masks: a position is valid where mask > 0 (0/1 or bool; a NaN entry is padding). Every
function here selects its inputs with `aggregation.select` before any arithmetic, never
multiplies by the mask, so whatever padded positions hold (NaN, inf, -inf log-probs, 1e30)
changes no output at a valid position and no gradient (inf * 0 would be NaN).

Group layout: GRPO and RLOO sample G responses per prompt; rows [g*G, (g+1)*G) of the batch are
the G responses to prompt g (contiguous groups).
"""

import jax
import jax.numpy as jnp

from rlhf_jax import registry, schema
from rlhf_jax.aggregation import last_token_index, masked_mean, select, valid
from rlhf_jax.kl import estimate


def _f32(x):
    return jnp.asarray(x, jnp.float32)


_GAMMA = schema.Float(ge=0, le=1, doc="discount factor")


@registry.register("advantage", args={
    "gamma": _GAMMA, "lam": schema.Float(ge=0, le=1, doc="GAE bias-variance trade-off")})
def gae(*, rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16) as a reverse lax.scan.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1}, where
    V_{t+1} and A_{t+1} are taken as 0 past the last valid token (the episode ends at EOS: no
    bootstrap). returns = A + V, the critic's regression target.
    Args: rewards, values, mask: [B, T]; mask valid (> 0) on response tokens (a contiguous
      run: a hole ends the recursion there).
    Returns: (advantages [B, T], returns [B, T]) in float32, zero where mask is not > 0;
      padded rewards and values never reach a valid position.
    lam = 0 gives one-step TD errors; gamma = lam = 1 gives (return-to-go) - V.
    """
    ok = valid(mask)
    r, v = select(rewards, ok), select(values, ok)
    next_ok = jnp.pad(ok[:, 1:], ((0, 0), (0, 1)))  # False past the end: no bootstrap
    next_v = jnp.where(next_ok, jnp.pad(v[:, 1:], ((0, 0), (0, 1))), 0.0)
    deltas = r + gamma * next_v - v

    def step(a_next, xs):
        delta_t, cont_t = xs
        # Select, not cont_t * a_next: the recursion stops at the last valid token.
        a_t = delta_t + gamma * lam * jnp.where(cont_t, a_next, 0.0)
        return a_t, a_t

    _, adv_tb = jax.lax.scan(step, jnp.zeros(r.shape[0], jnp.float32),
                             (deltas.T, next_ok.T), reverse=True)
    adv = jnp.where(ok, adv_tb.T, 0.0)
    return adv, jnp.where(ok, adv + v, 0.0)


@registry.register("advantage", "reinforce", args={"gamma": _GAMMA})
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


def _shifted_groups(rewards, group_size):
    """Groups [B/G, G] of rewards minus the group's first reward, and which groups are tied.

    Subtracting a member of the group before averaging (the "shifted data" form of the mean
    and variance, Chan, Golub & LeVeque 1983) makes a group of equal rewards exactly 0: the
    float32 mean of eight rewards of 0.7 is off by ~1e-7 * |r|, which divided by (std + eps)
    gave the whole group an advantage of one sign (0.056; 0.94 for sixteen of 123.4). It also
    keeps near-ties accurate. A group is tied when its max equals its min.
    """
    g = _groups(_f32(rewards), group_size)
    tied = jnp.max(g, axis=1, keepdims=True) == jnp.min(g, axis=1, keepdims=True)
    return g - g[:, :1], tied


def group_normalized(rewards, group_size, scale=True, eps=1e-6):
    """GRPO advantages (Shao et al. 2024, sec. 4.1.2): (r - mean_group) / (std_group + eps).

    Args: rewards [B] (contiguous groups of `group_size`); scale=False keeps only the mean
      baseline (Dr. GRPO, Liu et al. 2025, which drops the std division). The std is the
      population std (ddof 0); eps >= 0 (0 gives the plain (r - mean) / std).
    Returns [B] float32. A tied group (all rewards equal, whatever their value) has advantage
      exactly 0 and a zero gradient: it carries no preference between its samples.
    """
    if isinstance(eps, (int, float)) and not eps >= 0:
        raise ValueError(f"group_normalized: eps must be >= 0, got {eps}")
    d, tied = _shifted_groups(rewards, group_size)
    adv = d - jnp.mean(d, axis=1, keepdims=True)
    # Returns that differ only below the smallest normal float (1.2e-38) leave deviations that
    # XLA flushes to zero: no preference is left to normalise, so such a group counts as tied.
    tied = tied | (jnp.max(jnp.abs(adv), axis=1, keepdims=True) == 0)
    if scale:
        # adv / (std + eps) computed as unit / (std(unit) + eps / peak), unit = adv / peak with
        # peak = max |adv|: the squares lie in [0, 1], so they neither overflow (rewards ~1e20)
        # nor underflow (deviations ~1e-25), and std(unit) >= 1 / sqrt(G) for an untied group,
        # so eps = 0 is safe. The expression is the same for any constant in place of peak, so
        # holding peak fixed (stop_gradient) gives the exact gradient without a peak^2 term that
        # underflows. Tied groups take peak = 1 and a mean of 1 (the "double where"): sqrt's
        # gradient at 0 is inf, and 0 * inf would be NaN even though the value is selected away.
        peak = jax.lax.stop_gradient(
            jnp.where(tied, 1.0, jnp.max(jnp.abs(adv), axis=1, keepdims=True)))
        unit = adv / peak
        std_unit = jnp.sqrt(jnp.where(tied, 1.0,
                                      jnp.mean(jnp.square(unit), axis=1, keepdims=True)))
        adv = jnp.where(tied, 0.0, unit / (std_unit + eps / peak))
    return adv.reshape(-1)


def leave_one_out(rewards, group_size):
    """RLOO advantages (Kool et al. 2019; Ahmadian et al. 2024, eq. 5): r_i - mean_{j!=i} r_j.

    Args: rewards [B] (contiguous groups of `group_size` >= 2). Returns [B] float32; a tied
      group (all rewards equal) has advantage exactly 0 (see `_shifted_groups`).
    """
    if group_size < 2:
        raise ValueError("leave-one-out needs at least 2 samples per prompt (group_size >= 2)")
    d, tied = _shifted_groups(rewards, group_size)
    baseline = (jnp.sum(d, axis=1, keepdims=True) - d) / (group_size - 1)
    return jnp.where(tied, 0.0, d - baseline).reshape(-1)


def _sequence_advantage(rewards, mask, seq_adv_fn):
    """(advantages, returns) [B, T]: seq_adv_fn of each row's summed valid rewards, on its
    valid tokens; padded rewards are selected away before the sum."""
    ok = valid(mask)
    seq_return = jnp.sum(select(rewards, ok), axis=-1)
    adv = seq_adv_fn(seq_return)
    return jnp.where(ok, adv[:, None], 0.0), jnp.where(ok, seq_return[:, None], 0.0)


@registry.register("advantage", args={
    "scale": schema.Bool(doc="divide by the group std"),
    "eps": schema.Float(ge=0, doc="added to the group std")})
def grpo(*, rewards, mask, group_size, scale=True, eps=1e-6):
    """GRPO: the group-normalised sequence return on every token of the row. [B, T].

    A group whose sequence returns are all equal gets advantage exactly 0 (see
    `group_normalized`); rows with no valid token count as a return of 0 in their group.
    """
    return _sequence_advantage(rewards, mask,
                               lambda s: group_normalized(s, group_size, scale=scale, eps=eps))


@registry.register("advantage", args={})
def dr_grpo(*, rewards, mask, group_size):
    """Dr. GRPO (Liu et al. 2025): GRPO's group-mean baseline without the std division. [B, T]."""
    return grpo(rewards=rewards, mask=mask, group_size=group_size, scale=False)


@registry.register("advantage", args={})
def rloo(*, rewards, mask, group_size):
    """RLOO: the leave-one-out baselined sequence return on every token of the row. [B, T]."""
    return _sequence_advantage(rewards, mask, lambda s: leave_one_out(s, group_size))


def batch_normalized(x, mask, eps=1e-6):
    """(x - mean) / (std + eps) over the valid entries of x [B, T] (the whole batch), 0 at
    padded entries.

    The same arithmetic as `group_normalized`, with the batch's valid entries as one group:
    the first valid entry is subtracted before the mean (shifted data), so a batch of equal
    values is exactly 0; a tied batch (max == min over the valid entries, or deviations that
    flush to 0) gives 0 with a zero gradient; the std is the population std (ddof 0) of the
    deviations divided by their (constant) maximum, so eps = 0 is safe and values of 1e20 or
    deviations of 1e-25 neither overflow nor underflow. Valid where mask > 0; padded entries
    are selected away before any arithmetic.
    """
    if isinstance(eps, (int, float)) and not eps >= 0:
        raise ValueError(f"batch_normalized: eps must be >= 0, got {eps}")
    ok = valid(mask)
    x = select(x, ok)
    first = jnp.argmax(ok.reshape(-1))  # 0 when nothing is valid; then everything is 0 below
    d = jnp.where(ok, x - x.reshape(-1)[first], 0.0)
    adv = jnp.where(ok, d - masked_mean(d, ok), 0.0)
    peak = jnp.max(jnp.abs(adv))
    tied = (jnp.max(jnp.where(ok, x, -jnp.inf)) == jnp.min(jnp.where(ok, x, jnp.inf))) | (
        peak == 0)
    # As in group_normalized: a constant scale (stop_gradient) is exact, and the double where
    # keeps sqrt's infinite derivative at 0 out of a tied batch's gradient.
    peak = jax.lax.stop_gradient(jnp.where(tied, 1.0, peak))
    unit = adv / peak
    std_unit = jnp.sqrt(jnp.where(tied, 1.0, masked_mean(jnp.square(unit), ok)))
    return jnp.where(ok & ~tied, unit / (std_unit + eps / peak), 0.0)


@registry.register("advantage", args={})
def remax(*, rewards, mask, baseline):
    """ReMax (Li et al. 2024, eq. 7): the sequence return minus the return of the greedy
    completion of the same prompt, on every valid token. [B, T].

    baseline [B]: the greedy completion's return for each row's prompt (the RL trainer decodes
    it greedily with the same reward and the KL of a greedy completion; rows of a prompt share
    it). A variance-reducing baseline that needs no critic and one extra greedy rollout.
    """
    return _sequence_advantage(rewards, mask, lambda s: s - _f32(baseline))


@registry.register("advantage", args={
    "gamma": _GAMMA, "eps": schema.Float(ge=0, doc="added to the batch std")})
def reinforce_pp(*, rewards, mask, gamma=1.0, eps=1e-6):
    """REINFORCE++ (Hu et al. 2025, arXiv:2501.03262): each token's return-to-go, normalised
    over the whole batch. [B, T].

    A_t = sum_{k >= t} gamma^(k-t) r_k: with the KL already in the per-token rewards (the
    trainer's kl.in_reward) this is the paper's r(x, y) - beta sum_{i >= t} KL_i (gamma = 1);
    with only a score on the last token it is the sequence return on every token. Then
    A_norm = (A - mean) / (std + eps), the mean and std over ALL valid tokens of the batch
    (global normalisation, not per prompt group as GRPO), by `batch_normalized`: a tied batch
    (every valid return equal) is exactly 0. No group is needed, so one sample per prompt is
    fine (the trainer passes no group_size).
    Args: rewards, mask [B, T] (valid where mask > 0); gamma (1 in the paper); eps >= 0 (the
      paper's implementation divides by sqrt(var + 1e-8); std + 1e-6 here, as GRPO does).
    Returns: (advantages, returns) [B, T]: the normalised advantages and the raw
      returns-to-go, 0 at padded positions.
    """
    ok = valid(mask)
    returns, _ = reward_to_go(rewards=select(rewards, ok), mask=ok, gamma=gamma)
    return batch_normalized(returns, ok, eps=eps), jnp.where(ok, returns, 0.0)


def top_of_group(scores, group_size, top=1):
    """1.0 for the `top` highest scores of each group, 0.0 for the rest. [B] float32.

    Ties go to the earlier row of the group, as argmax does."""
    if not 1 <= top < group_size:
        raise ValueError(f"top={top} must be in [1, group_size={group_size}): keeping every "
                         "sample of a group selects nothing")
    g = _groups(_f32(scores), group_size)
    rank = jnp.argsort(jnp.argsort(-g, axis=1, stable=True), axis=1, stable=True)  # 0 = best
    return (rank < top).astype(jnp.float32).reshape(-1)


@registry.register("advantage", args={
    "top": schema.Int(ge=1, doc="completions kept per prompt; fewer than samples_per_prompt")})
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
    mask: valid where > 0 (None: all valid); padded entries are selected away before the
    statistics, so whatever they hold changes no valid output.
    """
    ok = jnp.ones(jnp.shape(x), bool) if mask is None else valid(mask)
    x = select(x, ok)
    mean = masked_mean(x, ok)
    var = masked_mean(jnp.square(x - mean), ok)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(ok, out, 0.0)


def kl_shaped_rewards(*, scores, logps, ref_logps, mask, kl_coef, estimator="k1"):
    """Per-token rewards -kl_coef * KL_t, plus the sequence score at the last valid token.

    r_t = -beta * k(log pi(y_t), log pi_ref(y_t)) + [t = last] * score  (Ziegler et al. 2019,
    eq. 2 spread over tokens; Stiennon et al. 2020, eq. 1). Summed over a row this is the
    score minus beta times the sequence KL estimate: the KL-regularised return.
    Args: scores [B] (reward-model or gold score of each response); logps, ref_logps,
      mask [B, T], valid where > 0; kl_coef a scalar (may be traced: adaptive beta);
      estimator a kl_estimator name. A row with no valid token has nowhere to hold its score
      and gets all zeros (its score is selected away, not multiplied by 0).
    Returns: [B, T] float32, zero where mask is not > 0; padded log-probs (-inf, NaN) reach
      neither a valid position nor the gradient (see `kl.estimate`).
    """
    ok = valid(mask)
    kl = estimate(logps=logps, ref_logps=ref_logps, kind=estimator, mask=ok)
    at_last = (jnp.arange(ok.shape[-1]) == last_token_index(ok)[:, None]) & ok
    return jnp.where(ok, -_f32(kl_coef) * kl, 0.0) + jnp.where(at_last, _f32(scores)[:, None],
                                                                0.0)
