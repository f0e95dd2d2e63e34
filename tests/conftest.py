"""Shared test settings: offline, deterministic, float32 on the CPU."""

import os
import tempfile

# Tests never need an accelerator; keep JAX from probing for one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The XLA:CPU flag every experiment module runs with (rlhf_jax/experiment.py), so the tests
# check what users run; it also makes the suite ~10% faster. Inherited by subprocesses.
from rlhf_jax import experiment  # noqa: E402  (imports no JAX)

experiment.use_fast_cpu_flags()

# One persistent compilation cache for the whole session, subprocesses included: several tests
# build the same smoke-size stages, and compiling them dominates their run time on 2 cores.
# Set before JAX is imported by any test module; inherited by the subprocesses tests start.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlhf_jax_jit_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


import logging  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_logging():
    """experiment.run sends logging to WORKDIR/log.txt; give the next test the handlers back."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    hook = sys.unraisablehook
    yield
    sys.unraisablehook = hook
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler not in saved[0]:
            handler.close()
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    logging.captureWarnings(False)
