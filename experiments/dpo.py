"""DPO (or cDPO / IPO / SimPO / ORPO / ... / KTO) on the synthetic testbed, from an SFT checkpoint.

    python -m experiments.sft --workdir runs/dpo                   # the SFT stage first
    python -m experiments.dpo --workdir runs/dpo                   # init_from "" = runs/dpo/sft
    python -m experiments.dpo --workdir runs/ipo --config.init_from=runs/dpo/sft \\
        --config.pref_loss="ipo(tau=0.1)"                          # an ablation: one string
    python -m experiments.dpo --workdir runs/dpo --config.stage=kto \
        --config.pref_loss="kto(beta=0.2)" --config.data.split_pairs=True   # KTO, unpaired rows
    python -m experiments.dpo --workdir W --config.size=smoke --config.init_from=W/sft

Writes WORKDIR/<config.stage>/ (default WORKDIR/dpo/): Orbax checkpoints (params, optimizer
state, data position, model config, tokenizer, this config, model_kind="policy"),
metrics.jsonl and TensorBoard events. Re-running the command resumes from the latest
checkpoint. Every log step has the loss's metrics (dpo/accuracy, dpo/margin, implicit
rewards), pref/grad_norm and time/tokens_per_s. The last line of metrics.jsonl also holds the
evals: eval/pref_accuracy, eval/pref_margin and eval/gold_agreement on 512 test pairs, and the
generation eval on 512 held-out prompts: gold/reward of the trained policy, gold/ref_reward and
gold/ref_reward_std of the SFT policy on the same prompts with the same random numbers,
gold/gain, gold/gain_in_ref_std, objective/kl (nats per sequence), time/train_wall_s and
time/train_cpu_s.

Expected at the default size (dpo(beta=0.2), 80 steps of 32 pairs at lr 5e-4), after the
default SFT run; measured 2026-11-23 on 2 CPU cores (shared with another job), deterministic
apart from the times: gold/gain_in_ref_std 0.65 at objective/kl 4.1 nats, eval/pref_accuracy
0.67, completions 18.5 tokens (SFT 14), 86% end in eos. The stage took 16 s in the
quickstart, which turns its own generation evaluation off. The quickstart's own evaluation of
the same policy (256 prompts x 4 samples) gives a gain of 0.62 SFT std at KL 3.8.

The acceptance bar of the pipeline is a gain of at least half the SFT std at KL <= 10 nats.
DPO on this testbed is sensitive to the SFT model it starts from: with beta 0.1, 16 pairs at
lr 4e-4 for 80 steps gained 0.63 std at KL 2.0 from one SFT model and -0.08 std at KL 13 from
another that differs only by the float rounding of a shorter padding bucket; 32 pairs at lr
4e-4 gained 0.63 at KL 4.9, 16 pairs at lr 5e-4 for 100 steps 0.69 at KL 10.5. beta 0.2 keeps
the drift smaller. Completions grow longer and end in eos less often as DPO moves away from
the reference. Ablations: --config.pref_loss="ipo(tau=1.0)" gained 0.55 std at KL 1.4 (an
earlier SFT model); "ipo(tau=0.1)" over-optimises (KL 22, gold reward below SFT).

KTO on the testbed's pairs split into unpaired rows (the command above; 32 rows a step, so half
the pairs of a DPO step), from the same default SFT model as DPO's measured 2026-11-29 on 2
shared CPU cores (DPO reproduced its numbers above there): "kto(beta=0.2)" gained 0.59 SFT std
at objective/kl 6.3 nats, "kto(beta=0.1)" 0.37 std at KL 10.5; 14 s of training. Its reference
point stayed at its clamp 0 (the mismatched completions' log-ratio is negative) and the
log-ratios of fresh desirable and undesirable rows both fell, to about -6, the desirable ones
less; eval/pref_accuracy (test rows on their side of z0) 0.54.
"""

from rlhf_jax import experiment, metrics as metrics_lib
from rlhf_jax.errors import ConfigError
from rlhf_jax.trainers import preference

SCHEMA = preference.SCHEMA
# What main prints when the stage ends: first and last logged values.
SUMMARY_KEYS = ("pref/loss", "eval/pref_accuracy", "eval/gold_agreement", "gold/ref_reward",
                "gold/reward", "objective/kl")


def get_config(size: str = "default"):
    config = preference.default_config()
    config.size = size
    if size == "smoke":
        config.data.update(n_train=256, n_test=32, batch_size=8)
        config.steps, config.log_every, config.save_every, config.eval_batches = 4, 1, 2, 1
        config.optim.warmup_steps = 0  # so that the very first step moves the policy
        config.gen.update(n_prompts=16, batch_size=16, max_new_tokens=8)
    elif size != "default":
        raise ConfigError(f"size={size!r}; choose 'default' or 'smoke'")
    return config


def main(config, workdir):
    stage_dir = preference.train(config, workdir)
    metrics_lib.print_summary(stage_dir, SUMMARY_KEYS, title=config.stage)
    return stage_dir


if __name__ == "__main__":
    experiment.run(get_config, main)
