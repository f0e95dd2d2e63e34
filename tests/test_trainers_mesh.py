"""Every trainer on meshes of 8 simulated CPU devices against its single-device run.

SFT -> reward model -> DPO (also with data.packing, and with LoRA adapters), PPO (with a
critic) and GRPO, chained in one workdir per mesh, at a tiny size (d_model 32, one layer, 2-4
steps; tests/_trainers_mesh_worker.py), on one device and on the meshes (data, fsdp, tensor) =
(8,1,1), (2,4,1) and (1,4,2). Checked per stage and mesh:
  - the logged metrics of every step and the parameters the last update step returned (the
    critic's too) equal the single-device run's within float32 tolerance;
  - every jitted step (the policy's sampler, the rollout scorer with its reference and
    reward-model passes, the reward model's scoring, the advantage targets, the update) takes
    and returns its batch split over data x fsdp;
  - an update step returns parameters and optimizer state in the sharding they came in, and
    nothing compiles twice;
  - one device runs about 1/8 of the update's FLOPs and holds about 1/8 of its temporaries
    (XLA's cost and memory analysis): no silent replication of the batch inside the step;
  - checkpoints written on 8 devices continue on one, and a single device's on (2,4,1), and
    end like the uninterrupted run (SFT, and PPO with its critic, RNG and KL state).

The runs are three subprocesses (XLA_FLAGS must set the device count before JAX starts): the
single-device reference in a process of its own, and two with 8 devices, all at once (the
larger takes ~75 s of CPU, the other two ~75 s together). Compilation is most of it: ~150 s of
CPU in all (measured 2026-11-30), so ~80 s on two idle cores.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
WORKER_PATH = ROOT / "tests" / "_trainers_mesh_worker.py"
_spec = importlib.util.spec_from_file_location("_trainers_mesh_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)      # constants only: importing it touches no JAX state

STAGES = worker.STAGES
MESHES = ("8,1,1", "2,4,1", "1,4,2")
REF = "1,1,1"
# One worker process per entry, run at once (balanced for two cores).
PROCESSES = (["ref"], ["8,1,1", "2,4,1"], ["1,4,2"])
TIMEOUT_S = 900

# The jitted steps each stage must have run, as substrings of the names the worker records.
STEPS = {
    "sft": ("update",),
    "rm": ("update", "reward.train.<locals>.score", "sampling._generate", "rollout._scorer"),
    "dpo": ("update",),
    "dpo_packed": ("update",),
    "dpo_lora": ("update",),
    "ppo": ("update", "make_targets", "sampling._generate", "rollout._scorer"),
    "grpo": ("update", "make_targets", "sampling._generate", "rollout._scorer"),
}

# --- tolerances -------------------------------------------------------------------------------
# float32 throughout; a mesh changes the order of reductions (a sum split over 8 devices, the
# matmuls XLA partitions over fsdp and tensor). Measured maxima over the 15 stage x mesh runs
# (XLA CPU at -O0, 2026-11-30): metrics |diff| 1.9e-6 (GRPO's gold/reward of -19.4 on
# (1,4,2)); relative differences above 1e-6 only where a value is a small sum of cancelling
# terms (8.4e-6 of PPO's train/loss 0.05, 4.3e-7 absolute), which the absolute bound covers;
# parameters |diff| 3.1e-7 (DPO; at most 1.2e-7 for the others). The bounds are 5-10x those.
METRIC_RTOL, METRIC_ATOL = 1e-5, 1e-5
PARAM_RTOL, PARAM_ATOL = 1e-5, 3e-6
# Exceptions, each measured:
# - A clip fraction counts threshold decisions: one value token of the ~1,400 the PPO update
#   sees (4 minibatch passes of ~350 tokens) flipping its side of the clip range moves
#   value/clipfrac by 7.1e-4; measured 7.1e-4 on (8,1,1) and 1.4e-3 on (1,4,2).
CLIPFRAC_ATOL = 2.5e-3
# - The reward model's head bias has no gradient (Bradley-Terry is shift-invariant): its
#   float32 gradient is rounding noise of either sign, which Adam scales to about lr per step.
#   So the bias after 3 steps differs by up to the sum of the learning rates (1.5e-3 with the
#   smoke schedule's warm-up); measured 7.4e-4 on (8,1,1), 0 elsewhere. The metrics that carry
#   this shift get the same bound; the normalisation folded into the head removes it, and the
#   PPO and GRPO stages that score with the result agree to 2e-6.
RM_SHIFT_ATOL = 2e-3
RM_SHIFTED = ("rm/chosen_reward", "rm/rejected_reward", "rm/norm_mean_before", "rm/norm_bias")
RM_HEAD_BIAS = "['head']['bias'].value"
# Per-device share of the update step's work against one device (XLA's count of the program
# one device runs). Ideal 1/8 = 0.125; measured 0.13 for SFT, RM and DPO on (8,1,1) and
# (2,4,1), 0.185 for SFT and DPO on (1,4,2), where the 281-token vocabulary does not split
# over tensor=2 and both devices of a tensor pair compute the logits.
MAX_FLOPS_SHARE = 0.2
# Temporaries (activations, gradients) per device against one device, measured 2026-11-30:
# 0.145-0.178 on (8,1,1) and (2,4,1) for every stage (ideal 1/8 plus replicated gradient
# buffers of the tiny model). On (1,4,2) the batch is split only 4 ways: the residual stream
# and the logits (the 281-token vocabulary does not split over tensor=2) are [B/4, ...] on
# both devices of a tensor pair, and only the heads and the MLP width split further, so the
# bound there is 1.25/4; measured 0.16-0.26 (DPO, with the reference's logits, highest).
MAX_TEMP_SHARE = 0.25


def max_temp_share(mesh: str) -> float:
    data, fsdp, _ = (int(n) for n in mesh.split(","))
    return max(MAX_TEMP_SHARE, 1.25 / (data * fsdp))


# A packed stage's batches have as many rows as their sequences fill, rounded up to a multiple
# of the mesh's batch shards (docs/data.md, "Sequence packing"): the row count, the padding
# share it logs and the update's program depend on the mesh, and each row count compiles the
# update once. So it is compared on its losses and parameters, its batch split and its state
# layouts, but not on compilations, data/padding_packed, or FLOPs and memory against one device.
PACKED = ("dpo_packed",)
UNPACKED = tuple(s for s in STAGES if s not in PACKED)
MESH_DEPENDENT = ("data/padding_packed",)

# --- known bugs: {(stage, mesh): reason}, each a strict xfail (none known today) ------------

KNOWN_BATCH_SPLIT: dict = {}
KNOWN_STATE: dict = {}
KNOWN_FLOPS: dict = {}
KNOWN_TEMP: dict = {}
KNOWN_RESUME: dict = {}


class StageError(Exception):
    """A stage raised in the worker (the stage's .error file holds the traceback)."""


def _cases(known, first=STAGES, second=MESHES):
    """pytest params (a, b) over first x second, strict xfail where `known` names a bug."""
    out = []
    for a in first:
        for b in second:
            bug = known.get((a, b))
            marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=bug)] \
                if bug else []
            out.append(pytest.param(a, b, marks=marks, id=f"{a}-{b}"))
    return out


