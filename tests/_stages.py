"""Stages the trainer tests share: a tiny SFT stage to start from, and a stage interrupted
right after its first step."""

import pytest

from experiments import sft as sft_exp
from rlhf_jax import metrics
from rlhf_jax.trainers import sft


def tiny_sft_stage(root, **overrides):
    """Trains the smoke SFT config for 4 steps into root/sft (data in root/data): a policy for
    later stages to start from, not a good one. Returns root."""
    config = sft_exp.get_config("smoke")
    config.data.data_dir = str(root / "data")
    config.steps, config.save_every, config.eval_batches = 4, 4, 0
    config.update(overrides)
    sft.train(config, root)
    return root


class Crash(Exception):
    pass


class CrashingBar:
    """Stands in for the progress bar; 'crashes' right after the step-1 checkpoint."""

    def __init__(self, *args, **kwargs):
        pass

    def update(self, n):
        raise Crash

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def crash_after_the_first_step(train, config, workdir, monkeypatch):
    """Runs `train(config, workdir)` until it 'crashes' right after its first step (and
    checkpoint, with save_every=1)."""
    with monkeypatch.context() as m:
        m.setattr(metrics, "progress", CrashingBar)
        with pytest.raises(Crash):
            train(config, workdir)
