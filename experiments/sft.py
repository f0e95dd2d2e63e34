"""Supervised fine-tuning on the synthetic testbed (or any prepared TFDS SFT dataset).

    python -m experiments.sft --workdir runs/sft
    python -m experiments.sft --workdir runs/sft --config.size=smoke      # ~20 s on 2 cores

Writes WORKDIR/sft/: Orbax checkpoints (params, optimizer state, data position, model config,
tokenizer), metrics.jsonl and TensorBoard events. Re-running the command resumes from the
latest checkpoint. Expected at the default size (600 steps of 64 examples, one 36-token bucket;
measured 2026-11-23 on 2 idle CPU cores): the held-out completion NLL (eval/sft_loss in
metrics.jsonl) falls from ~5.6 (uniform over 281 tokens) to 2.72; 79 s for the stage in the
quickstart, building the testbed data included.
400 steps reach the same NLL, but the reward model trained from that SFT model was markedly
worse (gold accuracy 0.75 / 0.86 on far pairs against 0.79 / 0.91), so the default keeps 600.
"""

from rlhf_jax import experiment, metrics as metrics_lib
from rlhf_jax.errors import ConfigError
from rlhf_jax.trainers import sft

SCHEMA = sft.SCHEMA
# What main prints when the stage ends: first and last logged values.
SUMMARY_KEYS = ("sft/loss", "eval/sft_loss")


def get_config(size: str = "default"):
    config = sft.default_config()
    config.size = size
    if size == "smoke":
        config.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64)
        config.data.update(n_train=512, n_test=64, batch_size=16)
        config.steps, config.log_every, config.save_every, config.eval_batches = 24, 4, 8, 1
    elif size != "default":
        raise ConfigError(f"size={size!r}; choose 'default' or 'smoke'")
    return config


def main(config, workdir):
    stage_dir = sft.train(config, workdir)
    metrics_lib.print_summary(stage_dir, SUMMARY_KEYS, title="sft")
    return stage_dir


if __name__ == "__main__":
    experiment.run(get_config, main)
