"""Subprocess entry point for tests/test_sharding.py (JAX must start with its own devices).

    python tests/_sharding_worker.py meshes
        8 simulated CPU devices; for each mesh the forward logits, the loss and the params after
        one AdamW step must match the single-device run. Prints "OK <mesh>" lines.

The helpers (config, batch, step) are imported by the test to compute the single-process
reference, so importing this file must not touch JAX's configuration.
"""

import os
import sys

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
BATCH, LENGTH = 8, 16
LR = 1e-2


def model_config():
    from rlhf_jax import model
    return model.get_config("tiny", max_len=LENGTH)


def make_batch():
    import numpy as np
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(BATCH, LENGTH)).astype(np.int32)
    lengths = rng.integers(LENGTH // 2, LENGTH + 1, size=BATCH)
    mask = np.arange(LENGTH)[None, :] < lengths[:, None]        # right padding
    return {"tokens": tokens, "mask": mask}


def make_step(graphdef):
    """A jitted next-token cross-entropy AdamW step: (params, opt_state, batch) ->
    (params, opt_state, loss, grads, logits); the logits are those of the forward pass."""
    import jax
    import jax.numpy as jnp
    import optax
    from rlhf_jax import model

    optimizer = optax.adamw(LR, weight_decay=0.1)

    def loss_fn(params, batch):
        logits, _ = model.apply(graphdef, params, batch["tokens"], mask_bt=batch["mask"])
        target_mask = batch["mask"][:, 1:]
        logp = model.token_logprobs(logits[:, :-1], batch["tokens"][:, 1:], target_mask)
        return -jnp.sum(logp) / jnp.sum(target_mask), logits

    @jax.jit
    def step(params, opt_state, batch):
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads, logits

    return optimizer, step


def run(mesh):
    """Init on `mesh` and take one step; returns host copies of logits, loss, grads, params."""
    import jax
    from rlhf_jax import model, sharding

    cfg = model_config()
    graphdef, params = sharding.init_sharded(lambda: model.build(cfg, seed=0), mesh=mesh)
    optimizer, step = make_step(graphdef)
    batch = sharding.shard_batch(make_batch(), mesh)
    opt_state = optimizer.init(params)       # zeros_like keeps each param's sharding
    params, opt_state, loss, grads, logits = step(params, opt_state, batch)
    host = lambda x: jax.device_get(x) if x.is_fully_addressable else None
    return dict(logits=host(logits), loss=float(loss), params=jax.tree.map(host, params),
                grads=jax.tree.map(host, grads))


def assert_step_matches(out, ref):
    """Compare one sharded run with the single-device reference (fp32).

    Loss, logits and gradients: rtol 1e-5 (gradients with an absolute floor of 1e-5 of the
    largest gradient, since tiny entries come from cancellation). The AdamW-updated params:
    rtol 1e-5 with an absolute floor of 1e-3 * lr, because Adam's first step is
    lr * g / (|g| + eps), nearly sign(g), so it turns a 1e-7 absolute difference in a
    near-zero gradient into an O(lr) relative change of that one update; 1e-3 * lr says the
    normalised updates agree to 0.1%.
    """
    import jax
    import numpy as np

    np.testing.assert_allclose(out["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=1e-5, atol=1e-6)
    gmax = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref["grads"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * gmax),
                 out["grads"], ref["grads"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3 * LR),
                 out["params"], ref["params"])


def main_meshes():
    import jax
    from rlhf_jax import sharding

    assert jax.device_count() == 8, jax.devices()
    ref = run(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    for shape in MESHES:
        mesh = sharding.make_mesh(shape)
        assert_step_matches(run(mesh), ref)
        print("OK", shape, flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if mode != "meshes":
        sys.exit(f"unknown mode {mode!r}; the worker runs 'meshes'")
    main_meshes()