# --- the runs ---------------------------------------------------------------------------------

def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Runs the worker processes at once; returns their output directory."""
    out = tmp_path_factory.mktemp("trainers_mesh")
    procs, logs = [], []
    t0 = time.perf_counter()
    for i, roles in enumerate(PROCESSES):
        logs.append(open(out / f"worker{i}.log", "w"))
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER_PATH), str(out), str(out / "data"), *roles],
            env=_env(), cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - t0)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    texts = [(out / f"worker{i}.log").read_text() for i in range(len(PROCESSES))]
    print(f"\ntrainers on meshes: {time.perf_counter() - t0:.1f} s wall")
    for text in texts:
        print("\n".join("  " + line for line in text.splitlines()
                        if line.startswith(("OK ", "FAILED "))))
    failed = [f"{roles} exit {p.returncode}:\n{text[-4000:]}"
              for roles, p, text in zip(PROCESSES, procs, texts) if p.returncode != 0]
    assert not failed, "\n----\n".join(failed)
    return out


def _stage(out, run, stage):
    """(metrics by step, parameters, sharding report) of one stage of one run."""
    error = out / run / f"{stage}.error"
    if error.exists():
        raise StageError(f"{stage} on {run} raised {error.read_text()}")
    assert (out / run / f"{stage}.done").exists(), f"{stage} on {run} did not run"
    metrics = {int(m["step"]): m for m in read_metrics(out / run / stage)}
    with np.load(out / run / f"{stage}.npz") as f:
        params = dict(f)
    report = json.loads((out / run / f"{stage}.json").read_text())
    return metrics, params, report


# --- equality with one device -----------------------------------------------------------------

def _metric_atol(stage, key):
    if "clipfrac" in key:
        return CLIPFRAC_ATOL
    if stage == "rm" and key in RM_SHIFTED:
        return RM_SHIFT_ATOL
    return METRIC_ATOL


def _compare(stage, got, ref, what, steps=None):
    (metrics, params, _), (ref_metrics, ref_params, _) = got, ref
    steps = sorted(ref_metrics) if steps is None else steps
    assert steps and set(steps) <= set(metrics), (what, sorted(metrics), steps)
    worst = (0.0, "-")
    for s in steps:
        for key, want in ref_metrics[s].items():
            if key in ("step", "time") or key.startswith("time/") or "seconds" in key \
                    or key in MESH_DEPENDENT:
                continue                                   # wall-clock times; mesh-dependent
            assert key in metrics[s], f"{what}: step {s} has no {key}"
            have = metrics[s][key]
            np.testing.assert_allclose(have, want, rtol=METRIC_RTOL,
                                       atol=_metric_atol(stage, key), equal_nan=True,
                                       err_msg=f"{what}: step {s} {key}")
            if not (math.isnan(have) or math.isnan(want)):
                worst = max(worst, (abs(have - want), f"{key} at step {s}"))
    assert sorted(params) == sorted(ref_params), what
    p_worst = 0.0
    for key, want in ref_params.items():
        atol = RM_SHIFT_ATOL if stage == "rm" and key == RM_HEAD_BIAS else PARAM_ATOL
        np.testing.assert_allclose(params[key], want, rtol=PARAM_RTOL, atol=atol,
                                   err_msg=f"{what}: parameter {key}")
        p_worst = max(p_worst, float(np.max(np.abs(params[key] - want), initial=0.0)))
    print(f"\n{what}: metrics max |diff| {worst[0]:.1e} ({worst[1]}), parameters max |diff| "
          f"{p_worst:.1e}")


@pytest.mark.parametrize("stage,mesh", _cases({}))
def test_trainer_on_mesh_matches_one_device(out, stage, mesh):
    _compare(stage, _stage(out, mesh, stage), _stage(out, REF, stage), f"{stage} on ({mesh})")


# --- shardings of the jitted steps ------------------------------------------------------------

@pytest.mark.parametrize("stage,mesh", _cases(KNOWN_BATCH_SPLIT))
def test_jitted_steps_keep_the_batch_split(out, stage, mesh):
    """The batch arrays every jitted step takes and returns are split over data x fsdp:
    rollouts, reference log-probs, values and reward scores included."""
    calls = _stage(out, mesh, stage)[2]["calls"]
    for step in STEPS[stage]:
        seen = [c for name, c in calls.items() if step in name]
        assert seen, f"{stage} on ({mesh}) ran no jitted {step!r}; it ran {sorted(calls)}"
        assert sum(c["in"] for c in seen) > 0, (stage, mesh, step)
        if step != "update":               # an update returns parameters and scalars only
            assert sum(c["out"] for c in seen) > 0, (stage, mesh, step)
    bad = {name: c["bad"][:4] for name, c in calls.items() if c["bad"]}
    assert not bad, f"{stage} on ({mesh}): batch arrays not split over data x fsdp: {bad}"


@pytest.mark.parametrize("stage,mesh", _cases(KNOWN_STATE))
def test_update_keeps_the_state_sharding_and_compiles_once(out, stage, mesh):
    """Parameters and optimizer state come back from an update in the sharding they went in
    (FSDP and tensor parallelism split them, and keep them split), and no jitted step of the
    stage compiles twice."""
    report = _stage(out, mesh, stage)[2]
    data, fsdp, tensor = (int(s) for s in mesh.split(","))
    assert (report["sharded_params"] > 0) == (fsdp * tensor > 1), report["sharded_params"]
    assert not report["state_problems"], \
        f"{stage} on ({mesh}): {len(report['state_problems'])} leaves changed sharding in " \
        f"the update, e.g. {report['state_problems'][:3]}"
    again = {name: c["recompiles"][:1] for name, c in report["calls"].items()
             if c["compiles"] > 1 and not (stage in PACKED and name.endswith("update"))}
    assert not again, f"{stage} on ({mesh}) compiled again: {again}"


@pytest.mark.parametrize("stage,mesh", _cases(KNOWN_FLOPS, first=UNPACKED))
def test_update_step_splits_the_work(out, stage, mesh):
    """One device runs about 1/8 of the update's FLOPs: the batch is not silently replicated
    inside the step."""
    cost = _update_cost(out, mesh, stage)
    share = cost["flops"] / _update_cost(out, REF, stage)["flops"]
    print(f"\n{stage} on ({mesh}): update FLOPs per device {share:.3f} of one device's")
    assert share <= MAX_FLOPS_SHARE, f"{stage} on ({mesh}): {share:.3f} of one device's FLOPs"


@pytest.mark.parametrize("stage,mesh", _cases(KNOWN_TEMP, first=UNPACKED))
def test_update_step_splits_the_activations(out, stage, mesh):
    """One device holds about 1/8 of the update's temporaries (activations and gradients);
    on (1,4,2), whose batch splits 4 ways, at most ~1/4."""
    share = _update_cost(out, mesh, stage)["temp_bytes"] / \
        _update_cost(out, REF, stage)["temp_bytes"]
    print(f"\n{stage} on ({mesh}): update temporaries per device {share:.3f} of one device's")
    assert share <= max_temp_share(mesh), f"{stage} on ({mesh}): {share:.3f} of one " \
                                          "device's temporary memory"


def _update_cost(out, run, stage):
    calls = _stage(out, run, stage)[2]["calls"]
    costs = [c["cost"] for name, c in calls.items() if "cost" in c]
    assert len(costs) == 1, (run, stage, sorted(calls))
    return costs[0]


# --- checkpoints across meshes ----------------------------------------------------------------

@pytest.mark.parametrize("run,stage", [
    pytest.param(run, stage, id=f"{run}-{stage}", marks=[pytest.mark.xfail(
        strict=True, raises=StageError, reason=KNOWN_RESUME[run, stage])]
        if (run, stage) in KNOWN_RESUME else [])
    for run in ("resume_8to1", "resume_1to241") for stage in ("sft", "ppo")])
def test_checkpoint_continues_on_another_mesh(out, run, stage):
    """A stage cut back to an earlier checkpoint written on one mesh and continued on another
    ends like the uninterrupted run on the first: 8 devices -> 1, 1 -> (2,4,1). SFT continues
    from step 2 of 4; PPO, whose train state holds the critic, the RNG key and the KL
    controller, from step 1 of 2. Measured: metrics within 4.8e-7, parameters within 1.9e-8."""
    written_by = {"resume_8to1": "8,1,1", "resume_1to241": REF}[run]
    later = [s for s in sorted(_stage(out, written_by, stage)[0])
             if s > worker.RESUME_STEP[stage]]
    _compare(stage, _stage(out, run, stage), _stage(out, written_by, stage),
             f"{stage} written on ({written_by}), continued in {run}", steps=later)
