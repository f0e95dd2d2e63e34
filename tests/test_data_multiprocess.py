"""Several processes preparing the same dataset in one data_dir: one prepares, the others wait
for it, and all read the same records (builders.prepare holds a file lock while preparing).

Without the lock two processes started together both generate the dataset and the second to
finish fails to rename its copy into place (FileExistsError); in a multi-host run the other
process then waits for it in a collective until Gloo times out.
"""

import os
import socket
import subprocess
import sys
import time

from rlhf_jax.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints a digest of every record of both splits, so processes can be compared.
DIGEST = """
import hashlib
def digest(sources):
    h = hashlib.sha256()
    for split in sorted(sources):
        for i in range(len(sources[split])):
            h.update(repr(sorted(sources[split][i].items())).encode())
    return h.hexdigest()
"""

PREPARE = DIGEST + """
import os, sys, time
data_dir, go = sys.argv[1], sys.argv[2]
from rlhf_jax.data import builders
cfg = builders.SyntheticConfig(name="pairs_mp", kind="pairs", n_train=200, n_test=20)
print("ready", flush=True)
while not os.path.exists(go):      # start preparing together, to make them race
    time.sleep(0.002)
b = builders.prepare(builders.SyntheticTestbed, data_dir=data_dir, config=cfg)
print("digest", digest(b.as_data_source()), flush=True)
"""


def _env():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    return env


def _start(code, *args):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_ready(proc):
    line = proc.stdout.readline()
    assert line == "ready\n", line + proc.stderr.read()[-3000:]


def _finish(procs, timeout=120):
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def _digests(outs):
    return [next(line.split()[1] for line in out.splitlines() if line.startswith("digest "))
            for out in outs]


def test_two_processes_prepare_the_same_dataset_once(tmp_path):
    data_dir, go = tmp_path / "data", tmp_path / "go"
    procs = [_start(PREPARE, data_dir, go) for _ in range(2)]
    for p in procs:
        _wait_ready(p)
    go.touch()
    outs = _finish(procs)
    a, b = _digests(outs)
    assert a == b
    # Exactly one of them prepared (and said so); the other found the prepared dataset.
    assert sum(out.count("data: prepared rlhf_synthetic/pairs_mp") for out in outs) == 1


def test_a_process_waits_while_another_prepares(tmp_path):
    """While the lock is held (as by a process that is preparing), prepare waits; once it is
    released, prepare goes on."""
    from rlhf_jax.data import builders
    data_dir, go = tmp_path / "data", tmp_path / "go"
    go.touch()
    with builders._exclusive(str(data_dir), "rlhf_synthetic"):
        proc = _start(PREPARE, data_dir, go)
        _wait_ready(proc)
        time.sleep(1.0)
        assert proc.poll() is None
        assert not (data_dir / "rlhf_synthetic" / "pairs_mp").exists()
    (out,) = _finish([proc])
    assert "data: prepared rlhf_synthetic/pairs_mp (train 200, test 20)" in out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_fresh_processes_run_a_stage_with_mesh_distributed(tmp_path):
    """The multi-host start of a stage as a user launches it: two processes, each told its
    place by JAX_* variables, run experiments.sft with mesh.distributed=true on one fresh
    workdir. One prepares the testbed while the other waits; both train (a data axis of 2,
    one device each) and the checkpoints are written once."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(_env(), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "experiments.sft", "--workdir", str(tmp_path),
             "--config.size=smoke", "--config.mesh.distributed=true", "--config.steps=4",
             "--config.save_every=2", "--config.log_every=2"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = _finish(procs, timeout=150)
    assert sum(out.count("data: prepared rlhf_synthetic/sft_512_64") for out in outs) == 1
    # Process 0 writes the metrics and prints the summary.
    assert [out.count("sft: finished at step 4") for out in outs] == [1, 0], outs
    assert [r["step"] for r in read_metrics(tmp_path / "sft")] == [2, 4]
    assert sorted(p.name for p in (tmp_path / "sft" / "checkpoints").iterdir()) == ["2", "4"]
