"""Metric writers: JSONL lines, TensorBoard events, resumed runs, bad input."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.metrics import (MetricsWriter, format_postfix, read_metrics, stage_summary,
                              to_host)


def test_jsonl_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path / "ppo") as w:
        w.write(1, {"ppo/clipfrac": jnp.float32(0.25), "gold/reward": np.float64(1.5)})
        w.write(2, {"ppo/clipfrac": jnp.float32(0.125), "objective/kl": float("nan")})
    rows = read_metrics(tmp_path / "ppo")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["ppo/clipfrac"] == 0.25 and rows[0]["gold/reward"] == 1.5
    assert math.isnan(rows[1]["objective/kl"])  # a diverged value is shown, not dropped
    events = list((tmp_path / "ppo" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_resumed_run_supersedes_repeated_steps(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in (1, 2, 3):
            w.write(step, {"loss": step})
    with MetricsWriter(tmp_path, tensorboard=False) as w:  # resumed from step 2's checkpoint
        w.write(3, {"loss": 30.0})
        w.write(4, {"loss": 40.0})
        w.write(4, {"eval/acc": 0.5})  # a second line for the same step adds its keys
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert rows[-1]["eval/acc"] == 0.5


def test_bad_metrics_and_bad_lines(tmp_path):
    with pytest.raises(ValueError, match="'x' has shape \\(2,\\)"):
        to_host({"x": jnp.zeros(2)})
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)


def test_format_postfix():
    assert format_postfix({"rm/accuracy": 0.123456, "rm/loss": float("inf")}) == {
        "rm/accuracy": "0.1235", "rm/loss": "inf"}


def test_stage_summary_shows_first_and_last_values_and_the_paths(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(5, {"eval/gold/reward": 0.5, "loss": 2.0})
        w.write(10, {"loss": 1.0})
        w.write(20, {"eval/gold/reward": 2.25, "loss": 0.5})
    text = stage_summary(tmp_path, ["eval/gold/reward", "loss", "never/logged"], title="ppo")
    lines = text.splitlines()
    assert lines[0] == f"ppo: finished at step 20 in {tmp_path}"
    assert lines[1].split() == ["eval/gold/reward", "0.5", "->", "2.25", "(steps", "5", "->",
                                "20)"]
    assert lines[2].split()[:4] == ["loss", "2", "->", "0.5"]
    assert "never/logged" not in text
    assert lines[-2].endswith(str(tmp_path / "checkpoints"))
    assert str(tmp_path / "metrics.jsonl") in lines[-1]
