"""Pure RLHF losses over arrays.

Every loss is keyword-only, takes arrays (never a model, mesh or config), computes in float32
whatever the input dtype, and returns `(loss, metrics)` with `metrics` a flat dict of float32
scalars namespaced by the loss ("rm/accuracy", "dpo/margin", "ppo/clipfrac"). Token-level
losses reduce through `rlhf_jax.aggregation` so that micro-batches and shards add up exactly.

Shapes: B batch (pairs or sequences), T tokens, K items in a ranking, V vocabulary.
The formulas, conventions and sources are listed in docs/implementation_details.md.
"""

import functools
import inspect

import jax
import jax.numpy as jnp

from rlhf_jax import registry, schema
from rlhf_jax.aggregation import aggregate, masked_mean, select, valid
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


def _wins(margin):
    """1 where margin > 0, 1/2 on an exact tie, 0 otherwise: a row's share of a correct order."""
    return jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))


def _win_rate(margin):
    """Fraction of pairs ordered correctly; an exact tie counts as half a win."""
    return jnp.mean(_wins(margin))


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

"""The preference-loss batch contract: what every `pref_loss` (and `unpaired_loss`) takes and
returns.

1. The whole batch, keyword-only. Every input is a [B] array with one entry per row (a pair;
   for an `unpaired_loss` such as `kto`, one completion): policy_chosen_logps,
   policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (summed completion log-probs),
   chosen_lengths, rejected_lengths (completion tokens), chosen_nll (the chosen completion's
   mean token NLL); for unpaired rows policy_logps, ref_logps, desirable and the mismatched
   rows' kl_policy_logps, kl_ref_logps, kl_weights. Each loss declares the ones it needs and
   the registry passes exactly those (`registry.call`).
2. weights [B], float: a row is real where weight > 0; anything else (0, -0, NaN) is padding.
   Padding rows may hold anything (NaN, inf): every input is selected with jnp.where before
   any arithmetic (as `aggregation.select` does for token masks), so a padding row changes
   no output and gets a gradient of exactly 0. weights=None means all ones.
3. (loss, metrics): the loss and every metric are weighted means over rows,
   sum_b w_b x_b / max(sum_b w_b, 1) (padding selected away before weighting), so the loss of
   a batch split into micro-batches with weight sums S1, S2 >= 1 and losses L1, L2 is
   (S1 L1 + S2 L2) / (S1 + S2): the micro-batches add up to the whole batch exactly.
4. Batch statistics. A loss whose formula uses a statistic of the batch (BCO's reward shift,
   KTO's reference point) takes it as `reference_point=None`; None computes it from this
   batch's real rows under stop_gradient. A trainer that splits a batch computes it once over
   the whole batch with `batch_reference_point(loss_fn, **inputs)` and passes it to every
   micro-batch, which keeps point 3 exact. `aot_pair` pairs rows by their rank in the batch
   and is the one loss that cannot be split (see it).
Every loss here is also exact on one pair at a time (B = 1), as the trainer's `per_pair` used
to call them; for a loss with a batch statistic that is the statistic of the pair alone.
"""


class _Rows:
    """The rows of a preference batch: which are real, and weighted means over them."""

    def __init__(self, weights, like):
        n = jnp.shape(like)[0]
        if weights is None:
            self.keep = jnp.ones((n,), bool)
            self.w = jnp.ones((n,), jnp.float32)
        else:
            self.keep = valid(weights)
            self.w = select(weights, self.keep)
        self.total = jnp.maximum(jnp.sum(self.w), 1.0)

    def take(self, x, fill=0.0):
        """float32 x on real rows, `fill` on padding rows (never their contents)."""
        return select(x, self.keep, fill)

    def mean(self, x):
        """sum_b w_b x_b / max(sum_b w_b, 1) over the real rows."""
        return jnp.sum(jnp.where(self.keep, x, 0.0) * self.w) / self.total


def _implicit_reward_metrics(prefix, chosen, rejected, rows):
    margin = chosen - rejected
    return {
        f"{prefix}/chosen_reward": rows.mean(chosen),
        f"{prefix}/rejected_reward": rows.mean(rejected),
        f"{prefix}/margin": rows.mean(margin),
        f"{prefix}/accuracy": rows.mean(_wins(margin)),
    }


def _log_ratios(rows, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                ref_rejected_logps):
    """(log pi(y+)/pi_ref(y+), log pi(y-)/pi_ref(y-)) [B], 0 on padding rows."""
    return (rows.take(policy_chosen_logps) - rows.take(ref_chosen_logps),
            rows.take(policy_rejected_logps) - rows.take(ref_rejected_logps))


def _implicit_rewards(weights, beta, policy_chosen_logps, policy_rejected_logps,
                      ref_chosen_logps, ref_rejected_logps):
    """What the DPO family starts from: (rows, log-ratios lr+ and lr-, implicit rewards
    beta * lr+ and beta * lr-), each [B] and 0 on padding rows."""
    rows = _Rows(weights, policy_chosen_logps)
    lr_c, lr_r = _log_ratios(rows, policy_chosen_logps, policy_rejected_logps,
                             ref_chosen_logps, ref_rejected_logps)
    return rows, lr_c, lr_r, beta * lr_c, beta * lr_r


def _with_reference_point(statistic):
    """Declares `statistic` (same inputs as the loss) as what the loss takes as reference_point.

    `batch_reference_point` reads the declaration, so a trainer never has to know which loss
    has a batch statistic."""
    def declare(fn):
        fn.reference_point_fn = statistic
        return fn
    return declare


def has_batch_statistic(loss_fn) -> bool:
    """Whether `loss_fn` (a registered loss or its partial) takes a batch statistic as
    `reference_point` (`_with_reference_point`): a trainer splitting a batch must then compute
    it once over the whole batch with `batch_reference_point`."""
    return getattr(getattr(loss_fn, "func", loss_fn), "reference_point_fn", None) is not None


