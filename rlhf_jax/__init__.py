"""rlhf_jax: JAX-first research code for reinforcement learning from human feedback.

Submodules are imported on first use, so `import rlhf_jax` stays cheap and a script that only
needs the losses never pays for the model or the data stack:

    from rlhf_jax import losses, advantages, kl, registry
    from rlhf_jax import aggregate          # the function aggregate(per_token, mask, mode)

Axis letters used in shapes throughout the package: B batch, T tokens, D model width, V vocab,
H heads, K head dim, G group size.
"""

import importlib

__version__ = "0.1.0"


def __getattr__(name):
    if name == "aggregate":
        from rlhf_jax.aggregation import aggregate
        return aggregate
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"rlhf_jax.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"rlhf_jax.{name}":
                raise
    raise AttributeError(f"module 'rlhf_jax' has no attribute {name!r}")
