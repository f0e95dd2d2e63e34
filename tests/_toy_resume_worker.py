"""A small training loop that checkpoints and resumes, for the SIGKILL resume test.

Usage: python tests/_toy_resume_worker.py WORKDIR TOTAL_STEPS SAVE_EVERY
Prints "step N" after each step. Everything that evolves (params, Adam state, RNG key, data
position) is checkpointed, so a resumed run must end bitwise equal to an uninterrupted one.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.checkpoint import Checkpointer, abstract


def batch_at(index):
    rng = np.random.default_rng(index)
    x = rng.normal(size=(8, 16)).astype(np.float32)
    return x, x @ np.linspace(-1, 1, 16).astype(np.float32)


def main(workdir, total_steps, save_every):
    opt = optax.adam(1e-2)
    params = {"w": jnp.zeros(16), "b": jnp.zeros(())}
    train = {"opt": opt.init(params), "rng": jax.random.key(0)}
    meta = {"data_index": 0}
    ckpt = Checkpointer(workdir, max_to_keep=2, save_interval_steps=save_every)
    if ckpt.latest_step() is not None:
        params, train, meta = ckpt.restore(params=abstract(params), train=abstract(train))

    @jax.jit
    def update(params, train, x, y):
        rng, noise_key = jax.random.split(train["rng"])

        def loss(p):
            noise = 0.01 * jax.random.normal(noise_key, y.shape)
            return jnp.mean(jnp.square(x @ p["w"] + p["b"] - y - noise))

        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, train["opt"], params)
        return optax.apply_updates(params, updates), {"opt": opt_state, "rng": rng}

    step = meta.get("step", 0)
    index = meta["data_index"]
    while step < total_steps:
        params, train = update(params, train, *batch_at(index))
        step, index = step + 1, index + 1
        ckpt.save(step, params=params, train=train, meta={"data_index": index},
                  force=step == total_steps)
        print(f"step {step}", flush=True)
    ckpt.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