def batch_reference_point(loss_fn, **inputs):
    """The batch statistic `loss_fn` takes as `reference_point`, computed over `inputs` (the
    whole batch, [B] each, with its `weights`), or None for a loss that has none.

    loss_fn is a registered function or its partial from a config string; the arguments bound
    there (e.g. beta) apply to the statistic too. Pass the result as reference_point= to the
    loss of every micro-batch: their weighted combination is then the whole batch's loss.
    """
    if not has_batch_statistic(loss_fn):
        return None
    statistic = getattr(loss_fn, "func", loss_fn).reference_point_fn
    bound = getattr(loss_fn, "keywords", None) or {}
    params = inspect.signature(statistic).parameters
    return registry.call(functools.partial(statistic, **{k: v for k, v in bound.items()
                                                         if k in params}), **inputs)


_BETA = schema.Float(gt=0, doc="inverse temperature of the implicit reward")
_SMOOTHING = schema.Float(ge=0, lt=0.5, doc="probability that a label is flipped")


def _check_beta(name, beta):
    _require(_positive(beta), f"{name}: beta must be > 0, got {beta}")


def _check_smoothing(name, eps):
    _require(_in_range(eps, 0.0, 0.5), f"{name}: label_smoothing must be in [0, 0.5), got {eps}")


@registry.register("pref_loss", args={"beta": _BETA, "label_smoothing": _SMOOTHING})
def dpo(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta=0.1, label_smoothing=0.0, weights=None):
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7), a weighted mean over pairs.

    h = beta * [(log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-))];
    loss = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h), eps = label_smoothing. eps > 0 is
    conservative DPO (cDPO, Mitchell 2023): labels are taken to be flipped with probability eps.
    Args: the four log-probs, each [B] (summed over response tokens); weights [B] or None
      (the batch contract above).
    Returns: (loss, metrics) with dpo/loss and the implicit rewards beta * log(pi / pi_ref) of
      chosen and rejected (dpo/chosen_reward, dpo/rejected_reward), their margin and accuracy.
    """
    _check_beta("dpo", beta)
    _check_smoothing("dpo", label_smoothing)
    rows, lr_c, lr_r, chosen, rejected = _implicit_rewards(
        weights, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        ref_rejected_logps)
    h = chosen - rejected
    loss = rows.mean((1.0 - label_smoothing) * jax.nn.softplus(-h)
                     + label_smoothing * jax.nn.softplus(h))
    return loss, {"dpo/loss": loss, **_implicit_reward_metrics("dpo", chosen, rejected, rows)}


@registry.register("pref_loss", args={"beta": _BETA, "label_smoothing": _SMOOTHING})
def cdpo(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
         beta=0.1, label_smoothing=0.1, weights=None):
    """Conservative DPO (Mitchell 2023): `dpo` with label smoothing, 0.1 unless given. [B]."""
    return dpo(policy_chosen_logps=policy_chosen_logps,
               policy_rejected_logps=policy_rejected_logps,
               ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
               beta=beta, label_smoothing=label_smoothing, weights=weights)


@registry.register("pref_loss", args={
    "tau": schema.Float(gt=0, doc="regularisation; the target margin is 1 / (2 tau)")})
def ipo(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        tau=0.1, chosen_lengths=None, rejected_lengths=None, weights=None):
    """Identity Preference Optimisation (Azar et al. 2023, eq. 17), a weighted mean over pairs.

    h = lr(y+) - lr(y-) with lr(y) = (log pi(y) - log pi_ref(y)) / |y|;
    loss = (h - 1 / (2 tau))^2. The squared loss pulls h to a finite target instead of
    pushing it to infinity as DPO does on deterministic preferences. Log-ratios are averaged
    over response length when lengths are given (as in common implementations); pass
    lengths of None for the per-sequence form of the paper.
    Args: the four log-probs [B]; tau > 0; chosen_lengths, rejected_lengths [B] or None;
      weights [B] or None.
    Returns: (loss, metrics) with ipo/loss and implicit rewards tau * lr of chosen and rejected.
    """
    _require(_positive(tau), f"ipo: tau must be > 0, got {tau}")
    rows = _Rows(weights, policy_chosen_logps)
    lr_c, lr_r = _log_ratios(rows, policy_chosen_logps, policy_rejected_logps,
                             ref_chosen_logps, ref_rejected_logps)
    if chosen_lengths is not None:
        lr_c = lr_c / jnp.maximum(rows.take(chosen_lengths, 1.0), 1.0)
    if rejected_lengths is not None:
        lr_r = lr_r / jnp.maximum(rows.take(rejected_lengths, 1.0), 1.0)
    loss = rows.mean(jnp.square(lr_c - lr_r - 1.0 / (2.0 * tau)))
    return loss, {"ipo/loss": loss,
                  **_implicit_reward_metrics("ipo", tau * lr_c, tau * lr_r, rows)}


@registry.register("pref_loss", args={
    "beta": schema.Float(gt=0, doc="scale of the length-normalised reward"),
    "gamma": schema.Float(ge=0, doc="target reward margin")})
def simpo(*, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
          beta=2.0, gamma=1.0, weights=None):
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, with a margin.

    loss = -log sigmoid(beta * log pi(y+) / |y+| - beta * log pi(y-) / |y-| - gamma).
    Args: policy log-probs [B] (summed), lengths [B] (response tokens), beta, gamma (the target
      reward margin, in reward units), weights [B] or None. Returns (loss, metrics) with
      simpo/loss and the rewards beta * log pi(y) / |y| of chosen and rejected, their margin
      and accuracy.
    """
    _check_beta("simpo", beta)
    rows = _Rows(weights, policy_chosen_logps)
    chosen = (beta * rows.take(policy_chosen_logps)
              / jnp.maximum(rows.take(chosen_lengths, 1.0), 1.0))
    rejected = (beta * rows.take(policy_rejected_logps)
                / jnp.maximum(rows.take(rejected_lengths, 1.0), 1.0))
    loss = rows.mean(jax.nn.softplus(-(chosen - rejected - gamma)))
    return loss, {"simpo/loss": loss,
                  **_implicit_reward_metrics("simpo", chosen, rejected, rows)}


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x (Maechler 2012)."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


@registry.register("pref_loss", args={
    "lam": schema.Float(ge=0, doc="weight of the odds-ratio term beside the SFT loss")})
