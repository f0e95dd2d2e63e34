"""Orbax checkpoints: periodic saves, exact resume, and the hand-off from one stage to the next.

A stage writes its checkpoints under `workdir/<stage>/checkpoints/<step>/`, each holding three
items:

  params  the model parameters (a pytree of arrays): all the next stage needs;
  train   everything else that evolves: optimizer state, RNG keys, KL-controller state, ...;
  meta    a JSON dict: step, data-iterator position, model config, stage config, tokenizer,
          and `checksums` of the three items (see below).

Orbax writes each step into a temporary directory and renames it only once every item is on
disk, so a checkpoint that was being written when the process died is never listed, never
restored (its leftovers are removed when the next Checkpointer opens the directory); the
previous complete step is restored instead.

Damage. A complete step can still be damaged afterwards: an item deleted, a file truncated, an
emptied step directory, unreadable JSON, or flipped bytes. Orbax (0.12) and TensorStore check
none of this for the array data: zarr stores no checksum of its chunks (zarr3's sharding codec
checksums only its chunk index) and a flipped byte in a zstd frame decodes to other numbers.
So `save` records a `fingerprint` of the params and train pytrees, and a digest of the meta
itself, in the meta, and `restore` compares them with what it read: any difference, or any
error reading a step, raises `DamagedCheckpointError` naming the step, its path and what is
wrong. `restore_newest` (what a resumed stage uses) then falls back to the newest step that
restores, with a warning line on stderr per damaged step, which it moves aside to
`<step>.damaged` so that the run writes that step afresh; `restore` (what the hand-off to the
next stage uses) never falls back: see `common.load_stage`.

Restoring takes a *target*: a pytree of arrays or `jax.ShapeDtypeStruct`s with shardings. The
arrays are read straight into that layout, so a stage can restore its predecessor's parameters
onto a different mesh than the one that saved them. The target's dtypes must be the saved ones
(the checksums are over the saved bytes).
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax.errors import CheckpointError

CHECKPOINTS = "checkpoints"
DAMAGED = ".damaged"
_TMP_MARK = ".orbax-checkpoint-tmp"


class DamagedCheckpointError(CheckpointError):
    """A listed checkpoint step that cannot be restored as it was saved."""

    def __init__(self, step: int, path: Path, reason: str):
        self.step, self.path, self.reason = step, Path(path), reason
        super().__init__(
            f"checkpoint step {step} at {path} is damaged ({reason}); delete or move away that "
            "directory and run the stage that wrote it again: it resumes from its previous "
            "checkpoint and writes this step afresh")


def _is_key(x) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    """Typed PRNG keys -> their uint32 data, which Orbax stores like any array."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_key_data(x):
    if not _is_key(x):
        return x
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    sharding = getattr(x, "sharding", None)
    if sharding is not None and hasattr(sharding, "mesh"):
        sharding = jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec, None))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def _data_to_keys(restored, target):
    def wrap(value, like):
        if not _is_key(like):
            return value
        if isinstance(like, jax.Array):
            impl = jax.random.key_impl(like)
        else:  # a ShapeDtypeStruct: the key dtype carries its implementation (rbg, threefry)
            impl = getattr(like.dtype, "_impl", None)
        return jax.random.wrap_key_data(value, impl=impl)
    return jax.tree.map(wrap, restored, target, is_leaf=_is_key)


def abstract(tree):
    """A restore target mirroring `tree`: shapes, dtypes and shardings, no data."""
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        x = jax.numpy.asarray(x) if not isinstance(x, jax.Array) else x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return jax.tree.map(leaf, tree)


# ---------------------------------------------------------------------------------------------
# Fingerprints: checksums of pytrees that do not depend on how the arrays are laid out
# ---------------------------------------------------------------------------------------------

_U64 = np.uint64
_MIX1, _MIX2 = _U64(0xFF51AFD7ED558CCD), _U64(0xC4CEB9FE1A85EC53)   # murmur3 fmix64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_CHUNK = 1 << 18   # elements hashed at a time: bounds the temporaries (~10 MB), stays in cache


def _mix(x):
    """murmur3's 64-bit finaliser, in place on a uint64 array (a bijection, wrapping)."""
    x ^= x >> _U64(33)
    x *= _MIX1
    x ^= x >> _U64(33)
    x *= _MIX2
    x ^= x >> _U64(33)
    return x


