"""Subprocess entry point for tests/test_trainers_mesh.py: every trainer on device meshes.

    python tests/_trainers_mesh_worker.py OUT DATA_DIR ref
        one CPU device (a process of its own: the reference is a true single-device run);
        the chain SFT -> RM -> DPO, PPO (critic), GRPO in OUT/1,1,1; then the SFT and PPO
        stages the (8,1,1) chain wrote, cut back to an earlier checkpoint and continued on
        this one device (OUT/resume_8to1).
    python tests/_trainers_mesh_worker.py OUT DATA_DIR 8,1,1 2,4,1 ...
        eight simulated CPU devices; the same chain on each mesh (data, fsdp, tensor) in turn,
        in OUT/<mesh>; with 2,4,1 also the reference's SFT and PPO stages, cut back and
        continued on that mesh (OUT/resume_1to241).

Per stage it writes OUT/<run>/<stage>.npz (the parameters the last jitted update step
returned, a critic's included), OUT/<run>/<stage>.json (what the jitted steps did, below) and
OUT/<run>/<stage>.done, or OUT/<run>/<stage>.error with the exception (later stages still run
where they can). The metrics are the stage's own metrics.jsonl. The test compares them all.

The hook: `jax.jit` is wrapped, before rlhf_jax is imported, for the functions defined in
rlhf_jax, so every jitted step a trainer runs (the update, the sampler, the rollout scorer
with its reference and reward-model passes, the reward model's scoring, the advantage targets)
reports, per stage:
  - each input and output array with a batch axis (leading size in BATCH_ROWS, outside the
    parameter and optimizer-moment trees) and into how many pieces that axis is split;
  - for an update step, the sharding of the parameters and optimizer state it took and
    returned, and XLA's FLOP count and temporary memory per device for its program;
  - how often it compiled, and which inputs changed shape or sharding when it recompiled.
Nothing in rlhf_jax is changed for this. Importing this module touches no JAX state (the test
imports it for its constants).
"""

import functools
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

STAGES = ("sft", "rm", "dpo", "dpo_packed", "dpo_lora", "ppo", "grpo")
# The batch row counts of the configs below (SFT 16 rows; RM 16 pairs = 32 rows, and 32
# normalisation samples; DPO 8 pairs = 16 rows and 8 weights; RL 32 rollouts in minibatches of
# 16): the leading sizes of batch arrays. No other array a step takes or returns has them
# (parameter trees are skipped; the testbed's gold tables are [281] and [25, 25]).
BATCH_ROWS = (8, 16, 32)
# The checkpoint each resumption continues from (the later ones are removed from the copy).
RESUME_STEP = {"sft": 2, "ppo": 1}
WAIT_S = 600
ABORTED = "aborted"        # OUT/aborted: a worker died; the others stop waiting for it


# ---------------------------------------------------------------------------------------------
# The hook: recording what jitted steps take and return
# ---------------------------------------------------------------------------------------------

class Recorder:
    """What the jitted steps of the stage now running did, per function name:
    calls[name] = {"in"/"out": batch arrays seen among its inputs/outputs, "bad": those whose
    batch axis is not split over data x fsdp, "compiles": programs compiled during the stage,
    "recompiles": per compilation after the first, the inputs that changed shape or sharding,
    "cost": FLOPs and temporary bytes per device of an update step's program}."""

    def __init__(self, batch_shards=None):
        self.batch_shards = batch_shards   # data x fsdp of the stage; None: record nothing
        self.calls = {}
        self.signatures = {}               # name -> the previous call's input signature
        self.state_problems = []           # state returned by an update in another sharding
        self.sharded_params = 0            # parameter leaves split over fsdp or tensor
        self.last_update = None            # host copy of the last update step's parameters


REC = Recorder()


def _is_param_tree(x):
    from flax import nnx
    return isinstance(x, (nnx.State, nnx.Variable))


def _spec(x) -> str:
    s = x.sharding
    return str(s.spec) if hasattr(s, "spec") else type(s).__name__


def _split(x) -> int:
    """Into how many pieces the leading axis of x is split across devices."""
    return x.shape[0] // x.sharding.shard_shape(x.shape)[0]


def _arrays(tree, skip_params=False):
    """(path, array) of the jax.Arrays in `tree` (parameter and optimizer-moment trees, which
    are nnx.State, skipped with skip_params)."""
    import jax
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=_is_param_tree if skip_params else None)[0]
    return [(jax.tree_util.keystr(p), x) for p, x in leaves if isinstance(x, jax.Array)]


def _check_batch(entry, where, tree):
    for path, x in _arrays(tree, skip_params=True):
        if x.ndim == 0 or x.shape[0] not in BATCH_ROWS:
            continue
        entry[where] += 1
        if _split(x) != REC.batch_shards:
            entry["bad"].append(f"{where}{path} {tuple(x.shape)} split {_split(x)} ways "
                                f"({_spec(x)})")