def orpo(*, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
         chosen_nll, lam=0.1, weights=None):
    """ORPO (Hong et al. 2024, eqs. 6-7): SFT loss plus an odds-ratio preference term.

    With the length-averaged log-probability a(y) = log pi(y) / |y| and
    log odds(y) = a - log(1 - exp(a)):  loss = NLL(y+) - lam * log sigmoid(log odds(y+) -
    log odds(y-)). a is clamped to <= -1e-6 so the odds of a certain sequence stay finite.
    Args: policy log-probs [B] (summed), lengths [B], chosen_nll [B] (the SFT loss of the
      chosen response, e.g. its mean token NLL), lam the weight of the odds-ratio term,
      weights [B] or None.
    Returns: (loss, metrics) with orpo/loss, orpo/nll, orpo/log_odds_ratio and the rewards
      lam * a(y) of chosen and rejected, their margin and accuracy.
    """
    rows = _Rows(weights, policy_chosen_logps)
    a_c = jnp.minimum(rows.take(policy_chosen_logps)
                      / jnp.maximum(rows.take(chosen_lengths, 1.0), 1.0), -1e-6)
    a_r = jnp.minimum(rows.take(policy_rejected_logps)
                      / jnp.maximum(rows.take(rejected_lengths, 1.0), 1.0), -1e-6)
    log_odds_ratio = (a_c - _log1mexp(a_c)) - (a_r - _log1mexp(a_r))
    ratio_loss = rows.mean(jax.nn.softplus(-log_odds_ratio))
    nll = rows.mean(rows.take(chosen_nll))
    loss = nll + lam * ratio_loss
    return loss, {
        "orpo/loss": loss,
        "orpo/nll": nll,
        "orpo/ratio_loss": ratio_loss,
        "orpo/log_odds_ratio": rows.mean(log_odds_ratio),
        **_implicit_reward_metrics("orpo", lam * a_c, lam * a_r, rows),
    }


@registry.register("pref_loss", args={"beta": _BETA})
def hinge(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
          beta=0.1, weights=None):
    """SLiC-HF's calibration (hinge) loss on the DPO log-ratio margin. [B].

    h = (log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-));
    loss = max(0, 1 - beta * h). Zero, with no gradient, once a pair is separated by 1 / beta.
    Source: Zhao et al. 2023 (SLiC-HF), the calibration loss with margin delta = 1 / beta and
      the log-probs measured against the reference, as Rafailov et al. 2023 compare it (TRL's
      loss_type "hinge"). Returns (loss, metrics) with hinge/loss, the implicit rewards
      beta * log(pi / pi_ref), their margin and accuracy.
    """
    _check_beta("hinge", beta)
    rows, lr_c, lr_r, chosen, rejected = _implicit_rewards(
        weights, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        ref_rejected_logps)
    loss = rows.mean(jax.nn.relu(1.0 - (chosen - rejected)))
    return loss, {"hinge/loss": loss,
                  **_implicit_reward_metrics("hinge", chosen, rejected, rows)}


@registry.register("pref_loss", args={"beta": _BETA, "label_smoothing": _SMOOTHING})
def robust_dpo(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
               ref_rejected_logps, beta=0.1, label_smoothing=0.1, weights=None):
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"): DPO made unbiased under
    flipped labels. [B].

    With h the DPO logit beta * (lr(y+) - lr(y-)) and eps the label-flip rate,
    loss = ((1 - eps) softplus(-h) - eps softplus(h)) / (1 - 2 eps). In expectation over
    labels flipped with probability eps it equals the DPO loss on the clean labels (unlike
    cDPO, which is DPO against smoothed targets). It is unbounded below for eps > 0 (a pair
    pushed far the wrong way lowers it), and equals `dpo` at eps = 0. The default eps = 0.1 as
    for cdpo; set it to the noise rate of the data. Returns (loss, metrics) with
    robust_dpo/loss, the implicit rewards, their margin and accuracy.
    """
    _check_beta("robust_dpo", beta)
    _check_smoothing("robust_dpo", label_smoothing)
    rows, lr_c, lr_r, chosen, rejected = _implicit_rewards(
        weights, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        ref_rejected_logps)
    h = chosen - rejected
    per_pair = ((1.0 - label_smoothing) * jax.nn.softplus(-h)
                - label_smoothing * jax.nn.softplus(h)) / (1.0 - 2.0 * label_smoothing)
    loss = rows.mean(per_pair)
    return loss, {"robust_dpo/loss": loss,
                  **_implicit_reward_metrics("robust_dpo", chosen, rejected, rows)}


@registry.register("pref_loss", args={
    "beta": _BETA,
    "label_smoothing": schema.Float(gt=0, lt=0.5, doc="the target's probability that the "
                                    "rejected response is better; > 0 keeps log eps finite")})
def exo_pair(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
             ref_rejected_logps, beta=0.1, label_smoothing=1e-3, weights=None):
    """EXO, pairwise (Ji et al. 2024, eq. 16 with K = 2): the reverse KL from the policy's
    preference to a smoothed label, instead of DPO's forward KL. [B].

    The policy's probability that y+ wins is p = sigmoid(h), h = beta * (lr(y+) - lr(y-));
    the target is (1 - eps, eps). loss = KL(Bern(p) || Bern(1 - eps))
      = p (log p - log(1 - eps)) + (1 - p) (log(1 - p) - log eps),
    with log p = log sigmoid(h) and log(1 - p) = log sigmoid(-h). Minimised at p = 1 - eps, so
    eps > 0 is required (eps = 0 would put log 0 in the loss); the default 1e-3 is the value
    TRL substitutes for eps = 0 (its loss_type "exo_pair"). Mode-seeking: a pair far on the
    wrong side (p -> 0) gets a vanishing gradient, unlike DPO. Returns (loss, metrics) with
    exo_pair/loss, the implicit rewards, their margin and accuracy.
    """
    _check_beta("exo_pair", beta)
    _require(_in_range(label_smoothing, 1e-30, 0.5),
             f"exo_pair: label_smoothing must be in (0, 0.5), got {label_smoothing}")
    rows, lr_c, lr_r, chosen, rejected = _implicit_rewards(
        weights, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        ref_rejected_logps)
    h = chosen - rejected
    log_p, log_q = -jax.nn.softplus(-h), -jax.nn.softplus(h)  # log sigmoid(+-h)
    per_pair = (jax.nn.sigmoid(h) * (log_p - jnp.log1p(-label_smoothing))
                + jax.nn.sigmoid(-h) * (log_q - jnp.log(label_smoothing)))
    loss = rows.mean(per_pair)
    return loss, {"exo_pair/loss": loss,
                  **_implicit_reward_metrics("exo_pair", chosen, rejected, rows)}


@registry.register("pref_loss", args={"beta": _BETA})
def nca_pair(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
             ref_rejected_logps, beta=0.1, weights=None):
    """NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment", the K = 2 form). [B].

    With the implicit rewards r+ = beta * lr(y+), r- = beta * lr(y-):
    loss = -log sigmoid(r+) - 1/2 log sigmoid(-r+) - 1/2 log sigmoid(-r-).
    Each response's own reward is calibrated against 0 (an absolute, not relative, target), so
    the chosen likelihood is raised rather than only the margin, which DPO can widen while both
    likelihoods fall. Returns (loss, metrics) with nca_pair/loss, the implicit rewards, their
    margin and accuracy.
    """
    _check_beta("nca_pair", beta)
    rows, lr_c, lr_r, chosen, rejected = _implicit_rewards(
        weights, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        ref_rejected_logps)
    per_pair = (jax.nn.softplus(-chosen) + 0.5 * jax.nn.softplus(chosen)
                + 0.5 * jax.nn.softplus(rejected))
    loss = rows.mean(per_pair)
    return loss, {"nca_pair/loss": loss,
                  **_implicit_reward_metrics("nca_pair", chosen, rejected, rows)}


def bco_pair_reference_point(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, beta=0.1, weights=None):
    """BCO's reward shift delta over a batch: the weighted mean over its real rows of the mean
    implicit reward (r+ + r-) / 2, r = beta * log(pi / pi_ref); a constant (stop_gradient)."""
    rows = _Rows(weights, policy_chosen_logps)
    lr_c, lr_r = _log_ratios(rows, policy_chosen_logps, policy_rejected_logps,
                             ref_chosen_logps, ref_rejected_logps)
    return jax.lax.stop_gradient(rows.mean(beta * 0.5 * (lr_c + lr_r)))


@registry.register("pref_loss", args={"beta": _BETA})
@_with_reference_point(bco_pair_reference_point)
def bco_pair(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
             ref_rejected_logps, beta=0.1, reference_point=None, weights=None):
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization"): a binary
    classifier with logit r - delta, chosen as class 1 and rejected as class 0. [B].

    r+ = beta * lr(y+), r- = beta * lr(y-);  loss = -log sigmoid(r+ - delta)
    - log sigmoid(-(r- - delta)), delta the reward shift. The paper (and TRL) keep delta as a
    running mean of the batches' mean rewards across steps; here delta is the batch statistic
    `bco_pair_reference_point` (the weighted mean of (r+ + r-) / 2 over the batch), passed in
    as reference_point or, when None, computed from this batch, under stop_gradient. A trainer
    that wants the running mean keeps it and passes it in. Returns (loss, metrics) with
    bco_pair/loss, bco_pair/reference_point (delta), the implicit rewards, their margin and
    accuracy.
    """
    _check_beta("bco_pair", beta)
    rows, lr_c, lr_r, chosen, rejected = _implicit_rewards(
        weights, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        ref_rejected_logps)
    if reference_point is None:
        delta = bco_pair_reference_point(
            policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
            beta=beta, weights=weights)
    else:
        delta = jax.lax.stop_gradient(_f32(reference_point))
    loss = rows.mean(jax.nn.softplus(-(chosen - delta)) + jax.nn.softplus(rejected - delta))
    return loss, {"bco_pair/loss": loss, "bco_pair/reference_point": delta,
                  **_implicit_reward_metrics("bco_pair", chosen, rejected, rows)}


