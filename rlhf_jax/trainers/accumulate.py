"""Gradient accumulation: one update from k micro-batches, equal to the whole batch's.

Every trainer takes `micro_batches=k`: its batch is split into k micro-batches along the row
axis, the forward and backward passes run on one micro-batch at a time inside a `lax.scan`
(so activations of B / k rows are alive at once), and their gradients are summed before one
optimizer step. The update equals the whole-batch update because each micro-batch's loss is its
*share* of the whole-batch loss, not its own mean:

- token losses divide their micro-batch sum by the whole batch's denominator
  (`aggregation.denominator`, passed as `normalizer`);
- preference losses are weighted row means (the batch contract in losses.py), so a
  micro-batch's loss times (its weight sum / the batch's) is its share; a batch statistic
  (BCO's shift, KTO's reference point) is computed once over the whole batch and passed in;
- a mean over a fixed number of rows (reward-model losses) is scaled by 1 / k.

Metrics are combined the same way (shares summed), so a weighted-mean metric is the batch's.
`micro_batches=1` runs the trainer's single-batch code, unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax import model


def split(batch: dict, k: int, rows: int) -> dict:
    """The batch as k micro-batches: every array gains a leading axis of size k.

    `rows` is the number of rows (pairs, prompts, sequences) of the batch. An array whose
    leading size is g x rows holds g blocks of rows (the [2B, T] pair layout: B chosen rows,
    then B rejected rows); micro-batch j takes the j-th slice of each block, so it keeps the
    same layout with rows / k rows. Arrays without a leading row axis are not allowed.
    """
    def one(x):
        g, rem = divmod(x.shape[0], rows)
        if rem or g == 0:
            raise ValueError(f"a batch array of leading size {x.shape[0]} is not a multiple of "
                             f"its {rows} rows")
        x = x.reshape((g, k, rows // k) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape((k, g * (rows // k)) + x.shape[3:])
    return jax.tree.map(one, batch)


def grads(share_fn, params, micro: dict, *args):
    """Sum over micro-batches of value_and_grad(share_fn)(params, micro_j, *args).

    share_fn(params, micro_batch, *args) -> (loss share, {metric: share}); micro has a leading
    axis k (`split`). Returns ((loss, metrics), grads) like `jax.value_and_grad(...,
    has_aux=True)` on the whole batch.
    """
    if model.has_adapters(params):
        # LoRA: the frozen base has no gradient to accumulate; differentiate and carry only
        # the trainable leaves (no base-sized buffer in the scan), zeros for the rest.
        layout, train, frozen = model.split_trainable(params)
        (loss, metrics), g = grads(
            lambda t, mb, *a: share_fn(model.join_trainable(layout, t, frozen), mb, *a),
            train, micro, *args)
        zeros = [jax.tree.map(jnp.zeros_like, x) for x in frozen]
        return (loss, metrics), model.join_trainable(layout, g, zeros)
    vg = jax.value_and_grad(share_fn, has_aux=True)

    def body(carry, mb):
        (loss, metrics), g = vg(params, mb, *args)
        total = jax.tree.map(jnp.add, carry, (loss, metrics, g))
        return total, None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(vg, params, first, *args)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        (shapes[0][0], shapes[0][1], shapes[1]))
    (loss, metrics, g), _ = jax.lax.scan(body, zero, micro)
    return (loss, metrics), g


def weight_share(weights, total_weight):
    """A micro-batch's share of a weighted row mean: max(sum w, 1)/max(sum W, 1) as the batch
    contract normalises (its loss times this is its part of the whole batch's loss)."""
    w = jnp.sum(jnp.where(weights > 0, weights, 0.0).astype(jnp.float32))
    return jnp.maximum(w, 1.0) / jnp.maximum(total_weight, 1.0)