def _signature(tree):
    return {p: (tuple(x.shape), str(x.dtype), _spec(x)) for p, x in _arrays(tree)}


def _record_call(name, jitted, args, kwargs):
    import jax
    if REC.batch_shards is None:
        return jitted(*args, **kwargs)
    entry = REC.calls.setdefault(name, {"in": 0, "out": 0, "bad": [], "compiles": 0,
                                        "recompiles": []})
    # Everything about the inputs is read before the call: an update donates its state.
    _check_batch(entry, "in", (args, kwargs))
    signature = _signature((args, kwargs))
    is_update = name.rsplit(".", 1)[-1] == "update"
    state_in = [_arrays(a) for a in args[:2]] if is_update else None
    if is_update and "cost" not in entry:
        # XLA's own accounting of the program one device runs. With the persistent
        # compilation cache (the tests set it) the call below loads this compilation.
        compiled = jitted.lower(*args, **kwargs).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        entry["cost"] = {"flops": float(cost.get("flops", -1.0)),
                         "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}
    cached = jitted._cache_size()
    out = jitted(*args, **kwargs)
    if jitted._cache_size() > cached:
        entry["compiles"] += 1
        previous = REC.signatures.get(name)
        if previous is not None:
            entry["recompiles"].append(sorted(
                f"{p}: {previous.get(p)} -> {v}" for p, v in signature.items()
                if previous.get(p) != v)[:6])
    REC.signatures[name] = signature
    _check_batch(entry, "out", out)
    if is_update:       # update(params, opt_state, ...) -> (params, opt_state, ...)
        for what, before, after in zip(("params", "opt_state"), state_in, out[:2]):
            for (p, x), (_, y) in zip(before, _arrays(after)):
                if _spec(x) != _spec(y) and not y.sharding.is_equivalent_to(x.sharding, y.ndim):
                    REC.state_problems.append(f"{what}{p} entered as {_spec(x)} and left as "
                                              f"{_spec(y)}")
        params = _arrays(out[0])
        REC.sharded_params = sum(1 for _, x in params
                                 if "fsdp" in _spec(x) or "tensor" in _spec(x))
        REC.last_update = {p: jax.device_get(x) for p, x in params}
    return out


def install_recording_jit():
    """Wraps jax.jit for the functions defined in rlhf_jax; call before importing rlhf_jax
    (sampling.py applies jax.jit when it is imported)."""
    import jax

    real_jit = jax.jit

    def module_of(fun):
        return getattr(getattr(fun, "func", fun), "__module__", "") or ""

    def recording_jit(fun=None, *args, **kwargs):
        if fun is None:
            return lambda f: recording_jit(f, *args, **kwargs)
        jitted = real_jit(fun, *args, **kwargs)
        if not module_of(fun).startswith("rlhf_jax"):
            return jitted
        inner = getattr(fun, "func", fun)
        name = f"{module_of(fun)}.{getattr(inner, '__qualname__', repr(inner))}"

        @functools.wraps(inner)
        def call(*a, **k):
            return _record_call(name, jitted, a, k)

        for attr in ("lower", "trace", "eval_shape", "clear_cache"):
            if hasattr(jitted, attr):
                setattr(call, attr, getattr(jitted, attr))
        return call

    jax.jit = recording_jit


# ---------------------------------------------------------------------------------------------
# The stages at a tiny size
# ---------------------------------------------------------------------------------------------

def stage_config(name, data_dir, shape, workdir):
    """The smoke configs of experiments/, smaller still: 2-4 steps, no held-out evaluation
    beyond the reward model's (part of its stage), one checkpoint at the end (also an earlier
    one for SFT and PPO, which the resumptions continue from). The RM's normalisation samples
    and the RL rollouts are both 32 completions of 24 tokens after 12-token prompts, so the
    sampler compiles once per mesh."""
    from experiments import dpo, grpo, ppo, reward, sft
    if name == "sft":
        c = sft.get_config("smoke")      # d_model 32, 1 layer, 2 heads, d_ff 64
        c.data.update(n_train=64, n_test=16, batch_size=16)
        c.update(steps=4, log_every=1, save_every=RESUME_STEP["sft"], eval_batches=0)
    elif name == "rm":
        c = reward.get_config("smoke")
        c.data.update(n_train=64, n_test=16, batch_size=16)
        c.norm.update(n_samples=32, batch_size=32, prompts_n_train=64, prompts_n_test=16)
        c.update(steps=3, log_every=1, save_every=100, eval_batches=1)
    elif name in ("dpo", "dpo_packed", "dpo_lora"):
        c = dpo.get_config("smoke")
        c.data.update(n_train=64, n_test=16, batch_size=8)
        c.update(steps=3, log_every=1, save_every=100, eval_batches=0)
        c.gen.n_prompts = 0
        if name == "dpo_packed":    # data.packing: pairs packed into rows with segment ids
            c.data.packing, c.stage = True, name
        if name == "dpo_lora":      # adapters on the frozen SFT model, the reference = them off
            c.lora, c.stage = "lora(rank=4, alpha=8)", name
    else:
        c = (ppo if name == "ppo" else grpo).get_config("smoke")
        c.data.update(n_train=64, n_test=16)
        prompts = 32 if name == "ppo" else 8              # x samples_per_prompt 1 or 4
        c.rollout.update(prompts_per_step=prompts, max_new_tokens=24)
        c.update(steps=2, log_every=1, save_every=RESUME_STEP["ppo"] if name == "ppo" else 100,
                 eval_every=0)
        c.init_from, c.reward_from = str(workdir / "sft"), str(workdir / "rm")
    c.data.data_dir = str(data_dir)
    c.mesh.shape = tuple(shape)
    return c


def trainer(name):
    from rlhf_jax.trainers import preference, reward, rl, sft
    return {"sft": sft, "rm": reward, "dpo": preference, "dpo_packed": preference,
            "dpo_lora": preference, "ppo": rl, "grpo": rl}[name]


def run_stage(name, config, workdir, shape):
    """Trains one stage in `workdir`; writes workdir/<name>.npz, .json and .done, or .error."""
    global REC
    import numpy as np
    workdir.mkdir(parents=True, exist_ok=True)
    for suffix in ("npz", "json", "error", "done"):
        (workdir / f"{name}.{suffix}").unlink(missing_ok=True)
    REC = Recorder(batch_shards=shape[0] * shape[1])
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        trainer(name).train(config, workdir)
    except Exception as e:  # noqa: BLE001  (the test reports it under the stage's name)
        (workdir / f"{name}.error").write_text(
            f"{type(e).__name__}: {e}\n\n{traceback.format_exc()[-6000:]}")
        print(f"FAILED {workdir.name} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    else:
        np.savez(workdir / f"{name}.npz", **(REC.last_update or {}))
        (workdir / f"{name}.json").write_text(json.dumps({
            "calls": REC.calls, "state_problems": REC.state_problems,
            "sharded_params": REC.sharded_params}, indent=1))
        print(f"OK {workdir.name} {name} {time.perf_counter() - t0:.1f}s wall "
              f"{time.process_time() - c0:.1f}s cpu", flush=True)
    (workdir / f"{name}.done").touch()
    REC = Recorder()


def run_chain(out, data_dir, shape):
    workdir = out / ",".join(map(str, shape))
    for name in STAGES:
        run_stage(name, stage_config(name, data_dir, shape, workdir), workdir, shape)


def wait_for(path: Path, out: Path):
    deadline = time.time() + WAIT_S
    while not path.exists():
        if (out / ABORTED).exists():
            raise RuntimeError(f"gave up waiting for {path}: {(out / ABORTED).read_text()}")
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear within {WAIT_S} s")
        time.sleep(0.2)


def resume(out, data_dir, written_by, shape, run):
    """The SFT and PPO stages the chain `written_by` wrote, copied without their checkpoints
    after RESUME_STEP and continued on `shape`: checkpoints written on another mesh."""
    from rlhf_jax import checkpoint
    source, workdir = out / written_by, out / run
    for name in ("sft", "ppo"):
        wait_for(source / f"{name}.done", out)
        if (source / f"{name}.error").exists():
            continue                                  # the chain's own test reports it
        shutil.rmtree(workdir / name, ignore_errors=True)
        shutil.copytree(source / name, workdir / name)
        for step in checkpoint.complete_steps(workdir / name):
            if step > RESUME_STEP[name]:
                shutil.rmtree(workdir / name / checkpoint.CHECKPOINTS / str(step))
        # The same config as the writer's (PPO reads the writer's SFT and RM), on `shape`.
        run_stage(name, stage_config(name, data_dir, shape, source), workdir, shape)


def main(out, data_dir, roles):
    out.mkdir(parents=True, exist_ok=True)
    try:
        if roles == ["ref"]:
            run_chain(out, data_dir, (1, 1, 1))
            resume(out, data_dir, "8,1,1", (1, 1, 1), "resume_8to1")
            return
        shapes = [tuple(int(s) for s in r.split(",")) for r in roles]
        for shape in shapes:
            run_chain(out, data_dir, shape)
        if (2, 4, 1) in shapes:
            resume(out, data_dir, "1,1,1", (2, 4, 1), "resume_1to241")
    except BaseException:
        (out / ABORTED).write_text(f"the worker for {roles} died:\n{traceback.format_exc()}")
        raise


if __name__ == "__main__":
    out_dir, data, *run_roles = sys.argv[1:]
    n = 1 if run_roles == ["ref"] else 8
    # Compilation dominates these runs; XLA's CPU backend at -O0 compiles in about half the
    # time. Every process of the test uses the same flags, so the programs compared are the
    # same but for their partitioning.
    os.environ["XLA_FLAGS"] = " ".join([
        os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={n}",
        "--xla_backend_optimization_level=0"]).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    install_recording_jit()
    import jax
    assert jax.device_count() == n, jax.devices()
    main(Path(out_dir), Path(data), run_roles)
