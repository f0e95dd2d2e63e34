"""SFT stage: smoke run, exact resume after SIGKILL, config errors, the experiment CLI."""

import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from _resume import kill_after_first_checkpoint
from experiments import sft as sft_exp
from rlhf_jax import experiment
from rlhf_jax.checkpoint import complete_steps
from rlhf_jax.errors import ConfigError
from rlhf_jax.metrics import read_metrics
from rlhf_jax.trainers import common

ROOT = Path(__file__).resolve().parents[1]


def _cmd(workdir, data_dir, *extra):
    return [sys.executable, "-m", "experiments.sft", "--workdir", str(workdir),
            "--config.size=smoke", f"--config.data.data_dir={data_dir}", *extra]


def _params(stage_dir):
    _, params, _, _, meta = common.load_stage(stage_dir)
    return jax.device_get(params), meta


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    data_dir = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(_cmd(tmp_path / "straight", data_dir), check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    saved = kill_after_first_checkpoint(_cmd(killed, data_dir), killed / "sft", env=env, cwd=ROOT)
    assert saved and max(saved) < 24, saved  # killed partway, before the end
    subprocess.run(_cmd(killed, data_dir), check=True, env=env, cwd=ROOT, capture_output=True,
                   timeout=300)

    a, meta_a = _params(tmp_path / "straight" / "sft")
    b, meta_b = _params(killed / "sft")
    assert meta_a["step"] == meta_b["step"] == 24
    assert meta_a["data_state"] == meta_b["data_state"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)  # bitwise on CPU
    rows = read_metrics(killed / "sft")
    assert rows[-1]["eval/sft_loss"] < 5.6  # learned something (uniform is log 281 = 5.64)


def test_smoke_run_in_process_and_rerun_is_a_no_op(tmp_path):
    config = sft_exp.get_config("smoke")
    stage = sft_exp.main(config, tmp_path)
    assert complete_steps(stage)[-1] == 24
    before = os.path.getmtime(stage / "checkpoints" / "24")
    sft_exp.main(config, tmp_path)  # finished stage: resumes at the end, writes nothing new
    assert os.path.getmtime(stage / "checkpoints" / "24") == before
    # Logging and checkpoint cadence may change on resume; what the steps compute may not.
    config.log_every = 3
    sft_exp.main(config, tmp_path)
    config.optim.lr, config.data.batch_size = 0.5, 8
    with pytest.raises(ValueError, match=r"different config \(saved, now\): .*'data.batch_size': "
                                         r"\(16, 8\), 'optim.lr': \(0.003, 0.5\)\}.*new --workdir"):
        sft_exp.main(config, tmp_path)
    _, params, cfg, tok, meta = common.load_stage(stage)
    assert cfg.vocab_size == tok.vocab_size and meta["model_kind"] == "policy"
    rows = [r for r in read_metrics(stage) if "sft/loss" in r]
    assert rows and all(r["time/tokens_per_s"] > 0 and math.isfinite(r["sft/loss"])
                        for r in rows)


@pytest.mark.parametrize("override,match", [
    ({"data.batch_size": "0"}, "batch_size=0"),
    ({"data.buckets": "(64,)"}, "model.max_len"),
    ({"init_from": "/nonexistent/sft"}, "no complete checkpoint"),
    ({"data.source": "hub"}, "unknown data_source 'hub'; registered: arithmetic"),
    ({"init_from": "/some/sft", "data.tokenizer": "/some/sp.model"},
     "data.tokenizer is not used with init_from"),
])
def test_config_errors_say_what_to_change(tmp_path, override, match):
    # Field values fail when the config is read, combinations when the stage starts.
    with pytest.raises(ConfigError, match=match):
        config = experiment.load_config(sft_exp.get_config, {"size": "smoke", **override})
        sft_exp.main(config, tmp_path)


def test_cli_parsing_and_unknown_keys(capsys):
    workdir, overrides = experiment.parse_args(
        ["--workdir", "w", "--config.steps=5", "--config.optim.lr", "0.1"])
    assert workdir == "w" and overrides == {"steps": "5", "optim.lr": "0.1"}
    config = experiment.load_config(sft_exp.get_config, {**overrides, "size": "smoke",
                                                         "data.buckets": "(32, 48)"})
    assert config.steps == 5 and config.optim.lr == 0.1 and config.data.buckets == (32, 48)
    assert config.model.d_model == 32  # the smoke size was applied first
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'; did you mean "
                                          "'optim.lr'"):
        experiment.load_config(sft_exp.get_config, {"optim.lrr": "0.1"})
    with pytest.raises(ConfigError, match="--config.steps=many: must be an int >= 1"):
        experiment.load_config(sft_exp.get_config, {"steps": "many"})
    with pytest.raises(SystemExit) as e:
        experiment.run(sft_exp.get_config, sft_exp.main, ["--config.steps=1"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: --workdir DIR is required: the directory the run "
                                       "writes into\n")


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config = experiment.load_config(sft_exp.get_config, {
        "size": "smoke", "optim.lr": "1e30", "optim.warmup_steps": "0", "optim.grad_clip": "0.0",
        "save_every": "1"})
    with pytest.raises(common.NonFiniteError, match="non-finite loss or gradient at step"):
        sft_exp.main(config, tmp_path)
    steps = complete_steps(tmp_path / "sft")
    assert steps and max(steps) < 24
    _, params, _, _, _ = common.load_stage(tmp_path / "sft")
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(params)))