@registry.register("pref_loss", args={"beta": _BETA})
def sppo_hard(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
              ref_rejected_logps, beta=0.1, weights=None):
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization", eq. 4.7 /
    Algorithm 1 with the win probability set to 1 for y+ and 0 for y-). [B].

    a = log pi(y+)/pi_ref(y+), b = log pi(y-)/pi_ref(y-) (beta-free; pi_ref is the previous
    iterate pi_t in the paper);  loss = (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2, beta = 1/eta.
    Squared regression of each log-ratio to its own target +-1/(2 beta): the chosen
    likelihood is raised only up to its target (unlike DPO's margin). Returns (loss, metrics)
    with sppo_hard/loss, the implicit rewards beta * a and beta * b, their margin and accuracy.
    """
    _check_beta("sppo_hard", beta)
    rows = _Rows(weights, policy_chosen_logps)
    a, b = _log_ratios(rows, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                       ref_rejected_logps)
    target = 0.5 / beta
    loss = rows.mean(jnp.square(a - target) + jnp.square(b + target))
    return loss, {"sppo_hard/loss": loss,
                  **_implicit_reward_metrics("sppo_hard", beta * a, beta * b, rows)}


@registry.register("pref_loss", args={"beta": _BETA})
def apo_zero(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
             ref_rejected_logps, beta=0.1, weights=None):
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", eq. 7). [B].

    r+ = beta * lr(y+), r- = beta * lr(y-);  loss = (1 - sigmoid(r+)) + sigmoid(r-): raise the
    chosen likelihood and lower the rejected one, each anchored at the reference. For data
    whose chosen answers are better than the model's own. Returns (loss, metrics) with
    apo_zero/loss, the implicit rewards, their margin and accuracy.
    """
    _check_beta("apo_zero", beta)
    rows, lr_c, lr_r, chosen, rejected = _implicit_rewards(
        weights, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        ref_rejected_logps)
    loss = rows.mean(jax.nn.sigmoid(-chosen) + jax.nn.sigmoid(rejected))
    return loss, {"apo_zero/loss": loss,
                  **_implicit_reward_metrics("apo_zero", chosen, rejected, rows)}


@registry.register("pref_loss", args={"beta": _BETA})
def apo_down(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
             ref_rejected_logps, beta=0.1, weights=None):
    """APO-down (D'Oosterlinck et al. 2024, eq. 8). [B].

    loss = sigmoid(r+) + (1 - sigmoid(r+ - r-)): lower the chosen likelihood, and the rejected
    one further. For data whose chosen answers are worse than the model's own. Returns
    (loss, metrics) with apo_down/loss, the implicit rewards, their margin and accuracy.
    """
    _check_beta("apo_down", beta)
    rows, lr_c, lr_r, chosen, rejected = _implicit_rewards(
        weights, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        ref_rejected_logps)
    loss = rows.mean(jax.nn.sigmoid(chosen) + jax.nn.sigmoid(-(chosen - rejected)))
    return loss, {"apo_down/loss": loss,
                  **_implicit_reward_metrics("apo_down", chosen, rejected, rows)}


def _sorted_rows(x, rows):
    """x [B] sorted ascending over the real rows, which come first, with their weights; the
    padding rows follow, holding 0 with weight 0."""
    order = jnp.argsort(jnp.where(rows.keep, x, jnp.inf), stable=True)
    return x[order], rows.w[order]


@registry.register("pref_loss", args={"beta": _BETA, "label_smoothing": _SMOOTHING})
def aot_pair(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
             ref_rejected_logps, beta=0.1, label_smoothing=0.0, weights=None):
    """AOT, paired form (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via
    Optimal Transport"): first-order stochastic dominance of the chosen log-ratios over
    the rejected ones. [B].

    Sort the chosen log-ratios lr(y+) and, separately, the rejected ones lr(y-) over the real
    rows of the batch; pair them by rank k and apply the (label-smoothed) DPO loss to
    h_k = beta * (lr+_(k) - lr-_(k)). The k-th pair weighs (w of the row ranked k among the
    chosen + w of the row ranked k among the rejected) / 2, so the weights still sum to the
    batch's; with 0/1 weights every real rank weighs 1.
    Batch-level by construction: rows are compared with other rows' quantiles, so the loss of
    a batch is NOT the weighted combination of its micro-batches' losses (each would sort only
    its own rows), and on one pair it is the DPO loss. Compute it over the whole batch (or
    accept the per-micro-batch sort, as data-parallel implementations do per device).
    Returns (loss, metrics) with aot_pair/loss, aot_pair/dominance (the share of ranks where
    the chosen quantile beats the rejected one: what the loss drives to 1) and the implicit
    rewards of the unsorted pairs, their margin and pairwise accuracy (as for the other losses).
    """
    _check_beta("aot_pair", beta)
    _check_smoothing("aot_pair", label_smoothing)
    rows = _Rows(weights, policy_chosen_logps)
    lr_c, lr_r = _log_ratios(rows, policy_chosen_logps, policy_rejected_logps,
                             ref_chosen_logps, ref_rejected_logps)
    sorted_c, w_c = _sorted_rows(lr_c, rows)
    sorted_r, w_r = _sorted_rows(lr_r, rows)
    h = beta * (sorted_c - sorted_r)
    w_k = 0.5 * (w_c + w_r)
    per_rank = ((1.0 - label_smoothing) * jax.nn.softplus(-h)
                + label_smoothing * jax.nn.softplus(h))
    loss = jnp.sum(per_rank * w_k) / rows.total
    return loss, {"aot_pair/loss": loss,
                  "aot_pair/dominance": jnp.sum(_wins(h) * w_k) / rows.total,
                  **_implicit_reward_metrics("aot_pair", beta * lr_c, beta * lr_r, rows)}


# Ranks pair rows across the whole batch: no split of it adds up to the batch's loss (the
# batch contract, point 4). Trainers refuse to micro-batch it.
aot_pair.splits = False


def splits(loss_fn) -> bool:
    """Whether a batch split into micro-batches adds up to the whole batch under `loss_fn`
    (every loss but one that pairs rows across the batch, such as `aot_pair`)."""
    return getattr(getattr(loss_fn, "func", loss_fn), "splits", True)


@registry.register("pref_loss", args={
    "beta": _BETA, "alpha": schema.Float(ge=0, doc="weight of the chosen response's NLL")})
def rpo(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_nll, beta=0.1, alpha=1.0, weights=None):
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): DPO plus
    alpha times the NLL of the chosen response. [B].

    loss = -log sigmoid(beta * (lr(y+) - lr(y-))) + alpha * NLL(y+). The paper's NLL is the
    chosen sequence's log-likelihood divided by its length: chosen_nll [B], as ORPO takes it
    (the trainer passes the mean token NLL of the chosen completion). alpha = 1 as in the
    paper. Returns (loss, metrics) with rpo/loss, rpo/nll, rpo/dpo_loss, the implicit rewards,
    their margin and accuracy.
    """
    _check_beta("rpo", beta)
    rows, lr_c, lr_r, chosen, rejected = _implicit_rewards(
        weights, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        ref_rejected_logps)
    dpo_loss = rows.mean(jax.nn.softplus(-(chosen - rejected)))
    nll = rows.mean(rows.take(chosen_nll))
    loss = dpo_loss + alpha * nll
    return loss, {"rpo/loss": loss, "rpo/nll": nll, "rpo/dpo_loss": dpo_loss,
                  **_implicit_reward_metrics("rpo", chosen, rejected, rows)}


# --- KTO: unpaired rows -----------------------------------------------------------------------

def kto_reference_point(*, policy_logps, ref_logps, kl_policy_logps=None, kl_ref_logps=None,
                        kl_weights=None, weights=None):
    """KTO's reference point z0 = max(0, mean of log pi(y'|x) - log pi_ref(y'|x)), a constant.

    The mean is over the mismatched completions (kl_policy_logps, kl_ref_logps [B], e.g. from
    `pairs_to_unpaired`) whose kl_weights (default: weights) are > 0, as the KTO paper
    estimates KL(pi || pi_ref) (Ethayarajh et al. 2024). Without mismatched
    completions it is taken over the rows' own log-ratios (policy_logps - ref_logps), a cruder
    estimate that needs no extra forward pass. Beta-free; under stop_gradient.
    """
    if (kl_policy_logps is None) != (kl_ref_logps is None):
        raise ValueError("kto: pass both kl_policy_logps and kl_ref_logps, or neither")
    if kl_policy_logps is None:
        rows = _Rows(weights, policy_logps)
        lr = rows.take(policy_logps) - rows.take(ref_logps)
    else:
        rows = _Rows(weights if kl_weights is None else kl_weights, kl_policy_logps)
        lr = rows.take(kl_policy_logps) - rows.take(kl_ref_logps)
    return jax.lax.stop_gradient(jnp.maximum(rows.mean(lr), 0.0))


def _kto_terms(lr, desirable, z0, beta, desirable_weight, undesirable_weight):
    """Per-row KTO loss lambda_y - v(x, y), and whether the row sits on its side of z0."""
    # lambda_D - lambda_D sigmoid(beta (r - z0)) = lambda_D sigmoid(beta (z0 - r)), and the
    # same with the roles swapped for undesirable rows.
    signed = jnp.where(desirable, 1.0, -1.0) * (lr - z0)
    weight = jnp.where(desirable, desirable_weight, undesirable_weight)
    return weight * jax.nn.sigmoid(-beta * signed), signed


_KTO_ARGS = {"beta": _BETA,
             "desirable_weight": schema.Float(ge=0, doc="lambda_D, weight of desirable rows"),
             "undesirable_weight": schema.Float(ge=0, doc="lambda_U, weight of undesirable rows")}


@registry.register("unpaired_loss", args=_KTO_ARGS)
@_with_reference_point(kto_reference_point)
def kto(*, policy_logps, ref_logps, desirable, kl_policy_logps=None, kl_ref_logps=None,
        kl_weights=None, reference_point=None, beta=0.1, desirable_weight=1.0,
        undesirable_weight=1.0, weights=None):
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization", eq. 8) on UNPAIRED rows: each row is one completion, desirable or not. [B].

    r = log pi(y|x) - log pi_ref(y|x);  z0 the reference point (`kto_reference_point`);
    v = lambda_D sigmoid(beta (r - z0)) for a desirable row, lambda_U sigmoid(beta (z0 - r))
    for an undesirable one;  loss = weighted mean over rows of lambda_y - v(x, y).
    Args:
      policy_logps, ref_logps: [B] summed completion log-probs. desirable: [B], 1 (or True)
        for a desirable completion, 0 otherwise.
      kl_policy_logps, kl_ref_logps: [B] or None, log-probs of mismatched completions (each
        row's prompt with another row's completion; see `pairs_to_unpaired`), for z0;
        kl_weights: [B] or None (default: weights), which of them are real.
      reference_point: z0 for a micro-batch of a larger batch; None computes it from these rows.
      beta, desirable_weight (lambda_D), undesirable_weight (lambda_U): the paper suggests
        lambda_D n_D / (lambda_U n_U) in [1, 4/3] for n_D desirable and n_U undesirable rows.
      weights: [B] or None (the batch contract above).
    Registered under its own kind, `unpaired_loss` (one completion per row), not `pref_loss`
    (pairs; `kto_pair` is KTO on those): the preference trainer picks its unpaired path for
    config.pref_loss="kto(...)" and feeds it the mismatched rows of z0.
    Returns: (loss, metrics) with kto/loss, kto/reference_point (z0), kto/reward (the mean of
      beta * r), kto/margin (the mean of beta * (r - z0) signed + for desirable rows and - for
      undesirable ones: how far rows sit on their side of z0) and kto/accuracy (the share on
      their side; ties count half).
    """
    _check_beta("kto", beta)
    rows = _Rows(weights, policy_logps)
    lr = rows.take(policy_logps) - rows.take(ref_logps)
    if reference_point is None:
        z0 = kto_reference_point(policy_logps=policy_logps, ref_logps=ref_logps,
                                 kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps,
                                 kl_weights=kl_weights, weights=weights)
    else:
        z0 = jax.lax.stop_gradient(_f32(reference_point))
    per_row, signed = _kto_terms(lr, valid(rows.take(desirable)), z0, beta, desirable_weight,
                                 undesirable_weight)
    loss = rows.mean(per_row)
    return loss, {"kto/loss": loss, "kto/reference_point": z0,
                  "kto/reward": rows.mean(beta * lr), "kto/margin": rows.mean(beta * signed),
                  "kto/accuracy": rows.mean(_wins(signed))}


def kto_pair_reference_point(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, weights=None):
    """`kto_reference_point` of a paired batch's 2B rows: max(0, weighted mean over its real
    pairs of (lr(y+) + lr(y-)) / 2), a constant."""
    rows = _Rows(weights, policy_chosen_logps)
    lr_c, lr_r = _log_ratios(rows, policy_chosen_logps, policy_rejected_logps,
                             ref_chosen_logps, ref_rejected_logps)
    return jax.lax.stop_gradient(jnp.maximum(rows.mean(0.5 * (lr_c + lr_r)), 0.0))


@registry.register("pref_loss", args=_KTO_ARGS)
@_with_reference_point(kto_pair_reference_point)
def kto_pair(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
             ref_rejected_logps, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
             reference_point=None, weights=None):
    """`kto` on a paired batch: each pair's chosen response a desirable row, its rejected one
    an undesirable row (the 2B rows of `pairs_to_unpaired`), averaged per pair. [B].

    loss per pair = (lambda_D sigmoid(beta (z0 - lr(y+))) + lambda_U sigmoid(beta (lr(y-) -
    z0))) / 2, the mean of KTO's two rows. z0 (reference_point, None: computed from this
    batch) is `kto_pair_reference_point`: the pairs' own log-ratios stand in for the
    mismatched completions of the paper, which a paired trainer does not compute; for the
    paper's estimate run `kto` on `pairs_to_unpaired` rows. Not TRL's former loss_type
    "kto_pair", which took the chosen half's mean for the rejected rows' z0 and vice versa.
    Returns (loss, metrics) with kto_pair/loss, kto_pair/reference_point, and the implicit
    rewards beta * lr of chosen and rejected, their margin and pairwise accuracy.
    """
    _check_beta("kto_pair", beta)
    rows = _Rows(weights, policy_chosen_logps)
    lr_c, lr_r = _log_ratios(rows, policy_chosen_logps, policy_rejected_logps,
                             ref_chosen_logps, ref_rejected_logps)
    if reference_point is None:
        z0 = kto_pair_reference_point(
            policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
            weights=weights)
    else:
        z0 = jax.lax.stop_gradient(_f32(reference_point))
    loss_c, _ = _kto_terms(lr_c, True, z0, beta, desirable_weight, undesirable_weight)
    loss_r, _ = _kto_terms(lr_r, False, z0, beta, desirable_weight, undesirable_weight)
    loss = rows.mean(0.5 * (loss_c + loss_r))
    return loss, {"kto_pair/loss": loss, "kto_pair/reference_point": z0,
                  **_implicit_reward_metrics("kto_pair", beta * lr_c, beta * lr_r, rows)}


def pairs_to_unpaired(*, prompts, chosen, rejected, weights=None):
    """A paired batch as KTO's 2B unpaired rows, with the mismatched completions of its z0.

    Args: prompts, chosen, rejected: arrays (or pytrees of arrays) with leading axis B, the
      prompt and the two completions of each pair, in whatever form a forward pass takes
      (token ids, masks, or log-probs for a test); weights: [B] or None (all ones).
    Returns a dict of leading axis 2B:
      prompts         the prompts twice: rows b and B + b hold prompt b
      completions     the chosen completions, then the rejected ones
      desirable       1.0 on the B chosen rows, 0.0 on the B rejected rows
      weights         the pair weights twice
      kl_completions  the completions rolled down by one row: row k holds row k - 1's (row 0
                      row 2B - 1's). With B >= 2 that completion was written for another
                      prompt ((k - 1) mod B != k mod B); with B = 1 it is the pair's other one
      kl_weights      1.0 where row k and row k - 1 are both real, else 0.0
    Score (prompts, completions) for policy_logps and ref_logps and (prompts, kl_completions)
    for kl_policy_logps and kl_ref_logps, then call `kto` with desirable, weights and
    kl_weights. Rolling the batch is how the KTO paper and TRL form mismatched pairs.
    """
    both = jax.tree.map(lambda c, r: jnp.concatenate([c, r], axis=0), chosen, rejected)
    b = jax.tree.leaves(chosen)[0].shape[0]
    w = jnp.ones((b,), jnp.float32) if weights is None else select(weights, valid(weights))
    w2 = jnp.concatenate([w, w])
    real = w2 > 0
    return {
        "prompts": jax.tree.map(lambda p: jnp.concatenate([p, p], axis=0), prompts),
        "completions": both,
        "desirable": jnp.concatenate([jnp.ones((b,), jnp.float32),
                                      jnp.zeros((b,), jnp.float32)]),
        "weights": w2,
        "kl_completions": jax.tree.map(lambda x: jnp.roll(x, 1, axis=0), both),
        "kl_weights": (real & jnp.roll(real, 1)).astype(jnp.float32),
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


def _ratio_inputs(logps, old_logps, advantages, mask):
    """(mask float32, advantages, log pi, log-ratio) [B, T] of a ratio loss: padded positions of
    every input selected away before any arithmetic, the advantage clamped to
    +-ADVANTAGE_CLAMP and a constant, the old log-probs a constant."""
    m = _f32(mask)
    adv = jnp.clip(_per_token(advantages, m), -ADVANTAGE_CLAMP, ADVANTAGE_CLAMP)
    lp = select(logps, m)
    log_ratio = lp - jax.lax.stop_gradient(select(old_logps, m))
    return m, adv, lp, log_ratio


def _ratio_metrics(prefix, ratio, log_ratio, m):
    """k3 estimate of KL(old || new) from the token log-ratios, and the ratio's mean and max."""
    log_ratio = jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return {f"{prefix}/approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, m),
            f"{prefix}/ratio_mean": masked_mean(ratio, m),
            f"{prefix}/ratio_max": jnp.max(select(ratio, m))}


@registry.register("policy_loss", args={
    "clip_eps": schema.Float(gt=0, lt=1, doc="lower clip range of the sequence ratio"),
    "clip_eps_high": schema.Float(gt=0, optional=True,
                                  doc="upper clip range of the sequence ratio (None: clip_eps)")})
def gspo(*, logps, old_logps, advantages, mask, clip_eps=3e-4, clip_eps_high=4e-4,
         agg="seq_mean_token_mean", normalizer=None):
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"), in its token form
    GSPO-token, as a loss to minimise. Shapes [B, T].

    s_i = exp(mean over row i's valid tokens of (log pi - log pi_old)), the length-normalised
    sequence importance ratio; s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)], equal to s_i
    in value, with gradient s_i * grad log pi(y_t) on every token;
    objective_t = min(s_{i,t} A_t, clip(s_{i,t}, 1 - eps_low, 1 + eps_high) A_t);
    loss = -aggregate(objective). The clip decision is the sequence's: with one advantage per
    row every token of a sequence is clipped or none is. With agg = "seq_mean_token_mean" (the
    default: 1/G sum_i 1/|y_i| sum_t) and per-sequence advantages this is GSPO's eq. 5 exactly,
    value and gradient (its gradient is s_i A_i times the mean over the row's tokens of
    grad log pi); another agg weighs sequences by what it weighs their tokens by. A [B, T]
    advantage gives GSPO-token's per-token advantages.
    Args: logps, old_logps, advantages ([B, T] or [B]), mask as in `ppo_clip`; clip_eps and
      clip_eps_high the paper's ranges 3e-4 and 4e-4 (their sec. 5.1: sequence ratios sit
      much closer to 1 than token ratios); agg / normalizer as in `ppo_clip`.
    Returns: (loss, metrics) with gspo/policy_loss, gspo/clipfrac (fraction of valid tokens
      whose objective is the clipped one), gspo/seq_ratio_mean and gspo/seq_ratio_max (of s_i
      over rows with a valid token), and gspo/approx_kl, gspo/ratio_mean, gspo/ratio_max of
      the token ratios as in `ppo_clip`. Padding is selected away before any arithmetic; the
      sequence log-ratio is clamped to +-LOG_RATIO_CLAMP before exp.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    _require(_positive(clip_eps) and _positive(eps_high),
             f"gspo: clip ranges must be > 0, got {clip_eps}, {eps_high}")
    m, adv, lp, log_ratio = _ratio_inputs(logps, old_logps, advantages, mask)
    tokens = jnp.sum(valid(m), axis=-1)
    seq_log_ratio = jnp.sum(log_ratio, axis=-1) / jnp.maximum(tokens, 1).astype(jnp.float32)
    s = jnp.exp(jnp.clip(seq_log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [B]
    # exp(lp - sg(lp)) is exactly 1 with derivative 1: the value is s_i, the gradient
    # s_i d log pi(y_t) (GSPO-token). Padded positions hold lp = 0: nothing there is
    # differentiated.
    ratio = jax.lax.stop_gradient(s)[:, None] * jnp.exp(lp - jax.lax.stop_gradient(lp))
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high) * adv
    loss = -aggregate(jnp.minimum(unclipped, clipped), m, agg, normalizer=normalizer)
    has_tokens = tokens > 0
    s_const = jax.lax.stop_gradient(s)
    token_ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return loss, {
        "gspo/policy_loss": loss,
        "gspo/clipfrac": masked_mean(clipped < unclipped, m),
        "gspo/seq_ratio_mean": masked_mean(s_const, has_tokens),
        "gspo/seq_ratio_max": jnp.max(jnp.where(has_tokens, s_const, 0.0)),
        **_ratio_metrics("gspo", token_ratio, log_ratio, m),
    }


@registry.register("policy_loss", args={
    "clip_eps_low": schema.Float(gt=0, le=1, optional=True,
                                 doc="lower clip range of the IS weight (None: no lower bound)"),
    "clip_eps_high": schema.Float(gt=0, doc="the IS weight is capped at 1 + clip_eps_high")})
def cispo(*, logps, old_logps, advantages, mask, clip_eps_low=None, clip_eps_high=0.28,
          agg="token_mean", normalizer=None):
    """CISPO (MiniMax 2025, "MiniMax-M1", arXiv:2506.13585, eqs. 4-5): REINFORCE weighted by a
    clipped, stopped importance weight, as a loss to minimise. Shapes [B, T].

    r_t = pi(y_t) / pi_old(y_t);  w_t = sg[clip(r_t, 1 - eps_low, 1 + eps_high)];
    loss = -aggregate(w_t * A_t * log pi(y_t)). Unlike PPO's clip, which zeroes the gradient of
    a clipped token, every token keeps a gradient (w_t A_t grad log pi); clipping only bounds
    its weight. The paper sets no lower bound (eps_low "large") and tunes only eps_high, whose
    value it does not report: clip_eps_low=None here means no lower bound, and clip_eps_high
    defaults to 0.28, DAPO's clip-higher range (Yu et al. 2025), a choice, not the paper's.
    The paper normalises by the total number of tokens: agg="token_mean" by default.
    At r = 1 (on-policy) the gradient is REINFORCE's (`reinforce`) exactly.
    Args: as in `ppo_clip`. Returns: (loss, metrics) with cispo/policy_loss, cispo/clipfrac
      (fraction of valid tokens whose weight was clipped) and cispo/approx_kl,
      cispo/ratio_mean, cispo/ratio_max as in `ppo_clip`. Padding is selected away first; the
      log-ratio is clamped to +-LOG_RATIO_CLAMP before exp.
    """
    _require(_positive(clip_eps_high), f"cispo: clip_eps_high must be > 0, got {clip_eps_high}")
    _require(clip_eps_low is None or _in_range(clip_eps_low, 1e-30, 1.0 + 1e-12),
             f"cispo: clip_eps_low must be in (0, 1] or None, got {clip_eps_low}")
    m, adv, lp, log_ratio = _ratio_inputs(logps, old_logps, advantages, mask)
    ratio = jnp.exp(jnp.clip(jax.lax.stop_gradient(log_ratio), -LOG_RATIO_CLAMP,
                             LOG_RATIO_CLAMP))
    low = 0.0 if clip_eps_low is None else 1.0 - clip_eps_low
    weight = jnp.clip(ratio, low, 1.0 + clip_eps_high)  # a constant: built from sg(log_ratio)
    loss = aggregate(-weight * adv * lp, m, agg, normalizer=normalizer)
    return loss, {"cispo/policy_loss": loss,
                  "cispo/clipfrac": masked_mean(weight != ratio, m),
                  **_ratio_metrics("cispo", ratio, log_ratio, m)}


@registry.register("policy_loss", args={
    "tau_pos": schema.Float(gt=0, doc="gate temperature on tokens with a positive advantage"),
    "tau_neg": schema.Float(gt=0, doc="gate temperature on the other tokens")})
def sapo(*, logps, old_logps, advantages, mask, tau_pos=1.0, tau_neg=1.05,
         agg="seq_mean_token_mean", normalizer=None):
    """SAPO (Qwen team 2025, "Soft Adaptive Policy Optimization", arXiv:2511.20347): PPO's hard clip
    replaced by a smooth gate on the token ratio, as a loss to minimise. Shapes [B, T].

    r_t = pi(y_t) / pi_old(y_t);  f(r) = sigmoid(tau (r - 1)) * 4 / tau with tau = tau_pos
    where A_t > 0 and tau_neg elsewhere;  loss = -aggregate(f(r_t) A_t). The gradient is
    w_t A_t grad log pi(y_t) with w_t = 4 sigmoid(tau (r_t - 1)) (1 - sigmoid(...)) r_t: 1 at
    r = 1 (REINFORCE on-policy), decaying smoothly as r leaves 1, faster for larger tau (the
    paper takes tau_neg > tau_pos, 1.05 and 1.0: negative updates spread over many tokens).
    The paper averages tokens per sequence, then sequences: agg="seq_mean_token_mean".
    Args: as in `ppo_clip`. Returns: (loss, metrics) with sapo/policy_loss, sapo/gate_mean
      (the mean gradient weight w_t over valid tokens; 1 on-policy) and sapo/approx_kl,
      sapo/ratio_mean, sapo/ratio_max as in `ppo_clip`. Padding is selected away first; the
      log-ratio is clamped to +-LOG_RATIO_CLAMP before exp.
    """
    _require(_positive(tau_pos) and _positive(tau_neg),
             f"sapo: temperatures must be > 0, got {tau_pos}, {tau_neg}")
    m, adv, _, log_ratio = _ratio_inputs(logps, old_logps, advantages, mask)
    ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    tau = jnp.where(adv > 0, tau_pos, tau_neg)
    gate = jax.nn.sigmoid(tau * (ratio - 1.0))
    loss = -aggregate(gate * (4.0 / tau) * adv, m, agg, normalizer=normalizer)
    weight = jax.lax.stop_gradient(4.0 * gate * (1.0 - gate) * ratio)
    return loss, {"sapo/policy_loss": loss, "sapo/gate_mean": masked_mean(weight, m),
                  **_ratio_metrics("sapo", jax.lax.stop_gradient(ratio), log_ratio, m)}


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
