"""Kill a stage partway: the helper of the SIGKILL resume tests."""

import signal
import subprocess
import time

from rlhf_jax.checkpoint import complete_steps


def kill_after_first_checkpoint(cmd, stage_dir, *, env, cwd, timeout: float = 300):
    """Runs `cmd`, SIGKILLs it as soon as `stage_dir` holds a complete checkpoint, and returns
    the complete steps left behind."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not complete_steps(stage_dir) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return complete_steps(stage_dir)
