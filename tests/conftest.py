"""Shared test settings: offline, deterministic, float32 on the CPU."""

import os

# Tests never need an accelerator; keep JAX from probing for one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
