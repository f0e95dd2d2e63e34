"""Checkpoints: round trip, interrupted writes, and bitwise-exact resume after SIGKILL."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.checkpoint import (CHECKPOINTS, Checkpointer, abstract, complete_steps,
                                 stage_has_checkpoint, tree_equal)
from rlhf_jax.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def _state(seed):
    k = jax.random.key(seed)
    params = {"dense": {"kernel": jax.random.normal(k, (3, 4)), "bias": jnp.arange(4.0)}}
    train = {"step_count": jnp.int32(seed), "rng": jax.random.fold_in(k, 1),
             "mu": jnp.full((3, 4), float(seed), jnp.bfloat16)}
    return params, train


def test_round_trip_keys_meta_and_retention(tmp_path):
    with Checkpointer(tmp_path / "sft", max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        for step in (1, 2, 3):
            params, train = _state(step)
            assert ckpt.save(step, params=params, train=train, meta={"data": {"index": step}})
        assert ckpt.all_steps() == [2, 3]
        params, train = _state(3)
        got_p, got_t, meta = ckpt.restore(params=abstract(params), train=abstract(train))
        assert tree_equal(got_p, params) and tree_equal(got_t, train)
        assert jax.dtypes.issubdtype(got_t["rng"].dtype, jax.dtypes.prng_key)
        assert set(meta.pop("checksums")) == {"params", "train", "meta"}
        assert meta == {"data": {"index": 3}, "step": 3}
        only_p, none, meta2 = ckpt.restore(params=abstract(params), step=2)
        assert none is None and tree_equal(only_p, _state(2)[0]) and meta2["step"] == 2
        assert ckpt.restore_meta()["step"] == 3
        with pytest.raises(CheckpointError, match="have \\[2, 3\\]"):
            ckpt.restore(params=abstract(params), step=1)
    assert stage_has_checkpoint(tmp_path / "sft")
    assert not stage_has_checkpoint(tmp_path / "rm")


def test_non_default_key_implementation_and_existing_step(tmp_path):
    params = {"w": jnp.ones(3)}
    train = {"rng": jax.random.key(7, impl="rbg")}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(5, params=params, train=train, meta={})
        # Saving a step that is already complete (a finished stage run again) is a no-op.
        assert not ckpt.save(5, params=params, train=train, meta={}, force=True)
        _, got, _ = ckpt.restore(params=abstract(params), train=abstract(train))
    assert tree_equal(got, train)
    assert jax.random.key_impl(got["rng"]) == jax.random.key_impl(train["rng"])


def test_probe_then_resume_after_an_interrupted_write(tmp_path):
    params, train = _state(1)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, params=params, train=train, meta={})
    shutil.copytree(tmp_path / CHECKPOINTS / "1", tmp_path / CHECKPOINTS / "2.orbax-checkpoint-tmp-9")
    for _ in range(3):  # the natural resume pattern: probe, then open and keep saving
        assert stage_has_checkpoint(tmp_path)
        with Checkpointer(tmp_path) as ckpt:
            step = ckpt.latest_step() + 1
            assert ckpt.save(step, params=params, train=train, meta={})
    assert complete_steps(tmp_path) == [2, 3, 4]


def test_missing_checkpoint_error_says_what_to_do(tmp_path):
    with Checkpointer(tmp_path / "rm") as ckpt:
        with pytest.raises(CheckpointError, match="run the stage"):
            ckpt.restore(params=abstract(_state(0)[0]))


def test_save_interval(tmp_path):
    with Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
        params, train = _state(0)
        saved = [ckpt.save(s, params=params, train=train, meta={}) for s in range(1, 12)]
        assert [s for s, ok in zip(range(1, 12), saved) if ok] == [5, 10]
        assert ckpt.save(11, params=params, train=train, meta={}, force=True)


def test_partially_written_checkpoint_is_never_restored(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        params, train = _state(1)
        ckpt.save(1, params=params, train=train, meta={})
    # What a process killed in the middle of writing step 2 leaves behind: Orbax's temporary
    # directory, never renamed to "2" because the write did not finish.
    ckpt_dir = tmp_path / CHECKPOINTS
    partial = ckpt_dir / "2.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(ckpt_dir / "1", partial)
    for f in partial.rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        got, _, meta = ckpt.restore(params=abstract(params))
        assert meta["step"] == 1 and tree_equal(got, params)
        assert ckpt.all_steps() == [1]
    assert not partial.exists()  # removed when the Checkpointer opened the directory


def _run_worker(workdir, total, every, kill_after=None):
    cmd = [sys.executable, str(ROOT / "tests" / "_toy_resume_worker.py"), str(workdir),
           str(total), str(every)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    last = 0
    try:
        for line in proc.stdout:
            last = int(line.split()[1])
            if kill_after is not None and last >= kill_after:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, last


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    rc, _ = _run_worker(tmp_path / "straight", 25, 4)
    assert rc == 0
    rc, last = _run_worker(tmp_path / "killed", 25, 4, kill_after=10)
    assert rc == -signal.SIGKILL and 10 <= last < 25
    with Checkpointer(tmp_path / "killed") as ckpt:
        assert ckpt.latest_step() < 25
    rc, _ = _run_worker(tmp_path / "killed", 25, 4)
    assert rc == 0
    like = {"w": jnp.zeros(16), "b": jnp.zeros(())}
    with Checkpointer(tmp_path / "straight") as a, Checkpointer(tmp_path / "killed") as b:
        pa, _, ma = a.restore(params=abstract(like))
        pb, _, mb = b.restore(params=abstract(like))
    assert ma == mb and {k: ma[k] for k in ("data_index", "step")} == {"data_index": 25,
                                                                        "step": 25}
    assert tree_equal(pa, pb)
    assert not np.allclose(np.asarray(pa["w"]), 0.0)
