"""PPO from a reward model on the synthetic testbed: GAE with a critic initialised from the
reward model, the clipped surrogate, and KL to the SFT reference as a shaped per-token reward.

    python -m experiments.sft --workdir runs/pipe
    python -m experiments.reward --workdir runs/pipe
    python -m experiments.ppo --workdir runs/pipe                 # reads runs/pipe/{sft,rm}
    python -m experiments.ppo --workdir runs/x --config.init_from=runs/pipe/sft \
        --config.reward_from=runs/pipe/rm
    python -m experiments.ppo --workdir runs/pipe --config.reward=gold --config.stage=ppo_gt

Writes WORKDIR/ppo/: checkpoints (policy; critic, optimizer, RNG and KL-controller state in
the train state), metrics.jsonl (RM score, gold reward, KL k1/k3, KL coefficient, entropy,
response length, clip fraction, approx_kl, value loss, explained variance, tokens/s and
rollout/update time) and TensorBoard events; eval/* rows on held-out prompts every eval_every
iterations. Expected at the default size (20 iterations of 64 rollouts, KL coefficient 0.05;
measured 2026-11-23 after the default SFT and reward runs, 25 s for the stage in the
quickstart): eval/gold/reward 0.57 -> 2.2 while eval/objective/kl grows to ~4.7 nats. The KL keeps growing with more
iterations (11 nats by iteration 30, 14 by 40, with gold ~3.4 and longer completions): raise
steps together with kl.coef. `--config.reward=gold` optimises the gold reward directly (PPO-GT).
"""

from rlhf_jax import experiment, metrics as metrics_lib
from rlhf_jax.errors import ConfigError
from rlhf_jax.trainers import rl

SCHEMA = rl.SCHEMA
# What main prints when the stage ends: first and last logged values.
SUMMARY_KEYS = ("eval/gold/reward", "eval/rm/score", "eval/objective/kl", "eval/response/length",
                "objective/kl_coef")


def get_config(size: str = "default"):
    config = rl.default_config()
    config.size = size
    if size == "smoke":
        config.data.update(n_train=256, n_test=64)
        config.rollout.update(prompts_per_step=8, max_new_tokens=16)
        config.update(steps=4, log_every=2, save_every=2, eval_every=2, eval_prompts=16)
    elif size != "default":
        raise ConfigError(f"size={size!r}; choose 'default' or 'smoke'")
    return config


def main(config, workdir):
    stage_dir = rl.train(config, workdir)
    metrics_lib.print_summary(stage_dir, SUMMARY_KEYS, title=config.stage)
    return stage_dir


if __name__ == "__main__":
    experiment.run(get_config, main)
