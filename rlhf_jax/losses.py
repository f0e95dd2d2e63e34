"""Pure RLHF losses over arrays.

Every loss is keyword-only, takes arrays (never a model, mesh or config), computes in float32
whatever the input dtype, and returns `(loss, metrics)` with `metrics` a flat dict of float32
scalars namespaced by the loss ("rm/accuracy", "dpo/margin", "ppo/clipfrac"). Token-level
losses reduce through `rlhf_jax.aggregation` so that micro-batches and shards add up exactly.

Shapes: B batch (pairs or sequences), T tokens, K items in a ranking, V vocabulary.
The formulas, conventions and sources are listed in docs/implementation_details.md.
"""

import jax
import jax.numpy as jnp

from rlhf_jax import registry, schema
from rlhf_jax.aggregation import aggregate, masked_mean, select
from rlhf_jax.kl import LOG_RATIO_CLAMP

# |advantage| above this is clamped in `ppo_clip`. The ratio reaches exp(LOG_RATIO_CLAMP) ~ 4.9e8
# at its clamp, so an advantage of 1e30 would make ratio * A overflow float32 (3.4e38) and the
# loss inf. 1e20 * 4.9e8 ~ 4.9e28 leaves room to sum ~7e9 such tokens; only advantages no
# healthy run produces (whitened ones are O(1), GRPO's at most sqrt(G)) are touched.
ADVANTAGE_CLAMP = 1e20


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _per_token(x, mask):
    """A per-token input as float32 [B, T] constants: [B] or [B, 1] broadcast over tokens,
    0 at padded positions whatever they held (see `aggregation.select`)."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 1:  # [B] per-sequence values; never let [B] broadcast along T when B == T
        x = x[:, None]
    return jax.lax.stop_gradient(select(jnp.broadcast_to(x, jnp.shape(mask)), mask))


def _require(ok, message):
    """Validates a hyperparameter when it is a concrete Python number (not a traced value)."""
    if isinstance(ok, bool) and not ok:
        raise ValueError(message)


def _positive(x):
    return x > 0 if isinstance(x, (int, float)) else None


def _in_range(x, lo, hi):
    return lo <= x < hi if isinstance(x, (int, float)) else None


def _win_rate(margin):
    """Fraction of pairs ordered correctly; an exact tie counts as half a win."""
    return jnp.mean(jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0)))


# ---------------------------------------------------------------------------------------------
# Reward modelling
# ---------------------------------------------------------------------------------------------

@registry.register("reward_loss", args={
    "margin": schema.Float(ge=0, optional=True, doc="a constant margin every pair must clear"),
    "center_coef": schema.Float(ge=0, doc="weight of the reward-centering term")})
def bradley_terry(*, chosen_rewards, rejected_rewards, margin=None, center_coef=0.0):
    """Bradley–Terry pairwise loss, -log sigmoid(r+ - r- - m), averaged over pairs.

    Args:
      chosen_rewards, rejected_rewards: [B] scalar rewards of the preferred / other response.
      margin: optional [B] per-pair margin m subtracted inside the sigmoid (Llama 2, Touvron et
        al. 2023, eq. 2): pairs rated far apart must be separated by at least m.
      center_coef: weight of the centering term coef * mean((r+ + r-)^2) (Eisenstein et al.
        2023), which pins the otherwise free additive constant of the reward near zero. With
        center_coef = 0 the term is not computed, so any finite rewards give a finite loss.
    Returns: (loss, metrics) with rm/loss, rm/accuracy (ties count half), rm/margin (mean of
      r+ - r-), rm/chosen_reward, rm/rejected_reward.
    Source: Bradley & Terry 1952; reward modelling as in Ouyang et al. 2022, eq. 1. The
      gradient is dL/dr+ = sigmoid(Delta) - 1 = -dL/dr-.
    """
    rc, rr = _f32(chosen_rewards), _f32(rejected_rewards)
    diff = rc - rr
    logits = diff if margin is None else diff - _f32(margin)
    nll = jnp.mean(jax.nn.softplus(-logits))  # -log sigmoid(x) = softplus(-x), stable both ways
    loss = nll
    # A zero coefficient means no term at all, not 0 * term: (r+ + r-)^2 overflows float32 for
    # |r| >= ~1.8e19 and 0 * inf is NaN. A Python 0 (the default) skips it when tracing; a
    # traced coefficient selects the sum away before squaring, so the gradient is clean too.
    if not (isinstance(center_coef, (int, float)) and center_coef == 0):
        on = jnp.asarray(center_coef, jnp.float32) != 0
        total = jnp.where(on, rc + rr, 0.0)
        loss = loss + center_coef * jnp.mean(jnp.square(total))
    return loss, {
        "rm/loss": nll,
        "rm/accuracy": _win_rate(diff),
        "rm/margin": jnp.mean(diff),
        "rm/chosen_reward": jnp.mean(rc),
        "rm/rejected_reward": jnp.mean(rr),
    }


@registry.register("reward_loss", args={})
def plackett_luce(*, rewards):
    """Plackett–Luce K-wise ranking loss for rewards ordered best first, averaged over B.

    -log P(ranking) = -sum_{k=1}^{K} [ r_k - logsumexp(r_k, ..., r_K) ]; for K = 2 this is the
    Bradley–Terry loss. Args: rewards [B, K], column 0 the best. Returns (loss, metrics) with
    rm/loss, rm/top1_accuracy (the best item scores highest; ties share the win) and
    rm/pairwise_accuracy.
    Source: Plackett 1975, Luce 1959; K-wise reward modelling as in Zhu et al. 2023.
    """
    r = _f32(rewards)
    k = r.shape[-1]
    at_max = r == jnp.max(r, axis=-1, keepdims=True)
    # The best item "wins" top-1 in proportion to how many items tie with it at the maximum.
    top1 = jnp.mean(jnp.where(at_max[:, 0], 1.0 / jnp.sum(at_max, axis=-1), 0.0))
    suffix_lse = jax.lax.cumlogsumexp(r, axis=r.ndim - 1, reverse=True)
    nll = jnp.mean(jnp.sum(suffix_lse - r, axis=-1))
    upper = jnp.triu(jnp.ones((k, k), bool), k=1)  # pairs (i, j) with i ranked above j
    pair_margins = r[:, :, None] - r[:, None, :]
    wins = jnp.where(pair_margins > 0, 1.0, jnp.where(pair_margins == 0, 0.5, 0.0))
    pairwise = jnp.sum(wins * upper) / (r.shape[0] * jnp.sum(upper))
    return nll, {
        "rm/loss": nll,
        "rm/top1_accuracy": top1,
        "rm/pairwise_accuracy": pairwise,
    }


# ---------------------------------------------------------------------------------------------
# Direct alignment (summed sequence log-probs, shape [B])
# ---------------------------------------------------------------------------------------------

def _implicit_reward_metrics(prefix, chosen, rejected):
    margin = chosen - rejected
    return {
        f"{prefix}/chosen_reward": jnp.mean(chosen),
        f"{prefix}/rejected_reward": jnp.mean(rejected),
        f"{prefix}/margin": jnp.mean(margin),
        f"{prefix}/accuracy": _win_rate(margin),
    }


_BETA = schema.Float(gt=0, doc="inverse temperature of the implicit reward")
_SMOOTHING = schema.Float(ge=0, lt=0.5, doc="probability that a label is flipped")


@registry.register("pref_loss", args={"beta": _BETA, "label_smoothing": _SMOOTHING})
def dpo(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta=0.1, label_smoothing=0.0):
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7), averaged over pairs.

    h = beta * [(log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-))];
    loss = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h), eps = label_smoothing. eps > 0 is
    conservative DPO (cDPO, Mitchell 2023): labels are taken to be flipped with probability eps.
    Args: the four log-probs, each [B] (summed over response tokens).
    Returns: (loss, metrics) with dpo/loss and the implicit rewards beta * log(pi / pi_ref) of
      chosen and rejected (dpo/chosen_reward, dpo/rejected_reward), their margin and accuracy.
    """
    _require(_positive(beta), f"dpo: beta must be > 0, got {beta}")
    _require(_in_range(label_smoothing, 0.0, 0.5),
             f"dpo: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = beta * (_f32(policy_chosen_logps) - _f32(ref_chosen_logps))
    rejected = beta * (_f32(policy_rejected_logps) - _f32(ref_rejected_logps))
    h = chosen - rejected
    loss = jnp.mean((1.0 - label_smoothing) * jax.nn.softplus(-h)
                    + label_smoothing * jax.nn.softplus(h))
    return loss, {"dpo/loss": loss, **_implicit_reward_metrics("dpo", chosen, rejected)}


@registry.register("pref_loss", args={"beta": _BETA, "label_smoothing": _SMOOTHING})
def cdpo(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
         beta=0.1, label_smoothing=0.1):
    """Conservative DPO (Mitchell 2023): `dpo` with label smoothing, 0.1 unless given. [B]."""
    return dpo(policy_chosen_logps=policy_chosen_logps,
               policy_rejected_logps=policy_rejected_logps,
               ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
               beta=beta, label_smoothing=label_smoothing)


@registry.register("pref_loss", args={
    "tau": schema.Float(gt=0, doc="regularisation; the target margin is 1 / (2 tau)")})
def ipo(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        tau=0.1, chosen_lengths=None, rejected_lengths=None):
    """Identity Preference Optimisation (Azar et al. 2023, eq. 17), averaged over pairs.

    h = lr(y+) - lr(y-) with lr(y) = (log pi(y) - log pi_ref(y)) / |y|;
    loss = (h - 1 / (2 tau))^2. The squared loss pulls h to a finite target instead of
    pushing it to infinity as DPO does on deterministic preferences. Log-ratios are averaged
    over response length when lengths are given (as in common implementations); pass
    lengths of None for the per-sequence form of the paper.
    Args: the four log-probs [B]; tau > 0; chosen_lengths, rejected_lengths [B] or None.
    Returns: (loss, metrics) with ipo/loss and implicit rewards tau * lr of chosen and rejected.
    """
    _require(_positive(tau), f"ipo: tau must be > 0, got {tau}")
    lr_c = _f32(policy_chosen_logps) - _f32(ref_chosen_logps)
    lr_r = _f32(policy_rejected_logps) - _f32(ref_rejected_logps)
    if chosen_lengths is not None:
        lr_c = lr_c / jnp.maximum(_f32(chosen_lengths), 1.0)
    if rejected_lengths is not None:
        lr_r = lr_r / jnp.maximum(_f32(rejected_lengths), 1.0)
    loss = jnp.mean(jnp.square(lr_c - lr_r - 1.0 / (2.0 * tau)))
    return loss, {"ipo/loss": loss, **_implicit_reward_metrics("ipo", tau * lr_c, tau * lr_r)}


@registry.register("pref_loss", args={
    "beta": schema.Float(gt=0, doc="scale of the length-normalised reward"),
    "gamma": schema.Float(ge=0, doc="target reward margin")})
def simpo(*, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
          beta=2.0, gamma=1.0):
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, with a margin.

    loss = -log sigmoid(beta * log pi(y+) / |y+| - beta * log pi(y-) / |y-| - gamma).
    Args: policy log-probs [B] (summed), lengths [B] (response tokens), beta, gamma (the target
      reward margin, in reward units). Returns (loss, metrics) with simpo/loss and the rewards
      beta * log pi(y) / |y| of chosen and rejected, their margin and accuracy.
    """
    _require(_positive(beta), f"simpo: beta must be > 0, got {beta}")
    chosen = beta * _f32(policy_chosen_logps) / jnp.maximum(_f32(chosen_lengths), 1.0)
    rejected = beta * _f32(policy_rejected_logps) / jnp.maximum(_f32(rejected_lengths), 1.0)
    loss = jnp.mean(jax.nn.softplus(-(chosen - rejected - gamma)))
    return loss, {"simpo/loss": loss, **_implicit_reward_metrics("simpo", chosen, rejected)}


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x (Maechler 2012)."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


@registry.register("pref_loss", args={
    "lam": schema.Float(ge=0, doc="weight of the odds-ratio term beside the SFT loss")})
def orpo(*, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
         chosen_nll, lam=0.1):
    """ORPO (Hong et al. 2024, eqs. 6-7): SFT loss plus an odds-ratio preference term.

    With the length-averaged log-probability a(y) = log pi(y) / |y| and
    log odds(y) = a - log(1 - exp(a)):  loss = NLL(y+) - lam * log sigmoid(log odds(y+) -
    log odds(y-)). a is clamped to <= -1e-6 so the odds of a certain sequence stay finite.
    Args: policy log-probs [B] (summed), lengths [B], chosen_nll [B] (the SFT loss of the
      chosen response, e.g. its mean token NLL), lam the weight of the odds-ratio term.
    Returns: (loss, metrics) with orpo/loss, orpo/nll, orpo/log_odds_ratio and the rewards
      lam * a(y) of chosen and rejected, their margin and accuracy.
    """
    a_c = jnp.minimum(_f32(policy_chosen_logps) / jnp.maximum(_f32(chosen_lengths), 1.0), -1e-6)
    a_r = jnp.minimum(_f32(policy_rejected_logps) / jnp.maximum(_f32(rejected_lengths), 1.0),
                      -1e-6)
    log_odds_ratio = (a_c - _log1mexp(a_c)) - (a_r - _log1mexp(a_r))
    ratio_loss = jnp.mean(jax.nn.softplus(-log_odds_ratio))
    nll = jnp.mean(_f32(chosen_nll))
    loss = nll + lam * ratio_loss
    return loss, {
        "orpo/loss": loss,
        "orpo/nll": nll,
        "orpo/ratio_loss": ratio_loss,
        "orpo/log_odds_ratio": jnp.mean(log_odds_ratio),
        **_implicit_reward_metrics("orpo", lam * a_c, lam * a_r),
    }


# ---------------------------------------------------------------------------------------------
# Policy optimisation (per-token arrays [B, T] with a 0/1 mask)
# ---------------------------------------------------------------------------------------------

@registry.register("policy_loss", args={
    "clip_eps": schema.Float(gt=0, lt=1, doc="the ratio is clipped to [1 - eps, 1 + eps]"),
    "clip_eps_high": schema.Float(gt=0, optional=True, doc="upper clip range (clip-higher)"),
    "dual_clip": schema.Float(gt=1, optional=True, doc="floor c * A on negative advantages")})
def ppo_clip(*, logps, old_logps, advantages, mask, clip_eps=0.2, clip_eps_high=None,
             dual_clip=None, agg="token_mean", normalizer=None):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ratio = exp(logps - old_logps);  objective = min(ratio * A, clip(ratio, 1 - eps_low,
    1 + eps_high) * A), always the min whatever the sign of A. With dual_clip = c > 1 the
    objective of a token with A < 0 is also floored at c * A (Ye et al. 2020, eq. 5), bounding
    the update from a huge ratio on a bad token. loss = -aggregate(objective).
    Args:
      logps, old_logps: [B, T] log-probs of the taken tokens under the current and the
        sampling policy. advantages: [B, T], or [B] / [B, 1] per sequence. mask: [B, T] 0/1.
        Advantages and old log-probs are constants: their gradients are stopped.
      clip_eps: eps_low (and eps_high unless clip_eps_high is given: the asymmetric
        "clip-higher" of Yu et al. 2025, DAPO).
      agg: a loss_agg name/spec; normalizer: the whole batch's denominator for micro-batches.
    Returns: (loss, metrics) with ppo/policy_loss, ppo/clipfrac (fraction of valid tokens
      where the clipped branch is active), ppo/approx_kl (k3 estimate of KL(old || new)),
      ppo/ratio_mean, ppo/ratio_max and, with dual_clip, ppo/dual_clipfrac.
    The mask is valid where > 0; padded positions of all three inputs are selected away
    before any arithmetic, so whatever they hold (-inf, NaN) changes neither the loss, the
    metrics nor the gradient. The log-ratio is clamped to +-LOG_RATIO_CLAMP before exp so the
    ratio stays finite, and |A| to ADVANTAGE_CLAMP so that ratio * A does too.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    _require(_positive(clip_eps) and _positive(eps_high),
             f"ppo_clip: clip ranges must be > 0, got {clip_eps}, {eps_high}")
    _require(dual_clip is None or _in_range(dual_clip, 1.0 + 1e-12, float("inf")),
             f"ppo_clip: dual_clip must be > 1 (e.g. 3.0), got {dual_clip}")
    m = _f32(mask)
    adv = jnp.clip(_per_token(advantages, m), -ADVANTAGE_CLAMP, ADVANTAGE_CLAMP)
    old = jax.lax.stop_gradient(select(old_logps, m))
    # Padded positions get a log-ratio of 0 before the exp: padding may hold -inf log-probs.
    log_ratio = select(logps, m) - old
    log_ratio = jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high) * adv
    objective = jnp.minimum(unclipped, clipped)
    metrics = {}
    if dual_clip is not None:
        floor = dual_clip * adv
        dual_active = (adv < 0) & (objective < floor)
        objective = jnp.where(dual_active, floor, objective)
        metrics["ppo/dual_clipfrac"] = masked_mean(dual_active, m)
    loss = -aggregate(objective, m, agg, normalizer=normalizer)
    metrics.update({
        "ppo/policy_loss": loss,
        "ppo/clipfrac": masked_mean(clipped < unclipped, m),
        "ppo/approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, m),
        "ppo/ratio_mean": masked_mean(ratio, m),
        "ppo/ratio_max": jnp.max(select(ratio, m)),
    })
    return loss, metrics


def value_loss(*, values, old_values, returns, mask, clip_eps=0.2, agg="token_mean",
               normalizer=None):
    """Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old).

    The clip keeps the critic within clip_eps of the values it predicted at rollout time, as in
    the PPO baselines (Schulman et al. 2017; Ziegler et al. 2019). clip_eps=None disables it.
    Args: values, old_values, returns, mask: [B, T]; agg/normalizer as in `ppo_clip`. The mask
      is valid where > 0; padded positions are selected away before any arithmetic, so their
      contents reach neither the loss, the metrics nor the gradient.
    Returns: (loss, metrics) with value/loss, value/clipfrac, value/mean, value/error (mean
      squared error) and value/explained_variance = 1 - Var(R - V) / Var(R) over valid tokens.
    """
    m = _f32(mask)
    v = select(values, m)
    v_old, ret = _per_token(old_values, m), _per_token(returns, m)
    err = jnp.square(v - ret)
    if clip_eps is None:
        per_token, clipfrac = 0.5 * err, jnp.zeros((), jnp.float32)
    else:
        v_clip = v_old + jnp.clip(v - v_old, -clip_eps, clip_eps)
        err_clip = jnp.square(v_clip - ret)
        per_token = 0.5 * jnp.maximum(err, err_clip)
        clipfrac = masked_mean(err_clip > err, m)
    loss = aggregate(per_token, m, agg, normalizer=normalizer)
    return loss, {
        "value/loss": loss,
        "value/clipfrac": clipfrac,
        "value/mean": masked_mean(v, m),
        "value/error": masked_mean(err, m),
        "value/explained_variance": explained_variance(predictions=v, targets=ret, mask=m),
    }


# Explained variance is unbounded below; it is floored here, where it says only "the critic
# explains nothing", so that Var(R - V) / Var(R) with Var(R) ~ 1e-37 cannot overflow to -inf.
EXPLAINED_VARIANCE_FLOOR = -1e30


def _scaled_variance(x, mask):
    """(s, v) with Var(x) = s^2 * v over the mask: s = max |x - mean| held constant, v in
    [1/n, 1] (or s = v = 0 when x is constant).

    Dividing by s before squaring keeps the squares from underflowing (deviations ~1e-25) or
    overflowing (~1e20), in the value and in the gradient, which would otherwise hold Var^2.
    Var(x) = s^2 Var(x / s) for any constant s, so stopping s's gradient leaves it exact.
    """
    dev = select(x - masked_mean(x, mask), mask)
    s = jax.lax.stop_gradient(jnp.max(jnp.abs(dev)))
    return s, masked_mean(jnp.square(dev / jnp.where(s > 0, s, 1.0)), mask)


def explained_variance(*, predictions, targets, mask):
    """1 - Var(targets - predictions) / Var(targets) over the mask; 0 when Var(targets) = 0,
    floored at EXPLAINED_VARIANCE_FLOOR.

    Valid where mask > 0; padded entries are selected away, whatever they hold."""
    m = _f32(mask)
    t = select(targets, m)
    s_t, v_t = _scaled_variance(t, m)
    s_r, v_r = _scaled_variance(t - select(predictions, m), m)
    # (s_r / s_t)^2 <= 1e30 and v_r / v_t <= n: the ratio is formed only where it is finite;
    # the scales are constants, so the where needs no second guard for the gradient.
    in_range = (s_t > 0) & (s_r <= s_t * 1e15)
    scale = jnp.square(s_r / jnp.where(in_range, s_t, 1.0))
    ev = jnp.maximum(1.0 - scale * v_r / jnp.where(in_range, v_t, 1.0), EXPLAINED_VARIANCE_FLOOR)
    return jnp.where(in_range, ev, jnp.where(s_t > 0, EXPLAINED_VARIANCE_FLOOR, 0.0))


@registry.register("policy_loss", args={})
def reinforce(*, logps, advantages, mask, agg="token_mean", normalizer=None):
    """REINFORCE policy-gradient loss -A * log pi(y_t) (Williams 1992). Shapes [B, T]
    (advantages may be [B] per sequence).

    The advantage carries the baseline (RLOO, GRPO or a critic), so this also serves those
    estimators on-policy; the advantages are constants (gradient stopped). The mask is valid
    where > 0; padded log-probs and advantages are selected away before the product, so a -inf
    log-prob or an inf advantage there reaches neither the loss nor the gradient.
    Returns: (loss, metrics) with pg/loss and pg/advantage_mean.
    """
    m = _f32(mask)
    adv = _per_token(advantages, m)
    loss = aggregate(-adv * select(logps, m), m, agg, normalizer=normalizer)
    return loss, {"pg/loss": loss, "pg/advantage_mean": masked_mean(adv, m)}


def token_entropy(logits):
    """Entropy of softmax(logits) per position, float32. [..., V] -> [...]."""
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    p = jnp.exp(logp)
    # Tokens masked to -inf (top-k, vocabulary masks) have p = 0 and contribute 0, not 0 * -inf.
    return -jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, logp, 0.0), 0.0), axis=-1)


def entropy(*, logits, mask, agg="token_mean", normalizer=None):
    """Entropy bonus as a loss: -aggregate(H(pi(. | s_t))). logits [B, T, V], mask [B, T].

    Minimising it raises the entropy; add coef * loss to the policy loss. The logits of padded
    positions (mask not > 0) are replaced by 0 before the softmax, so NaN there reaches neither
    the loss nor the gradient. Returns (loss, metrics) with policy/entropy, the aggregated
    (positive) entropy.
    """
    logits = select(logits, jnp.asarray(mask)[..., None])
    ent = aggregate(token_entropy(logits), mask, agg, normalizer=normalizer)
    return -ent, {"policy/entropy": ent}
