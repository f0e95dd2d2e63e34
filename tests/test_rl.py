"""The RL trainer: every advantage estimator and policy loss runs; PPO-GT moves the policy;
resume is exact; bad configs fail at load."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from _resume import kill_after_first_checkpoint
from experiments import grpo as grpo_exp
from experiments import ppo as ppo_exp
from experiments import rsft as rsft_exp
from experiments import sft as sft_exp
from rlhf_jax import experiment
from rlhf_jax.metrics import read_metrics
from rlhf_jax.trainers import common, sft

ROOT = Path(__file__).resolve().parents[1]

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
                           "eval_every": 0, "ppo.epochs": 1, "ppo.minibatches": 1}),
    (grpo_exp.get_config, {"stage": "dr_grpo", "advantage": "dr_grpo", "eval_every": 0,
                           "loss_agg": "seq_mean_token_sum_norm(norm=16)"}),
    (ppo_exp.get_config, {"stage": "reinforce", "advantage": "reinforce", "eval_every": 0,
                          "policy_loss": "reinforce", "kl.controller": "adaptive(target=1.0)",
                          "ppo.epochs": 1, "ppo.minibatches": 1,
                          "whiten_rewards": True, "reward_clip": 0.5}),
    (rsft_exp.get_config, {"eval_every": 0}),
    (grpo_exp.get_config, {"stage": "gspo", "policy_loss": "gspo", "eval_every": 0}),
    (ppo_exp.get_config, {"stage": "reinforce_pp", "advantage": "reinforce_pp",
                          "policy_loss": "cispo", "eval_every": 0}),
    (ppo_exp.get_config, {"stage": "remax", "advantage": "remax", "eval_every": 0}),
])
def test_variants_run_and_log(sft_workdir, get_config, overrides):
    config = _config(get_config, sft_workdir, **overrides)
    stage = ppo_exp.main(config, sft_workdir)
    rows = read_metrics(stage)
    train_rows = [r for r in rows if "objective/kl" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    for key in ("gold/reward", "objective/kl", "objective/kl_k3", "objective/kl_coef",
                "policy/entropy", "response/length", "time/tokens_per_s", "time/rollout_s",
                "time/update_s"):
        assert np.isfinite(train_rows[-1][key]), key
    if config.eval_every:
        assert {0, 2, 4} <= {r["step"] for r in rows if "eval/gold/reward" in r}
    # The first update starts from the sampling policy: the ratio is 1 up to float error.
    assert train_rows[0].get("ppo/ratio_mean", 1.0) == pytest.approx(1.0, abs=0.02)
    if config.policy_loss.startswith("ppo_clip"):
        assert 0 <= train_rows[-1]["ppo/clipfrac"] <= 1 and np.isfinite(
            train_rows[-1]["ppo/approx_kl"])
    if config.reward_clip:   # the logged mean score is of the clipped scores
        assert all(abs(r["objective/scores"]) <= config.reward_clip for r in train_rows)
    if "value/loss" in train_rows[0]:
        assert np.isfinite(train_rows[0]["value/explained_variance"])
    _, params, _, _, meta = common.load_stage(stage)
    assert meta["model_kind"] == "policy" and meta["step"] == 4


def test_a_reward_expression_mixes_token_and_text_rewards(sft_workdir):
    """reward = gold shaped by DAPO's overlong term (tokens, in the rollout's jit) and a regex
    format check (decoded text, on the host): each term is logged on its own, the host cost
    under time/, and the optimised score is their weighted sum."""
    config = _config(grpo_exp.get_config, sft_workdir, stage="shaped", eval_every=0,
                     reward="gold - 0.5*overlong(max_len=12, cache=4) + 0.2*regex(pattern='e')",
                     **{"rollout.mask_truncated": True})
    rows = [r for r in read_metrics(ppo_exp.main(config, sft_workdir)) if "objective/kl" in r]
    for key in ("gold/reward", "reward/overlong", "reward/regex", "time/reward_host_s"):
        assert np.isfinite(rows[-1][key]), key
    assert -1 <= rows[-1]["reward/overlong"] <= 0 and 0 <= rows[-1]["reward/regex"] <= 1
    # The sampler's and the training forward's log-probs agree to float error.
    assert 0 <= rows[-1]["rollout/logp_gap_mean"] <= rows[-1]["rollout/logp_gap_max"] < 1e-3
    for r in rows:   # the weighted sum, less missing_eos_penalty (1.0) where no EOS came
        assert r["objective/scores"] == pytest.approx(
            r["gold/reward"] - 0.5 * r["reward/overlong"] + 0.2 * r["reward/regex"]
            - 1.0 * (1.0 - r["response/eos_rate"]), abs=1e-5)


def _ppo_cmd(workdir, stage):
    return [sys.executable, "-m", "experiments.ppo", "--workdir", str(workdir),
            "--config.size=smoke", "--config.reward=gold", f"--config.stage={stage}",
            f"--config.data.data_dir={workdir / 'data'}", "--config.eval_every=0",
            "--config.steps=8", "--config.save_every=2"]


def test_resume_after_sigkill_matches_uninterrupted(sft_workdir):
    """Policy, critic, optimizer, RNG, KL-controller and prompt-iterator state all come back:
    a PPO run killed partway and resumed ends bitwise equal to an uninterrupted one."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(_ppo_cmd(sft_workdir, "ppo_a"), check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=300)
    saved = kill_after_first_checkpoint(_ppo_cmd(sft_workdir, "ppo_b"), sft_workdir / "ppo_b",
                                        env=env, cwd=ROOT)
    assert saved and max(saved) < 8, saved  # killed partway, before the end
    subprocess.run(_ppo_cmd(sft_workdir, "ppo_b"), check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=300)
    a = jax.device_get(common.load_stage(sft_workdir / "ppo_a")[1])
    b = jax.device_get(common.load_stage(sft_workdir / "ppo_b")[1])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    rows = read_metrics(sft_workdir / "ppo_b")
    assert rows[-1]["step"] == 8


