"""Subprocess entry point for tests/test_distributed_trainer.py: one process of a run.

    python tests/_distributed_trainer_worker.py OUT DATA_DIR ref
        one process with one CPU device: the reference run, in OUT/ref.
    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=I \\
    python tests/_distributed_trainer_worker.py OUT DATA_DIR dist
        one of two processes with 4 CPU devices each, joined by the trainers' own
        `mesh.distributed=true` (sharding.initialize_distributed reads the JAX_* variables, as
        a user's launch sets them); both work in OUT/dist, as hosts share a file system.

Either runs the stages STAGES in turn, with the configs of tests/_trainers_mesh_worker.py
(d_model 32, one layer, 2-4 steps) plus held-out evaluations, on the meshes MESHES (one device
for the reference). Per stage and process it writes OUT/<run>/<stage>.p<I>.npz: the
parameters the stage's last jitted update step returned (PPO's critic too), as this process
holds them, one entry per addressable shard ("<path>@<index>@<shape>", e.g.
"['embed']['embedding'].value@0:281,0:8@281,32"), so the test sees each process's own
replicas; then OUT/<run>/<stage>.p<I>.done, or .error with the traceback. The stage's metrics
and checkpoints are the trainer's own.
"""

import functools
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_trainers_mesh_worker",
                                               HERE / "_trainers_mesh_worker.py")
mesh_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mesh_worker)  # its stage configs; importing it touches no JAX state

STAGES = ("sft", "rm", "dpo_lora", "ppo")
# (data, fsdp, tensor) over both processes' 8 devices, which make_mesh orders process by
# process: with fsdp=8 (SFT) each process holds half of every split parameter and writes its
# half of the checkpoint; with (2, 4, 1) each holds all of them and the processes are
# data-parallel replicas (the reward model; DPO with LoRA adapters on the SFT checkpoint,
# read onto another mesh, whose reference is the same weights with the adapters off; PPO with
# its critic). FSDP over the processes costs more
# (SFT 9 s of CPU per process against 6 s on (2, 4, 1), DPO 7.5 s against 3.7 s), so one
# stage runs it.
MESHES = {"sft": (1, 8, 1), "rm": (2, 4, 1), "dpo_lora": (2, 4, 1), "ppo": (2, 4, 1)}
DEVICES_PER_PROCESS = 4

LAST_UPDATE = {}            # "last": the parameters the latest update step returned


def install_update_hook():
    """Wraps jax.jit so that the update steps rlhf_jax jits keep their returned parameters
    (update(params, opt_state, ...) -> (params, opt_state, ...)) in LAST_UPDATE. Call before
    importing rlhf_jax."""
    import jax
    real_jit = jax.jit

    def hooked_jit(fun=None, *args, **kwargs):
        if fun is None:
            return lambda f: hooked_jit(f, *args, **kwargs)
        jitted = real_jit(fun, *args, **kwargs)
        inner = getattr(fun, "func", fun)
        if not (getattr(inner, "__module__", "") or "").startswith("rlhf_jax") or \
                getattr(inner, "__name__", "") != "update":
            return jitted

        @functools.wraps(inner)
        def call(*a, **k):
            out = jitted(*a, **k)
            LAST_UPDATE["last"] = out[0]
            return out

        return call

    jax.jit = hooked_jit


def local_shards(tree) -> dict:
    """{"<path>@<index>@<global shape>": host copy} for every block of `tree` this process
    holds; replicas of a block on this process's devices must be bitwise equal."""
    import numpy as np
    out = {}
    for path, x in mesh_worker._arrays(tree):
        for shard in x.addressable_shards:
            index = ",".join(f"{s.start or 0}:{x.shape[d] if s.stop is None else s.stop}"
                             for d, s in enumerate(shard.index))
            key = f"{path}@{index}@{','.join(map(str, x.shape))}"
            data = np.asarray(shard.data)
            if key in out and not np.array_equal(out[key], data):
                raise AssertionError(f"{key}: the replicas on {shard.device} and another "
                                     "device of this process differ")
            out[key] = data
    return out


def main(out: Path, data_dir: Path, run: str):
    import numpy as np
    workdir = out / run
    pid = int(os.environ.get("JAX_PROCESS_ID", "0")) if run == "dist" else 0
    for name in STAGES:
        shape = MESHES[name] if run == "dist" else (1, 1, 1)
        config = mesh_worker.stage_config(name, data_dir, shape, workdir)
        config.mesh.distributed = run == "dist"
        # The held-out evaluations too, which read batch-split samples and scores back to
        # the host: DPO's on one batch, PPO's at the start and the end on 32 prompts (the
        # rollouts' row count, so they reuse the compiled sampler).
        if name == "dpo_lora":
            config.eval_batches = 1
        elif name == "ppo":
            config.data.n_test = 32
            config.update(eval_every=config.steps, eval_prompts=32)
        tag = workdir / f"{name}.p{pid}"
        LAST_UPDATE.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            mesh_worker.trainer(name).train(config, workdir)
            np.savez(f"{tag}.npz", **local_shards(LAST_UPDATE["last"]))
        except Exception as e:  # noqa: BLE001  (the test reports it under the stage's name)
            Path(f"{tag}.error").write_text(f"{type(e).__name__}: {e}\n\n"
                                            f"{traceback.format_exc()[-6000:]}")
            print(f"FAILED {run} process {pid} {name}: {type(e).__name__}: {e}", flush=True)
            raise
        Path(f"{tag}.done").touch()
        print(f"OK {run} process {pid} {name} {time.perf_counter() - t0:.1f}s wall "
              f"{time.process_time() - c0:.1f}s cpu", flush=True)


if __name__ == "__main__":
    out_dir, data, which = sys.argv[1:]
    n = DEVICES_PER_PROCESS if which == "dist" else 1
    # The flags of tests/_trainers_mesh_worker.py, the same in every process (the programs
    # compared differ only in their partitioning).
    os.environ["XLA_FLAGS"] = " ".join([
        os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={n}",
        "--xla_backend_optimization_level=0"]).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(HERE.parent))
    install_update_hook()
    main(Path(out_dir), Path(data), which)
