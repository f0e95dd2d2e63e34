"""Device mesh (data, fsdp, tensor), logical-axis rules, batch/param placement, multi-host init.

Parameters carry logical axis names (`model.LOGICAL_AXES`: vocab, embed, mlp, heads, kv_heads,
kv, norm, pos). A rules mapping {logical name: mesh axis | tuple of mesh axes | None} turns
them into `PartitionSpec`s; `jax.jit` with those `NamedSharding`s then runs data parallelism
(batch over data and fsdp), FSDP/ZeRO-3 (weights split over fsdp along `embed`) and tensor
parallelism (heads/mlp/vocab over tensor) from one program. Nothing here is model-specific.

Typical use:

    mesh = make_mesh((-1, 1, 1))                       # all devices data-parallel
    graphdef, params = init_sharded(lambda: model.build(cfg), mesh=mesh)
    batch = shard_batch(batch, mesh)
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rlhf_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis. FSDP shards the model width; tensor parallelism splits heads, the
# MLP hidden width and the vocabulary (Megatron-style, Shoeybi et al. 2019). Head dim and norm
# scales are small and stay replicated.
DEFAULT_RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "kv": None,
    "norm": None,
    "pos": None,
    "lora": None,      # the rank axis of LoRA factors: small, replicated
}

log = logging.getLogger(__name__)


def _get(config, key, default=None):
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------


def resolve_mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, int, int]:
    """Replace a single -1 in a (data, fsdp, tensor) shape by "the rest of the devices".

    Raises ValueError naming what to change when the shape cannot fit `n_devices`.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ConfigError(f"mesh shape {shape} must have {len(MESH_AXES)} entries "
                         f"for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ConfigError(f"mesh shape {shape}: at most one axis may be -1 ('the rest')")
    if any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh shape {shape}: sizes must be positive or -1")
    fixed = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % fixed:
            raise ConfigError(
                f"mesh shape {shape}: the fixed axes use {fixed} devices, which does not divide "
                f"the {n_devices} available; choose sizes whose product divides {n_devices}")
        shape = tuple(n_devices // fixed if s == -1 else s for s in shape)
    elif fixed != n_devices:
        raise ConfigError(
            f"mesh shape {dict(zip(MESH_AXES, shape))} needs {fixed} devices but "
            f"{n_devices} are available; make the product equal {n_devices} or use -1 for "
            "one axis")
    return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), *, devices=None) -> Mesh:
    """A `Mesh` over axes (data, fsdp, tensor); one entry may be -1 ("the rest").

    devices: defaults to all (global) devices. Axes are `AxisType.Auto`, so the compiler
    propagates shardings from the in/out shardings given to `jax.jit`.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(shape, len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        # Let JAX order devices for the physical topology (ICI rings on TPU).
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


# ----------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec
# ----------------------------------------------------------------------------------------------


def logical_to_spec(logical_axes, shape, mesh: Mesh, rules: Mapping[str, Any] | None = None,
                    *, strict: bool = False) -> PartitionSpec:
    """PartitionSpec for one array from its logical axis names.

    A dimension whose size is not divisible by its mesh axes is replicated instead (e.g. 2 kv
    heads on a tensor axis of 8), and a mesh axis already used by an earlier dimension is not
    reused; with strict=True both raise instead. Unknown logical names raise.
    """
    rules = DEFAULT_RULES if rules is None else rules
    if logical_axes is None:
        return PartitionSpec()
    if len(logical_axes) != len(shape):
        raise ConfigError(f"logical axes {logical_axes} do not match shape {shape}")
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ConfigError(f"no sharding rule for logical axis {name!r}; add it to the rules "
                             f"(known: {sorted(rules)})")
        target = rules[name]
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if mesh.shape[a] > 1)   # size-1 axes change nothing
        n = math.prod(mesh.shape[a] for a in axes)
        problem = None
        if used & set(axes):
            problem = f"mesh axes {axes} already used by another dimension"
        elif size % n:
            problem = f"size {size} not divisible by mesh axes {axes} (size {n})"
        if problem:
            if strict:
                raise ConfigError(f"cannot shard logical axis {name!r}: {problem}")
            axes = ()
        used.update(axes)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*spec)


def param_specs(params, mesh: Mesh, rules: Mapping[str, Any] | None = None, *,
                strict: bool = False):
    """PartitionSpec for every parameter (a tree shaped like `params`), from its
    `logical_axes` metadata. Works on abstract params (from nnx.eval_shape) too."""
    def spec(v):
        axes = v.get_metadata().get("logical_axes")
        return v.replace(logical_to_spec(axes, v.shape, mesh, rules, strict=strict))

    return jax.tree.map(spec, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(params, mesh: Mesh, rules: Mapping[str, Any] | None = None, *,
                    strict: bool = False):
    """NamedSharding for every parameter (a tree shaped like `params`)."""
    specs = param_specs(params, mesh, rules, strict=strict)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_params(params, mesh: Mesh, rules: Mapping[str, Any] | None = None):
    """Place existing (e.g. host-loaded) params into their sharded layout."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


