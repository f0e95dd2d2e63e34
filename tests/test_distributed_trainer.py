"""Whole trainers as two processes joined by `jax.distributed`, against one process.

Two local processes with 4 simulated CPU devices each (tests/_distributed_trainer_worker.py)
join through the trainers' own `mesh.distributed=true`, told their place by
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID as a user's launch sets them
(cross-process collectives over Gloo, JAX's default on CPU), and run the stage chain of
tests/_trainers_mesh_worker.py (d_model 32, one layer, 2-4 steps) in one shared workdir on
meshes over their 8 devices: SFT on (data, fsdp, tensor) = (1, 8, 1) (FSDP across the
processes), then the reward model, DPO with LoRA adapters (on the SFT checkpoint the two
processes wrote; the reference is that base with the adapters off) and PPO (a critic, the reward model, sampling) on (2, 4, 1), with DPO's and
PPO's held-out evaluations. A third process runs the same chain on one device. Checked per
stage:
  - the logged metrics of every step and the parameters the last update step returned equal
    the one-device run's, within test_trainers_mesh.py's float32 tolerances;
  - both processes end with the same parameters: every block both hold (and every replica
    on one process's devices) is bitwise equal, and together they hold all of every
    parameter;
  - process 0 alone writes the metrics (one line per logged step, one TensorBoard event file)
    and prints the mesh line; the checkpoints the two processes wrote are the steps the
    one-device run wrote, and their parameters, read back in this one process on one device,
    match the one-device run's.

Cost (measured 2026-11-30): ~45 s of CPU per distributed process (PPO ~21 s of it, SFT with
FSDP across the processes ~9 s) and ~20 s for the reference, mostly compilation; ~90 s of wall
on two cores, as the two processes of the distributed run wait for each other at every
collective while they share the cores with the reference.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
WORKER_PATH = ROOT / "tests" / "_distributed_trainer_worker.py"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Constants and the comparison only: importing them touches no JAX state and runs nothing.
worker = _load("_distributed_trainer_worker", WORKER_PATH)
mesh_test = _load("_test_trainers_mesh", ROOT / "tests" / "test_trainers_mesh.py")

STAGES = worker.STAGES
TIMEOUT_S = 400
MESH_LINE = "(8 devices, 2 processes)"      # in the line a stage prints when it starts


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Runs the two processes of the distributed run and the one-device reference at once;
    returns the output directory and each process's output."""
    out = tmp_path_factory.mktemp("distributed_trainer")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    port = _free_port()
    runs = {"ref": {}}
    for pid in range(2):
        runs[f"process{pid}"] = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                 "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
    procs, t0 = {}, time.perf_counter()
    for name, extra in runs.items():
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(
            [sys.executable, str(WORKER_PATH), str(out), str(out / "data"),
             "ref" if name == "ref" else "dist"],
            env={**env, **extra}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log)
    try:
        for p, _ in procs.values():
            p.wait(timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - t0)))
    finally:
        for p, log in procs.values():
            if p.poll() is None:      # one process failed and the other waits for it
                p.kill()
                p.wait()
            log.close()
    logs = {name: (out / f"{name}.log").read_text() for name in procs}
    print(f"\ntwo processes and one: {time.perf_counter() - t0:.1f} s wall")
    failed = [f"{name} exit {p.returncode}:\n{logs[name][-4000:]}"
              for name, (p, _) in procs.items() if p.returncode != 0]
    assert not failed, "\n----\n".join(failed)
    return out, logs


def _shards(out, run, stage, pid):
    """{(path, index, shape): array} of the shards process `pid` held at the end of `stage`
    (index "0:16,0:32" and the whole array's shape "32,32" as strings)."""
    error = out / run / f"{stage}.p{pid}.error"
    assert not error.exists(), f"{stage} in {run} process {pid} raised {error.read_text()}"
    with np.load(out / run / f"{stage}.p{pid}.npz") as f:
        return {tuple(k.rsplit("@", 2)): f[k] for k in f.files}


def _assemble(shard_maps):
    """{path: whole array} from the shards of one or more processes; a part no shard covers
    stays NaN."""
    whole = {}
    for shards in shard_maps:
        for (path, index, shape), data in shards.items():
            slices = tuple(slice(*map(int, s.split(":"))) for s in index.split(",") if s)
            shape = tuple(int(n) for n in shape.split(",") if n)
            whole.setdefault(path, np.full(shape, np.nan, np.float64))[slices] = data
    return {p: a.astype(np.float32) for p, a in whole.items()}


def _run(out, run, stage):
    """(metrics by step, parameters, {}) as test_trainers_mesh._compare takes them."""
    metrics = {int(m["step"]): m for m in read_metrics(out / run / stage)}
    pids = (0, 1) if run == "dist" else (0,)
    return metrics, _assemble([_shards(out, run, stage, pid) for pid in pids]), {}


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_match_one(out, stage):
    out, _ = out
    mesh_test._compare(stage, _run(out, "dist", stage), _run(out, "ref", stage),
                       f"{stage} on two processes {worker.MESHES[stage]}")


@pytest.mark.parametrize("stage", STAGES)
def test_both_processes_end_with_the_same_parameters(out, stage):
    out, _ = out
    a, b = (_shards(out, "dist", stage, pid) for pid in (0, 1))
    both = sorted(set(a) & set(b))
    data, fsdp, tensor = worker.MESHES[stage]
    if data > 1:      # the processes are replicas along data: each holds every parameter
        assert both == sorted(a) == sorted(b), (sorted(a)[:3], sorted(b)[:3])
    different = [k for k in both if not np.array_equal(a[k], b[k])]
    assert not different, f"{stage}: the processes' copies differ: {different[:4]}"
    for path, x in _assemble([a, b]).items():
        assert np.isfinite(x).all(), f"{stage}: no process holds all of {path}"


def _line_steps(stage_dir):
    """The step of every line of a stage's metrics file, in order."""
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


def test_process_zero_alone_prints(out):
    _, logs = out
    assert [logs[f"process{pid}"].count(MESH_LINE) for pid in (0, 1)] == [len(STAGES), 0]


@pytest.mark.parametrize("stage", STAGES)
def test_process_zero_writes_and_the_checkpoint_reads_back_in_one_process(out, stage):
    from rlhf_jax import checkpoint
    from rlhf_jax.trainers import common
    out, _ = out
    stage_dir, ref_dir = out / "dist" / stage, out / "ref" / stage
    # Each logged step once (a second writer would append its own lines to the same file).
    steps = [_line_steps(d) for d in (stage_dir, ref_dir)]
    assert steps[0] == steps[1], steps
    assert len(list((stage_dir / "tensorboard").iterdir())) == 1
    assert checkpoint.complete_steps(stage_dir) == checkpoint.complete_steps(ref_dir)
    kind = "reward" if stage == "rm" else "policy"
    restored = [{path: np.asarray(x) for path, x in mesh_test.worker._arrays(
        common.load_stage(d, kind=kind)[1])} for d in (stage_dir, ref_dir)]
    mesh_test._compare(stage, (_run(out, "dist", stage)[0], restored[0], {}),
                       (_run(out, "ref", stage)[0], restored[1], {}),
                       f"{stage}: the checkpoint two processes wrote, read in one")
