"""The main job end to end at smoke size: every stage, the report, the figure."""

import json

import pytest

from experiments import quickstart
from rlhf_jax import experiment
from rlhf_jax.checkpoint import complete_steps
from rlhf_jax.errors import ConfigError


def test_quickstart_smoke(tmp_path, capsys):
    config = experiment.load_config(quickstart.get_config, {"size": "smoke"})
    methods = quickstart.main(config, tmp_path)
    for stage in ("sft", "rm", "ppo", "dpo"):
        assert complete_steps(tmp_path / stage), stage
    report = (tmp_path / "report.md").read_text()
    for name in ("SFT", "PPO", "DPO", "best-of-1", "best-of-4"):
        assert f"| {name} |" in report
        assert set(methods[name]) >= {"gold/reward", "rm/score", "objective/kl"}
    assert "## Acceptance" in report
    png = (tmp_path / "reward_vs_kl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["methods"]["SFT"]["objective/kl"] == methods["SFT"]["objective/kl"]
    assert abs(methods["SFT"]["objective/kl"]) < 1e-3  # the reference against itself
    assert "report:" in capsys.readouterr().out


def test_one_seed_reaches_every_stage_and_a_conflicting_stage_seed_is_refused(tmp_path):
    config = experiment.load_config(quickstart.get_config, {"size": "smoke", "seed": "3"})
    stages = quickstart._stage_configs(config, tmp_path)
    assert {name: c.seed for name, c in stages.items()} == dict(sft=3, rm=3, ppo=3, dpo=3)
    assert all(c.data.data_dir == str(tmp_path / "data") for c in stages.values())
    config = experiment.load_config(quickstart.get_config, {"size": "smoke", "seed": "3",
                                                            "rm.seed": "5"})
    with pytest.raises(ValueError, match="rm.seed=5 but seed=3.*--config.seed"):
        quickstart._stage_configs(config, tmp_path)


def test_every_stage_config_is_checked_before_the_first_stage_trains(tmp_path):
    with pytest.raises(ValueError, match="bogus"):   # refused when the config is read
        experiment.load_config(quickstart.get_config, {"size": "smoke",
                                                       "dpo.pref_loss": "bogus"})
    # A config changed after loading is checked again, every stage before the first trains.
    config = experiment.load_config(quickstart.get_config, {"size": "smoke"})
    config.dpo.pref_loss = "bogus"
    with pytest.raises(ValueError, match="bogus"):
        quickstart.main(config, tmp_path)
    assert not (tmp_path / "sft").exists()


@pytest.mark.parametrize("override,match", [
    ({"eval.max_new_tokens": "1000"}, "eval.max_new_tokens=1000 after prompts of up to 12"),
    ({"dpo.init_from": "/nonexistent/sft"}, "dpo.init_from='/nonexistent/sft' holds no complete"),
    ({"ppo.reward_from": "/nonexistent/rm"}, "ppo.reward_from='/nonexistent/rm' holds no"),
])
def test_the_pipeline_plan_is_checked_before_sft_trains(tmp_path, override, match):
    config = experiment.load_config(quickstart.get_config, {"size": "smoke", **override})
    with pytest.raises(ConfigError, match=match):
        quickstart.main(config, tmp_path)
    assert not (tmp_path / "sft").exists()