def init_sharded(make_model: Callable[[], nnx.Module], *, mesh: Mesh,
                 rules: Mapping[str, Any] | None = None):
    """Initialise a model directly in its sharded layout: returns (graphdef, params).

    Shapes come from `nnx.eval_shape` (nothing is allocated), specs from the logical axes, and
    a jitted init with `out_shardings` materialises each shard on its own device, so a model
    too big for one device never exists unsharded. `make_model` must be deterministic (e.g.
    `lambda: model.build(cfg, seed=0)`); with partitionable threefry (JAX's default) the values
    do not depend on the mesh.
    """
    abstract = nnx.eval_shape(make_model)
    graphdef, abstract_params = nnx.split(abstract)
    shardings = param_shardings(abstract_params, mesh, rules)

    init = jax.jit(lambda: nnx.split(make_model())[1], out_shardings=shardings)
    return graphdef, init()


# ----------------------------------------------------------------------------------------------
# Inside jitted steps: the mesh a stage runs on
# ----------------------------------------------------------------------------------------------

# (mesh, rules) of the stage now running; model code reads it through `constrain`.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("rlhf_jax_mesh", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Mapping[str, Any] | None = None):
    """Within the block, `constrain` and `constrain_state` pin arrays in jitted code to
    `mesh` by logical names (a no-op on one device, or outside any block).

    The mesh also becomes JAX's abstract mesh, which is part of jit's trace context, so a
    function traced under one mesh is traced again under another (never a stale layout). The
    rules are read when a function is traced and are not part of that context: in one
    process, stages on meshes of the same shape are expected to use the same rules (another
    stage's would only change layouts, not numbers).
    """
    token = _ACTIVE.set((mesh, DEFAULT_RULES if rules is None else dict(rules)))
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            yield
    finally:
        _ACTIVE.reset(token)


def active_mesh():
    """(mesh, rules) set by `activate`, or None."""
    return _ACTIVE.get()


def constrain(x, logical_axes):
    """`x` laid out by its logical axis names on the active mesh (`activate`); unchanged on
    one device or with no active mesh. E.g. constrain(h, ("batch", None, None)) keeps
    activations [B, T, D] split over the batch axes, where XLA would otherwise follow the
    fsdp-sharded weights and all-gather the batch."""
    active = _ACTIVE.get()
    if active is None or active[0].size == 1:
        return x
    mesh, rules = active
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, spec)


def constrain_state(tree):
    """Every array of a parameter or optimizer-state tree pinned to its declared layout on the
    active mesh: an nnx.Variable by its `logical_axes` (as `param_specs`), anything else (step
    counts, scalars) replicated. An update step's outputs so keep the layout its inputs came
    in, and the next step does not compile again."""
    active = _ACTIVE.get()
    if active is None or active[0].size == 1:
        return tree
    mesh, rules = active

    def one(v):
        if isinstance(v, nnx.Variable):
            axes = v.get_metadata().get("logical_axes")
            spec = logical_to_spec(axes, v.shape, mesh, rules)
            return v.replace(jax.lax.with_sharding_constraint(v[...], spec))
        if isinstance(v, jax.Array) or hasattr(v, "shape"):
            return jax.lax.with_sharding_constraint(v, PartitionSpec())
        return v

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def batch_spec(ndim: int, rules: Mapping[str, Any] | None = None) -> PartitionSpec:
    """Leading (batch) axis over the rules' "batch" mesh axes (data, fsdp); others replicated."""
    rules = DEFAULT_RULES if rules is None else rules
    return PartitionSpec(rules.get("batch", BATCH_AXES), *([None] * (ndim - 1)))


def batch_shardings(batch, mesh: Mesh, rules: Mapping[str, Any] | None = None):
    """NamedSharding for every array of a batch pytree (leading axis = batch)."""
    return jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(np.ndim(x), rules)), batch)


