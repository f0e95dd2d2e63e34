"""Reward model on the synthetic testbed: SFT backbone + scalar head, Bradley–Terry on pairs.

    python -m experiments.sft --workdir runs/rlhf                 # first: WORKDIR/sft
    python -m experiments.reward --workdir runs/rlhf               # init_from = WORKDIR/sft
    python -m experiments.reward --workdir runs/rm --config.init_from=runs/rlhf/sft
    python -m experiments.reward --workdir runs/rlhf --config.size=smoke   # after a smoke SFT
    # ablations: --config.loss='bradley_terry(margin=0.5)', or --config.loss=plackett_luce
    # (4-way ranked lists of the testbed; the default-size numbers below are Bradley–Terry's)

Writes WORKDIR/rm/: Orbax checkpoints (the final one holds the normalised reward model, with
model_kind="reward", the normalisation gain/bias and the evaluation numbers in its meta),
metrics.jsonl and TensorBoard events; prints the evaluation. Re-running resumes an interrupted
stage and does nothing once it has finished.

Expected at the default size (10,000 pairs, tau = 1, one epoch = 156 steps of 64 pairs at lr
1e-3 with cosine decay to 0, after the default SFT run; measured 2026-11-23 on 2 idle CPU
cores, deterministic apart from the times): held-out label accuracy rm/eval_accuracy 0.73 (the
labels themselves are noisy), gold-ordering accuracy rm/eval_gold_accuracy 0.795 and 0.910 on
pairs more than one SFT std of gold reward apart (rm/eval_gold_accuracy_far); normalised reward
mean 0, std 1 on 1,024 SFT samples. 46 s for the stage in the quickstart. On this SFT model
lr 2e-3 gave 0.764 / 0.889 and 3e-3 0.769 / 0.897: the gold accuracies move by a few points
with the SFT model and the learning rate, so check them after changing either. The smoke size
(after a smoke SFT) takes ~35 s of CPU, mostly compilation.
"""

from rlhf_jax import experiment, metrics as metrics_lib
from rlhf_jax.errors import ConfigError
from rlhf_jax.trainers import reward

SCHEMA = reward.SCHEMA
# What main prints when the stage ends: first and last logged values.
SUMMARY_KEYS = ("rm/loss", "rm/accuracy", "rm/eval_accuracy", "rm/eval_gold_accuracy",
                "rm/eval_gold_accuracy_far", "rm/norm_gain", "rm/norm_bias")


def get_config(size: str = "default"):
    config = reward.default_config()
    config.size = size
    if size == "smoke":
        # For experiments.sft's smoke model (max_len 48). One epoch of 2,048 pairs is 64 cheap
        # steps, enough for the tiny model to beat chance on the gold ordering (~0.69).
        config.data.update(n_train=2048, n_test=256, batch_size=32)
        config.norm.update(n_samples=64, batch_size=64, prompts_n_train=128, prompts_n_test=32)
        config.log_every, config.save_every = 8, 8
    elif size != "default":
        raise ConfigError(f"size={size!r}; choose 'default' or 'smoke'")
    return config


def main(config, workdir):
    stage_dir = reward.train(config, workdir)
    metrics_lib.print_summary(stage_dir, SUMMARY_KEYS, title="rm")
    return stage_dir


if __name__ == "__main__":
    experiment.run(get_config, main)
