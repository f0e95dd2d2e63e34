"""Orbax checkpoints: periodic saves, exact resume, and the hand-off from one stage to the next.

A stage writes its checkpoints under `workdir/<stage>/checkpoints/<step>/`, each holding three
items:

  params  the model parameters (a pytree of arrays): all the next stage needs;
  train   everything else that evolves: optimizer state, RNG keys, KL-controller state, ...;
  meta    a JSON dict: step, data-iterator position, model config, stage config, tokenizer.

Orbax writes each step into a temporary directory and renames it only once every item is on
disk, so a checkpoint that was being written when the process died is never listed, never
restored (its leftovers are removed when the next Checkpointer opens the directory); the
previous complete step is restored instead.

Restoring takes a *target*: a pytree of arrays or `jax.ShapeDtypeStruct`s with shardings. The
arrays are read straight into that layout, so a stage can restore its predecessor's parameters
onto a different mesh than the one that saved them.
"""

import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"
_TMP_MARK = ".orbax-checkpoint-tmp"


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

    def save(self, step: int, *, params, train, meta: dict[str, Any], force: bool = False) -> bool:
        """Saves the step if it is due (or forced); returns whether it saved.

        `params` and `train` are pytrees of arrays (typed PRNG keys are allowed); `meta` is a
        JSON-serialisable dict. The write is synchronous: when this returns True the step is
        on disk and complete. A step that already has a complete checkpoint is not rewritten.
        """
        if not (force or step % self.save_interval_steps == 0):
            return False
        if step in self._manager.all_steps():
            # Already complete on disk (a finished stage run again, or a resumed run repeating
            # a step): resumption is exact, so the saved state is the same.
            return False
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(_keys_to_data(params)),
            train=ocp.args.StandardSave(_keys_to_data(train)),
            meta=ocp.args.JsonSave({**meta, "step": int(step)}),
        )
        saved = self._manager.save(int(step), args=args, force=True)
        self._manager.wait_until_finished()
        return bool(saved)

    def restore(self, *, params, train=None, step: int | None = None):
        """Restores (params, train, meta) of `step` (default: the latest) onto the targets.

        `params` / `train` are restore targets (see `abstract`); pass train=None to restore only
        the parameters and the metadata (the hand-off to the next stage).
        """
        step = self._resolve(step)
        items = {"params": ocp.args.StandardRestore(jax.tree.map(_abstract_key_data, params,
                                                                 is_leaf=_is_key)),
                 "meta": ocp.args.JsonRestore()}
        if train is not None:
            items["train"] = ocp.args.StandardRestore(
                jax.tree.map(_abstract_key_data, train, is_leaf=_is_key))
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        restored_train = None if train is None else _data_to_keys(out["train"], train)
        return _data_to_keys(out["params"], params), restored_train, dict(out["meta"])

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of `step` (default: the latest), without reading any array."""
        step = self._resolve(step)
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def close(self):
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _resolve(self, step):
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(
                    f"no complete checkpoint in {self.directory / CHECKPOINTS}: run the stage "
                    "that writes it first, or point init_from at a stage directory that has one")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in "
                                    f"{self.directory / CHECKPOINTS}; have {self.all_steps()}")
        return step


def complete_steps(directory) -> list[int]:
    """The steps with a complete checkpoint in stage `directory`, read without a manager.

    Orbax gives a step its plain numeric name only once the write has finished.
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