def _part_sum(data: np.ndarray, start, global_shape) -> int:
    """sum over the elements of one block of an array of mix(bits ^ golden * global index),
    mod 2**64. Addition commutes, so the blocks of any layout (shards, processes) add up to
    the same number, and a changed element always changes its term (mix is a bijection)."""
    data = np.asarray(data)
    if data.ndim == 0:
        data, start, global_shape = data.reshape(1), (0,), (1,)
    if data.size == 0:
        return 0
    data = np.ascontiguousarray(data.astype(np.uint8) if data.dtype == np.bool_ else data)
    bits = data.view(f"u{data.dtype.itemsize}")
    strides = [int(np.prod(global_shape[d + 1:], dtype=np.int64)) for d in range(data.ndim)]
    # Global flat index = row part + inner part; the inner part is the same for every row.
    inner = np.zeros((), _U64)
    for d in range(1, data.ndim):
        axis = (_U64(start[d]) + np.arange(data.shape[d], dtype=_U64)) * _U64(strides[d])
        inner = inner[..., None] + axis
    inner = inner.reshape(-1)
    rows = max(1, _CHUNK // max(1, inner.size))
    total = _U64(0)
    with np.errstate(over="ignore"):
        for r0 in range(0, data.shape[0], rows):
            r = np.arange(r0, min(r0 + rows, data.shape[0]), dtype=_U64)
            index = ((_U64(start[0]) + r) * _U64(strides[0]))[:, None] + inner[None, :]
            h = bits[r0:r0 + rows].reshape(len(r), -1).astype(_U64)
            h ^= index * _GOLDEN
            total += _mix(h).sum(dtype=_U64)
    return int(total)


def _leaf_sum(x) -> int:
    """This process's share of a leaf's sum: each addressable shard that is the first replica
    of its block (so a replicated array counts once over all devices and processes). An array
    that one process holds whole (a host array, or one on a local device, like a key made
    with jax.random.key) is taken to be the same in every process of a multi-process job:
    process 0 counts it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return sum(_part_sum(np.asarray(s.data), [sl.start or 0 for sl in s.index], x.shape)
                   for s in x.addressable_shards if s.replica_id == 0) % (1 << 64)
    if jax.process_index() != 0:
        return 0
    x = np.asarray(x)
    return _part_sum(x, [0] * x.ndim, x.shape)


def fingerprint(tree) -> str:
    """A 16-hex-digit checksum of a pytree of arrays: its leaves' dtypes, shapes and bytes.

    The same values give the same fingerprint on any mesh and any number of processes, so a
    checkpoint saved on one mesh verifies when restored onto another. Each process hashes only
    the shards it holds (first replicas), and a multi-process job adds the partial sums with one
    small all-gather: call it from every process, like `save` and `restore`.

    Cost: one pass over the arrays on the host at about 1.2-1.7 GB/s per process (after the
    copy from the device): milliseconds for the test models; for 1B float32 parameters with
    their two Adam moments (12 GB) about 8 s per save and per resume on one host, divided by
    the number of hosts on a pod (each hashes its own shards). A jitted on-device reduction
    would be faster for big models, but it compiles once per pytree structure and mesh, which
    costs more than the whole hash at the sizes the tests and smoke runs use.
    """
    leaves = [x if hasattr(x, "dtype") else jax.numpy.asarray(x)   # Python scalars as JAX
              for x in jax.tree.leaves(_keys_to_data(tree))]      # stores and restores them
    sums = [_leaf_sum(x) for x in leaves]
    if jax.process_count() > 1 and sums:
        from jax.experimental import multihost_utils
        halves = np.array([[s >> 32, s & 0xFFFFFFFF] for s in sums], np.uint32)
        gathered = np.asarray(multihost_utils.process_allgather(halves))   # [P, n, 2]
        sums = [sum((int(hi) << 32) + int(lo) for hi, lo in gathered[:, i]) % (1 << 64)
                for i in range(len(sums))]
    described = [(str(np.dtype(x.dtype)), tuple(np.shape(x)), s) for x, s in zip(leaves, sums)]
    return hashlib.blake2b(repr(described).encode(), digest_size=8).hexdigest()


def _meta_digest(meta: dict) -> str:
    """A checksum of a JSON dict as it reads back (canonical JSON), its `checksums` left out."""
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != "checksums"}))
    text = json.dumps(body, sort_keys=True, allow_nan=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _short(error: BaseException) -> str:
    """One line of an exception for a message (TensorStore's spell out their whole spec)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else error
    text = str(text).split(" See full TensorStore details")[0]
    text = " ".join(text.split())
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _agree(failure, step: int, path: Path, item: str):
    """Raises `failure` if this process has one, and in a multi-process job makes every process
    raise when any did: each process reads only its own shards, so a damaged file may fail in
    one of them, and the others must not go on to the next collective (a fingerprint) alone."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        failed = np.asarray(multihost_utils.process_allgather(np.int32(failure is not None)))
        if failure is None and failed.any():
            failure = DamagedCheckpointError(
                step, path, f"{item}: process {int(np.argmax(failed))} could not read it")
    if failure is not None:
        raise failure


def _warn(message: str):
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class Checkpointer:
    """Saves and restores one stage's checkpoints under `directory`.

    Args:
      directory: the stage directory; checkpoints go in `directory/checkpoints/`.
      max_to_keep: how many of the most recent checkpoints to keep.
      save_interval_steps: `save` is a no-op on steps that are not a multiple of this, unless
        forced (the last step of a stage is always saved with force=True).
    """

    def __init__(self, directory, *, max_to_keep: int = 3, save_interval_steps: int = 1):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.directory = Path(directory).absolute()
        self.save_interval_steps = save_interval_steps
        ckpt_dir = self.directory / CHECKPOINTS
        if jax.process_index() == 0:
            # Leftovers of a write that never finished. Removed here, synchronously, rather than
            # by Orbax's background clean-up, which can race with a second manager or a save.
            for leftover in ckpt_dir.glob(f"*{_TMP_MARK}*"):
                shutil.rmtree(leftover, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            cleanup_tmp_directories=False, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(ckpt_dir, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / CHECKPOINTS / str(step)

    def save(self, step: int, *, params, train, meta: dict[str, Any], force: bool = False) -> bool:
        """Saves the step if it is due (or forced); returns whether it saved.

        `params` and `train` are pytrees of arrays (typed PRNG keys are allowed); `meta` is a
        JSON-serialisable dict. The write is synchronous: when this returns True the step is
        on disk and complete. A step that already has a complete checkpoint is not rewritten.
        The meta gets the step and `checksums`: the fingerprints of params and train, computed
        from the arrays being saved, and a digest of the meta itself.
        """
        if not (force or step % self.save_interval_steps == 0):
            return False
        if step in self._manager.all_steps():
            # Already complete on disk (a finished stage run again, or a resumed run repeating
            # a step): resumption is exact, so the saved state is the same.
            return False
        meta = {**meta, "step": int(step)}
        meta["checksums"] = {"params": fingerprint(params), "train": fingerprint(train),
                             "meta": _meta_digest(meta)}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(_keys_to_data(params)),
            train=ocp.args.StandardSave(_keys_to_data(train)),
            meta=ocp.args.JsonSave(meta),
        )
        saved = self._manager.save(int(step), args=args, force=True)
        self._manager.wait_until_finished()
        return bool(saved)

    def restore(self, *, params, train=None, step: int | None = None):
        """Restores (params, train, meta) of `step` (default: the latest) onto the targets.

        `params` / `train` are restore targets (see `abstract`); pass train=None to restore only
        the parameters and the metadata (the hand-off to the next stage). Raises
        DamagedCheckpointError when the step cannot be read or does not match its checksums.
        """
        step = self._resolve(step)
        meta = self.restore_meta(step)
        return (self._restore_item(step, "params", params, meta),
                None if train is None else self._restore_item(step, "train", train, meta), meta)

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of `step` (default: the latest), without reading any array."""
        step = self._resolve(step)
        failure = None
        try:
            out = self._orbax_restore(step, meta=ocp.args.JsonRestore())
            meta = dict(out["meta"])
            want = meta.get("checksums", {}).get("meta")
            if want is not None and _meta_digest(meta) != want:
                failure = DamagedCheckpointError(
                    step, self.step_dir(step), "meta: its JSON does not match the digest saved "
                                               "with it")
        except Exception as e:  # noqa: BLE001 -- whatever Orbax raises on a damaged step
            failure = DamagedCheckpointError(step, self.step_dir(step), f"meta: {_short(e)}")
            failure.__cause__ = e
        _agree(failure, step, self.step_dir(step), "meta")
        return meta

    def restore_newest(self, *, params, train=None,
                       check: Callable[[dict], None] | None = None):
        """(params, train, meta) of the newest step that restores, or None if there is none.

        Steps are tried newest first. `check(meta)` runs on each step's meta before its arrays
        are read (e.g. to refuse a checkpoint of another run); what it raises propagates. A
        damaged step is skipped; once an older one restores, each damaged newer step gets a
        warning line on stderr and is moved aside to `<step>.damaged` (kept for inspection),
        so that the resumed run writes it afresh. If every step is damaged, nothing is moved
        and one CheckpointError lists them all.
        """
        damaged = []
        for step in reversed(self.all_steps()):
            try:
                meta = self.restore_meta(step)
                if check is not None:
                    check(meta)
                out = (self._restore_item(step, "params", params, meta),
                       None if train is None else self._restore_item(step, "train", train, meta),
                       meta)
            except DamagedCheckpointError as e:
                damaged.append(e)
                continue
            self._set_aside(damaged, resumed_from=step)
            return out
        if damaged:
            listed = "; ".join(f"step {e.step} at {e.path} ({e.reason})" for e in damaged)
            raise CheckpointError(
                f"no checkpoint in {self.directory / CHECKPOINTS} restores: {listed}; to start "
                "the stage afresh move that directory away (or use a new --workdir)")
        return None

    def close(self):
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _restore_item(self, step: int, item: str, target, meta: dict):
        """One array item of `step` onto `target`, checked against the recorded fingerprint."""
        failure = None
        try:
            out = self._orbax_restore(step, **{item: ocp.args.StandardRestore(
                jax.tree.map(_abstract_key_data, target, is_leaf=_is_key))})
        except Exception as e:  # noqa: BLE001 -- whatever Orbax/TensorStore raise on bad bytes
            failure = DamagedCheckpointError(step, self.step_dir(step), f"{item}: {_short(e)}")
            failure.__cause__ = e
        _agree(failure, step, self.step_dir(step), item)
        restored = _data_to_keys(out[item], target)
        want = meta.get("checksums", {}).get(item)   # absent in checkpoints older than checksums
        if want is not None:
            got = fingerprint(restored)
            if got != want:
                raise DamagedCheckpointError(
                    step, self.step_dir(step),
                    f"{item}: its arrays read back with fingerprint {got}, saved with {want}")
        return restored

    def _orbax_restore(self, step: int, **items):
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception:
            if jax.process_count() > 1:
                # Orbax (0.12) ends every restore with this barrier, after reading. A process
                # whose read failed (each reads only its own shards) skipped it while the
                # others wait there: meet them, so that `_agree` pairs up in every process.
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("Checkpointer:restore")
            raise

    def _set_aside(self, damaged: list, resumed_from: int):
        """Moves damaged step directories to `<step>.damaged` (a name Orbax does not list)."""
        if not damaged:
            return
        for e in damaged:
            src = e.path
            dst = src.with_name(src.name + DAMAGED)
            n = 1
            while dst.exists():
                n += 1
                dst = src.with_name(f"{src.name}{DAMAGED}-{n}")
            if jax.process_index() == 0:
                src.rename(dst)
            _warn(f"checkpoint step {e.step} at {src} is damaged ({e.reason}); moved it to "
                  f"{dst.name} and resuming from step {resumed_from}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("rlhf_jax.checkpoint.set_aside")
        self._manager.reload()

    def _resolve(self, step):
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(
                    f"no complete checkpoint in {self.directory / CHECKPOINTS}: run the stage "
                    "that writes it first, or point init_from at a stage directory that has one")
        elif step not in self._manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in "
                                  f"{self.directory / CHECKPOINTS}; have {self.all_steps()}")
        return step


def complete_steps(directory) -> list[int]:
    """The steps with a complete checkpoint in stage `directory`, read without a manager.

    Orbax gives a step its plain numeric name only once the write has finished (and a step
    found damaged on resume is renamed `<step>.damaged`).
    """
    path = Path(directory) / CHECKPOINTS
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


def stage_has_checkpoint(directory) -> bool:
    """Whether `directory` (a stage directory) holds at least one complete checkpoint."""
    return bool(complete_steps(directory))


def tree_equal(a, b) -> bool:
    """Bitwise equality of two pytrees of arrays (same structure, shapes, dtypes, values)."""
    la, lb = jax.tree.leaves(_keys_to_data(a)), jax.tree.leaves(_keys_to_data(b))
    if jax.tree.structure(_keys_to_data(a)) != jax.tree.structure(_keys_to_data(b)):
        return False
    return all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
               for x, y in zip(la, lb))
