"""The pair-by-pair reference the preference batch contract is checked against."""

import jax.numpy as jnp


def weighted_mean(loss_b, metrics_b, weights):
    """(loss, metrics) averaged over pairs with weights [B] (valid: 1 real pair, 0 padding)."""
    keep = weights > 0
    w = jnp.where(keep, weights, 0).astype(jnp.float32)
    w = w / jnp.maximum(jnp.sum(w), 1.0)
    # Select, then weight: a padding row's value never enters the sum, even if it is not finite.
    mean = lambda v: jnp.sum(jnp.where(keep, v, 0.0) * w)  # noqa: E731
    return mean(loss_b), {k: mean(v) for k, v in metrics_b.items()}