def test_dynamic_sampling_refills_the_same_after_a_sigkill(sft_workdir):
    """Dynamic sampling draws further prompt batches (with the 'good' format reward, two per
    iteration here); a GRPO run killed partway and resumed draws the same prompts and keys and
    ends bitwise equal to an uninterrupted one."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cmd(stage):
        return [sys.executable, "-m", "experiments.grpo", "--workdir", str(sft_workdir),
                "--config.size=smoke", "--config.reward=regex(pattern='good')",
                f"--config.stage={stage}", f"--config.data.data_dir={sft_workdir / 'data'}",
                "--config.eval_every=0", "--config.steps=6", "--config.save_every=2",
                "--config.log_every=1", "--config.rollout.dynamic_sampling=true"]

    subprocess.run(cmd("dyn_a"), check=True, env=env, cwd=ROOT, capture_output=True,
                   timeout=300)
    saved = kill_after_first_checkpoint(cmd("dyn_b"), sft_workdir / "dyn_b", env=env, cwd=ROOT)
    assert saved and max(saved) < 6, saved
    subprocess.run(cmd("dyn_b"), check=True, env=env, cwd=ROOT, capture_output=True,
                   timeout=300)
    assert any(r.get("rollout/draws", 1) > 1 for r in read_metrics(sft_workdir / "dyn_a"))
    a = jax.device_get(common.load_stage(sft_workdir / "dyn_a")[1])
    b = jax.device_get(common.load_stage(sft_workdir / "dyn_b")[1])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("overrides,match", [
    ({"advantage": "grpo", "rollout.samples_per_prompt": 1}, "samples_per_prompt >= 2"),
    ({"advantage": "gea"}, "unknown advantage 'gea'"),
    ({"ppo.minibatches": 3}, "not divisible by ppo.minibatches"),
    ({"rollout.max_new_tokens": 64}, "exceeds the model's max_len"),
    ({"advantage": "best_of_n", "rollout.samples_per_prompt": 4}, "whiten_advantages=False"),
    ({"reward": "model", "reward_from": "/nonexistent/rm"}, "no complete checkpoint"),
    # A policy is not a reward model: never score with a randomly initialised head.
    ({"reward": "model", "reward_from": "{sft}"},
     "holds a policy checkpoint, not a reward model; point reward_from at the reward-model"),
    ({"log_every": 0}, "log_every=0: must be an int >= 1"),
    ({"reward_from": "/some/rm"}, "reward_from is not used with reward='gold'"),
    ({"policy_loss": "reinforce"}, "reinforce' has no importance ratio.*set both to 1"),
    ({"kl.controller": "adaptive", "kl.coef": 0.0}, "start from a positive kl.coef"),
    ({"eval_prompts": 300}, "multiple of 256"),
    ({"whiten_rewards": True, "advantage": "best_of_n", "whiten_advantages": False,
      "rollout.samples_per_prompt": 2}, "whiten_rewards=False"),
])
def test_bad_configs(sft_workdir, overrides, match):
    overrides = {k: v.format(sft=sft_workdir / "sft") if isinstance(v, str) else v
                 for k, v in overrides.items()}
    with pytest.raises(ValueError, match=match):
        ppo_exp.main(_config(ppo_exp.get_config, sft_workdir, stage="bad", **overrides),
                     sft_workdir)


def test_truncated_completions_take_no_part_in_the_loss(sft_workdir):
    """rollout.mask_truncated (DAPO's overlong filtering): with one-token completions only those
    that are the EOS itself are not truncated, so the loss keeps exactly the EOS rate of the
    completion tokens."""
    config = _config(grpo_exp.get_config, sft_workdir, stage="masked", eval_every=0,
                     **{"rollout.max_new_tokens": 1, "rollout.mask_truncated": True})
    rows = [r for r in read_metrics(ppo_exp.main(config, sft_workdir)) if "objective/kl" in r]
    assert any(0 < r["response/eos_rate"] < 1 for r in rows)
    for r in rows:
        assert r["rollout/loss_token_frac"] == pytest.approx(r["response/eos_rate"])


def test_dynamic_sampling_refills_and_never_trains_on_a_tied_group(sft_workdir):
    """DAPO's dynamic sampling: with the gold reward (continuous) every group is kept at the
    first draw; with a reward that ties every group (a pattern no completion contains) each
    iteration draws max_draws batches, keeps none, and masks every filler group out of the
    loss, so the policy does not move."""
    config = _config(grpo_exp.get_config, sft_workdir, stage="dyn_gold", eval_every=0,
                     **{"rollout.dynamic_sampling": True})
    rows = [r for r in read_metrics(ppo_exp.main(config, sft_workdir)) if "objective/kl" in r]
    assert all(r["rollout/draws"] == 1 and r["rollout/kept_group_frac"] == 1 for r in rows)

    config = _config(grpo_exp.get_config, sft_workdir, stage="dyn_tied", eval_every=0,
                     reward="regex(pattern='@@')", missing_eos_penalty=0.0, steps=1,
                     **{"rollout.dynamic_sampling": True, "rollout.max_draws": 2,
                        "optim.warmup_steps": 0})
    stage = ppo_exp.main(config, sft_workdir)
    row = [r for r in read_metrics(stage) if "objective/kl" in r][-1]
    assert row["rollout/draws"] == 2 and row["rollout/kept_group_frac"] == 0
    sft_params = common.load_stage(sft_workdir / "sft")[1]
    for a, b in zip(jax.tree.leaves(sft_params), jax.tree.leaves(common.load_stage(stage)[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_online_dpo_pairs_the_best_and_worst_sample_of_each_prompt(sft_workdir):
    """online_pref_loss: the RL trainer samples, scores with the reward, and trains a
    preference loss on each prompt's best and worst sample. At the first update the policy is
    the reference, so the DPO loss is log 2 on every pair."""
    config = _config(grpo_exp.get_config, sft_workdir, stage="online_dpo", eval_every=0,
                     online_pref_loss="dpo(beta=0.1)",
                     **{"rollout.samples_per_prompt": 2, "ppo.minibatches": 1, "ppo.epochs": 1,
                        "log_every": 1})
    rows = [r for r in read_metrics(ppo_exp.main(config, sft_workdir)) if "objective/kl" in r]
    assert rows[0]["dpo/loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert all(np.isfinite(r["dpo/margin"]) for r in rows)
    assert rows[-1]["objective/kl"] > 0          # the policy moved away from the reference


def test_online_pref_loss_needs_groups_of_two_or_more(tmp_path):
    from rlhf_jax.errors import ConfigError
    from rlhf_jax.trainers import rl
    config = _config(grpo_exp.get_config, tmp_path, online_pref_loss="dpo",
                     **{"rollout.samples_per_prompt": 1, "ppo.minibatches": 1,
                        "advantage": "reinforce"})
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        rl.validate(config)
    with pytest.raises(ConfigError, match="unknown pref_loss 'dop'"):
        _config(grpo_exp.get_config, tmp_path, online_pref_loss="dop")
