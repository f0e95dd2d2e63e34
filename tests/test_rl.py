"""The RL trainer: every advantage estimator and policy loss runs; PPO-GT moves the policy;
resume is exact; bad configs fail at load."""

import jax
import numpy as np
import pytest

from experiments import grpo as grpo_exp
from experiments import ppo as ppo_exp
from experiments import sft as sft_exp
from rlhf_jax import experiment
from rlhf_jax.checkpoint import complete_steps
from rlhf_jax.metrics import read_metrics
from rlhf_jax.trainers import common, sft


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rl")
    config = experiment.load_config(sft_exp.get_config, {
        "size": "smoke", "data.data_dir": str(workdir / "data")})
    sft.train(config, workdir)
    return workdir


def _config(get_config, workdir, **overrides):
    return experiment.load_config(get_config, {
        "size": "smoke", "reward": "gold", "data.data_dir": str(workdir / "data"),
        **{k: str(v) for k, v in overrides.items()}})


# Evaluation on held-out prompts is exercised once (PPO-GT); the other variants skip it.
@pytest.mark.parametrize("get_config,overrides", [
    (ppo_exp.get_config, {"stage": "ppo_gt"}),
    (grpo_exp.get_config, {"stage": "grpo", "eval_every": 0}),
    (grpo_exp.get_config, {"stage": "rloo", "advantage": "rloo", "policy_loss": "reinforce",
                           "eval_every": 0}),
    (grpo_exp.get_config, {"stage": "dr_grpo", "advantage": "dr_grpo", "eval_every": 0,
                           "loss_agg": "seq_mean_token_sum_norm(norm=16)"}),
    (ppo_exp.get_config, {"stage": "reinforce", "advantage": "reinforce", "eval_every": 0,
                          "policy_loss": "reinforce", "kl.controller": "adaptive(target=1.0)"}),
])
def test_variants_run_and_log(sft_workdir, get_config, overrides):
    config = _config(get_config, sft_workdir, **overrides)
    stage = ppo_exp.main(config, sft_workdir)
    rows = read_metrics(stage)
    train_rows = [r for r in rows if "objective/kl" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    for key in ("gold/reward", "objective/kl", "objective/kl_k3", "objective/kl_coef",
                "policy/entropy", "response/length", "time/tokens_per_s", "time/rollout_s"):
        assert np.isfinite(train_rows[-1][key]), key
    if config.eval_every:
        assert {0, 2, 4} <= {r["step"] for r in rows if "eval/gold/reward" in r}
    # The first update starts from the sampling policy: the ratio is 1 up to float error.
    assert train_rows[0].get("ppo/ratio_mean", 1.0) == pytest.approx(1.0, abs=0.02)
    if "value/loss" in train_rows[0]:
        assert np.isfinite(train_rows[0]["value/explained_variance"])
    _, params, _, _, meta = common.load_stage(stage)
    assert meta["model_kind"] == "policy" and meta["step"] == 4


def test_resume_matches_uninterrupted(sft_workdir):
    straight = _config(ppo_exp.get_config, sft_workdir, stage="ppo_a", steps=4, eval_every=0)
    ppo_exp.main(straight, sft_workdir)
    part = _config(ppo_exp.get_config, sft_workdir, stage="ppo_b", steps=4, eval_every=0)
    # Stop after the checkpoint at step 2 by running a 2-step stage first, then resume to 4.
    first = _config(ppo_exp.get_config, sft_workdir, stage="ppo_b", steps=2, eval_every=0)
    ppo_exp.main(first, sft_workdir)
    assert complete_steps(sft_workdir / "ppo_b") == [2]
    ppo_exp.main(part, sft_workdir)
    a = jax.device_get(common.load_stage(sft_workdir / "ppo_a")[1])
    b = jax.device_get(common.load_stage(sft_workdir / "ppo_b")[1])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("overrides,match", [
    ({"advantage": "grpo", "rollout.samples_per_prompt": 1}, "samples_per_prompt >= 2"),
    ({"advantage": "gea"}, "unknown advantage 'gea'"),
    ({"ppo.minibatches": 3}, "not divisible by ppo.minibatches"),
    ({"rollout.max_new_tokens": 64}, "exceeds the model's max_len"),
    ({"reward": "model", "reward_from": "/nonexistent/rm"}, "no complete checkpoint"),
])
def test_bad_configs(sft_workdir, overrides, match):
    with pytest.raises(ValueError, match=match):
        ppo_exp.main(_config(ppo_exp.get_config, sft_workdir, stage="bad", **overrides),
                     sft_workdir)