def check_batch_size(batch_size: int, mesh: Mesh, rules: Mapping[str, Any] | None = None):
    """Raise a ValueError naming the fix when the batch does not split over the batch axes."""
    rules = DEFAULT_RULES if rules is None else rules
    axes = rules.get("batch", BATCH_AXES)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    n = math.prod(mesh.shape[a] for a in axes)
    if batch_size % n:
        sizes = " * ".join(f"{a}={mesh.shape[a]}" for a in axes)
        raise ConfigError(f"batch size {batch_size} is not divisible by {sizes} = {n}; use a "
                         f"multiple of {n} or change the mesh shape")


def shard_batch(batch, mesh: Mesh, rules: Mapping[str, Any] | None = None):
    """Place a host batch (pytree of arrays with a common leading batch axis) on the mesh.

    Single process: the arrays are the global batch. Multi-process: each process passes the
    same global batch and keeps only the shards its devices hold (use
    `jax.make_array_from_process_local_data` instead if each host loads only its own slice).
    """
    for x in jax.tree.leaves(batch):
        check_batch_size(np.shape(x)[0], mesh, rules)
    shardings = batch_shardings(batch, mesh, rules)
    if jax.process_count() == 1:
        return jax.device_put(batch, shardings)

    def place(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(place, batch, shardings)


# ----------------------------------------------------------------------------------------------
# Multi-host
# ----------------------------------------------------------------------------------------------


def device_get(tree):
    """`jax.device_get` that works in every process of a multi-host run.

    An array split over several processes' devices (a batch's completions or scores on a mesh
    whose data x fsdp spans hosts) cannot be read by one process alone: `np.asarray` and
    `jax.device_get` raise. Such arrays are first all-gathered (one collective each, so every
    process must call this at the same point, as they all run the same steps); arrays a
    process holds whole, replicated ones included, are copied as they are. Single process:
    `jax.device_get` itself.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return multihost_utils.process_allgather(x, tiled=True)
        return jax.device_get(x)

    return jax.tree.map(one, tree)


def initialize_distributed(config=None) -> bool:
    """Call `jax.distributed.initialize` for multi-host runs; skip it for single-host runs.

    Reads `coordinator_address`, `num_processes`, `process_id` (and optionally
    `local_device_ids`, `initialization_timeout`) from `config` (a mapping or an object with
    attributes), falling back to the environment variables JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID. With `config.distributed == "auto"` it calls
    `jax.distributed.initialize()` with no arguments so JAX detects the cluster (TPU pod
    slices, SLURM, Open MPI). Must run before any other JAX call. Returns True if it
    initialised the runtime (False when single-host or already initialised).
    """
    if jax.distributed.is_initialized():
        return False
    mode = _get(config, "distributed", None)
    if mode == "auto":
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(
                f"mesh.distributed='auto' found no cluster to join ({first}); on one machine "
                "set mesh.distributed=false, or true with JAX_COORDINATOR_ADDRESS, "
                "JAX_NUM_PROCESSES and JAX_PROCESS_ID") from None
        return True
    if mode is False:
        return False
    address = _get(config, "coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = _get(config, "num_processes") or os.environ.get("JAX_NUM_PROCESSES")
    pid = _get(config, "process_id")
    if pid is None:
        pid = os.environ.get("JAX_PROCESS_ID")
    num = None if num is None else int(num)
    if mode is True and address is None and num is None:
        # Asked for a multi-host run but told nothing about the other hosts: running alone
        # would silently train on a fraction of the intended devices and data.
        raise ConfigError(
            "mesh.distributed=true but no coordinator is given; set JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process, or use "
            "mesh.distributed='auto' on a cluster JAX detects (TPU pod, SLURM, Open MPI)")
    if address is None and (num is None or num <= 1):
        return False            # single host
    if address is None or num is None or pid is None:
        raise ConfigError(
            "multi-host run needs coordinator_address, num_processes and process_id (config "
            "or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); got "
            f"address={address!r}, num_processes={num!r}, process_id={pid!r}. "
            "Or set distributed='auto' on a TPU pod / SLURM cluster")
    kwargs = {}
    if _get(config, "local_device_ids") is not None:
        kwargs["local_device_ids"] = _get(config, "local_device_ids")
    if _get(config, "initialization_timeout") is not None:
        kwargs["initialization_timeout"] = int(_get(config, "initialization_timeout"))
    log.info("jax.distributed.initialize(%s, num_processes=%d, process_id=%s)", address, num, pid)
    jax.distributed.initialize(coordinator_address=address, num_processes=num,
                               process_id=int(pid), **kwargs)
    return True
