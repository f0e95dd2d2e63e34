"""Mesh construction, logical-axis rules, batch checks, and sharded == single-device runs.

The multi-device checks run tests/_sharding_worker.py in subprocesses, because XLA_FLAGS
(--xla_force_host_platform_device_count) must be set before JAX starts and this pytest process
already has JAX initialised with one CPU device. Whole trainers on meshes and as two
jax.distributed processes: tests/test_trainers_mesh.py, tests/test_distributed_trainer.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlhf_jax import model, sharding
from rlhf_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_sharding_worker.py"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return env


class _FakeMesh:
    """Only `.shape` is read by the spec logic; lets one device test 8-way rules."""

    def __init__(self, data=1, fsdp=1, tensor=1):
        self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor}


def test_resolve_mesh_shape_fills_the_rest():
    assert sharding.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    assert sharding.resolve_mesh_shape((1, 1, 8), 8) == (1, 1, 8)


@pytest.mark.parametrize("shape,match", [
    ((3, -1, 1), "does not divide"),
    ((2, 2, 1), "needs 4 devices but 8"),
    ((-1, -1, 1), "at most one"),
    ((8, 1), "3 entries"),
])
def test_resolve_mesh_shape_errors_say_what_to_change(shape, match):
    with pytest.raises(ValueError, match=match):
        sharding.resolve_mesh_shape(shape, 8)


def test_make_mesh_single_device():
    mesh = sharding.make_mesh((-1, 1, 1))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_logical_to_spec_rules_divisibility_and_reuse():
    mesh = _FakeMesh(data=2, fsdp=2, tensor=2)
    assert sharding.logical_to_spec(("embed", "heads", "kv"), (32, 4, 8), mesh) == \
        P("fsdp", "tensor", None)
    # 1 kv head cannot be split over tensor=2: replicated, unless strict.
    assert sharding.logical_to_spec(("embed", "kv_heads", "kv"), (32, 1, 8), mesh) == \
        P("fsdp", None, None)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.logical_to_spec(("embed", "kv_heads", "kv"), (32, 1, 8), mesh, strict=True)
    # A mesh axis is used at most once per array.
    rules = dict(sharding.DEFAULT_RULES, mlp="fsdp")
    assert sharding.logical_to_spec(("embed", "mlp"), (32, 64), mesh, rules) == P("fsdp", None)
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.logical_to_spec(("nonsense",), (4,), mesh)
    # Size-1 mesh axes drop out of the spec.
    assert sharding.logical_to_spec(("vocab", "embed"), (64, 32), _FakeMesh(data=8)) == P(None, None)


def test_every_param_has_logical_axes_matching_its_rank():
    for kind in ("policy", "reward", "value"):
        _, params = model.create(model.get_config("tiny_gpt2"), kind=kind)
        for path, var in jax.tree_util.tree_leaves_with_path(
                params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
            axes = var.get_metadata().get("logical_axes")
            assert axes is not None and len(axes) == var[...].ndim, path
            assert set(axes) <= set(model.LOGICAL_AXES), (path, axes)


def test_check_batch_size_names_the_fix():
    mesh = _FakeMesh(data=2, fsdp=4)
    sharding.check_batch_size(16, mesh)
    with pytest.raises(ValueError, match="data=2 \\* fsdp=4 = 8"):
        sharding.check_batch_size(12, mesh)


def test_init_sharded_single_device_matches_eager_init():
    cfg = model.get_config("tiny")
    mesh = sharding.make_mesh((1, 1, 1))
    graphdef, params = sharding.init_sharded(lambda: model.build(cfg, seed=4), mesh=mesh)
    _, eager = model.create(cfg, seed=4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 params, eager)
    batch = sharding.shard_batch({"tokens": jnp.zeros((2, 4), jnp.int32)}, mesh)
    logits, _ = model.apply(graphdef, params, batch["tokens"])
    assert logits.shape == (2, 4, cfg.vocab_size)


def test_initialize_distributed_skips_single_host(monkeypatch):
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    assert sharding.initialize_distributed(None) is False
    assert sharding.initialize_distributed({"num_processes": 1}) is False
    with pytest.raises(ValueError, match="process_id"):
        sharding.initialize_distributed({"coordinator_address": "127.0.0.1:1",
                                         "num_processes": 2})
    # Asked for, but nothing to join: one line saying what to set, never a silent single host
    # run or JAX's own traceback.
    with pytest.raises(ConfigError, match="mesh.distributed=true but no coordinator"):
        sharding.initialize_distributed({"distributed": True})
    with pytest.raises(ConfigError, match="mesh.distributed='auto' found no cluster"):
        sharding.initialize_distributed({"distributed": "auto"})


def test_sharded_meshes_match_single_device():
    """Meshes (8,1,1), (2,4,1), (2,2,2), (1,1,8) on 8 simulated CPU devices: logits, loss,
    gradients and AdamW-updated params match one device (see the worker for tolerances)."""
    proc = subprocess.run([sys.executable, str(WORKER), "meshes"], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.count("OK") == 4, proc.stdout


