"""Reduction of masked per-token losses to a scalar, in one place.

Each mode is a registered function `(per_token [B, T], mask [B, T]) -> (sum, denominator)`.
A position is valid where mask > 0; padded positions are selected away (`select`), so whatever
they hold (NaN, inf) changes neither the sum, the denominator nor the gradient.
The loss is sum / denominator. Keeping the two apart is what makes micro-batching, gradient
accumulation and sharding exact: summing the parts of micro-batches and dividing once gives
the whole-batch number, whereas averaging micro-batch means does not (the token-mean of a
batch is not the mean of its halves' token-means when they hold different numbers of tokens).
A trainer that accumulates gradients computes the whole batch's denominator once
(`denominator`) and passes it to the loss as `normalizer`, so every micro-batch loss is its
share of the whole-batch loss.

Modes (see docs/implementation_details.md, "Loss aggregation"):
  token_mean               sum over all valid tokens / number of valid tokens.
  seq_mean_token_mean      mean over sequences of each sequence's token mean (GRPO, Shao et
                           al. 2024, eq. 3); sequences with no valid token are not counted.
  seq_mean_token_sum_norm  mean over sequences of each sequence's token sum divided by a
                           constant `norm` (Dr. GRPO, Liu et al. 2025, sec. 3.1), which must
                           be bound: "seq_mean_token_sum_norm(norm=256)".
"""

import jax.numpy as jnp

from rlhf_jax import registry, schema


def valid(mask):
    """The valid positions of a mask as booleans: mask > 0.

    Masks are 0/1 (or bool). Anything that is not > 0 is padding, a NaN entry included: NaN > 0
    is False. Refusing a NaN mask would need a host sync inside jit; this rule gives it one
    meaning everywhere instead, and counts come from these booleans, never from summing the
    mask itself, so a NaN entry cannot reach a denominator either.
    """
    return jnp.asarray(mask) > 0


def select(x, mask, fill=0.0):
    """float32 x at valid positions of `mask`, `fill` at padded ones. Shapes broadcast.

    Masking selects, it does not multiply: padding may hold NaN, inf or -inf log-probs, and
    inf * 0 is NaN. Applied to an input before any arithmetic, this is the "double where" for
    gradients too: the padded values never enter a computation, so neither the value nor the
    gradient at a valid position can depend on them, and the gradient at a padded position is
    exactly 0 (a `where` on the output alone still differentiates the discarded branch, and
    0 * d/dx(f(inf)) is NaN; JAX FAQ, "gradients contain NaN where using where").
    """
    return jnp.where(valid(mask), jnp.asarray(x, jnp.float32), jnp.float32(fill))


def _masked(per_token, mask):
    """(values with padded positions 0, the valid positions as 0./1.), both float32."""
    ok = valid(mask)
    return select(per_token, ok), ok.astype(jnp.float32)


@registry.register("loss_agg", args={})
def token_mean(per_token, mask):
    """(sum over valid tokens, number of valid tokens). Shapes: [B, T] -> scalars."""
    x, m = _masked(per_token, mask)
    return jnp.sum(x), jnp.sum(m)


@registry.register("loss_agg", args={})
def seq_mean_token_mean(per_token, mask):
    """(sum over sequences of their token means, number of non-empty sequences). [B, T]."""
    x, m = _masked(per_token, mask)
    tokens = jnp.sum(m, axis=-1)
    seq_means = jnp.sum(x, axis=-1) / jnp.maximum(tokens, 1.0)
    return jnp.sum(seq_means), jnp.sum(tokens > 0).astype(jnp.float32)


@registry.register("loss_agg", args={
    "norm": schema.Float(gt=0, doc="constant token count each sequence sum is divided by")})
def seq_mean_token_sum_norm(per_token, mask, *, norm):
    """(sum over valid tokens / norm, number of sequences). [B, T].

    Dr. GRPO's constant normaliser: every token weighs the same whatever the length of its
    sequence, removing the length bias of per-sequence means (Liu et al. 2025). `norm` must be
    given (e.g. "seq_mean_token_sum_norm(norm=256)", the generation budget): defaulting it to
    the padded length would give micro-batches padded to different lengths different
    normalisers, and their losses would no longer add up to the whole batch's.
    """
    x, _ = _masked(per_token, mask)
    return jnp.sum(x) / norm, jnp.asarray(x.shape[0], jnp.float32)


def parts(per_token, mask, mode="token_mean"):
    """(sum, denominator) of `per_token` under `mask` for a registered mode (name or spec)."""
    return registry.call(registry.get("loss_agg", mode), per_token=per_token, mask=mask)


def denominator(mask, mode="token_mean"):
    """The denominator of `mode` for a whole batch, to pass as `normalizer` to micro-batches."""
    return parts(jnp.zeros(jnp.shape(mask), jnp.float32), mask, mode)[1]


def aggregate(per_token, mask, mode="token_mean", *, normalizer=None):
    """Masked per-token values [B, T] -> scalar, float32.

    `mode` is a registered `loss_agg` name or spec ("seq_mean_token_sum_norm(norm=512)").
    `normalizer`, when given, replaces this batch's denominator: pass the whole batch's
    `denominator(...)` when this is one micro-batch of it. An empty denominator gives 0, not NaN.
    """
    total, denom = parts(per_token, mask, mode)
    if normalizer is not None:
        denom = jnp.asarray(normalizer, jnp.float32)
    return jnp.where(denom > 0, total / jnp.where(denom > 0, denom, 1.0), 0.0)


def last_token_index(mask):
    """Index of the last valid token of each row, for any padding side. mask [B, T] -> [B] int32
    (0 for a row with no valid token)."""
    t = jnp.shape(mask)[-1]
    return jnp.max(jnp.where(valid(mask), jnp.arange(t), 0), axis=-1).astype(jnp.int32)


def masked_mean(x, mask):
    """Mean of x over mask (any shape); 0 when the mask is empty. For metrics."""
    total, count = token_mean(x, mask)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)
