"""Rejection-sampling fine-tuning on the synthetic testbed: sample G completions per prompt
from the current policy, keep the best by reward-model score, and take SFT steps on the kept
ones (RAFT, Dong et al. 2023; the rejection-sampling stage of Llama 2, Touvron et al. 2023).

    python -m experiments.sft --workdir runs/pipe
    python -m experiments.reward --workdir runs/pipe
    python -m experiments.rsft --workdir runs/pipe                  # reads runs/pipe/{sft,rm}
    python -m experiments.rsft --workdir runs/pipe --config.advantage="best_of_n(top=2)"

It is the RL trainer with the `best_of_n` advantage (weight 1 on the best of each group, 0
elsewhere) and the `reinforce` loss (-log pi on the kept tokens: the SFT loss), no KL penalty
and no whitening; KL to the SFT reference and the gold reward are still measured. Writes
WORKDIR/rsft/ like experiments.ppo.

Expected at the default size (G = 8 samples for each of 16 prompts per iteration, best of 8
kept), measured 2026-11-23 from an earlier default SFT and reward model over 40 iterations:
at lr 5e-4 eval/gold/reward 0.55 -> 2.21 at eval/objective/kl 4.2 nats (~70 s on 2 CPU
cores, before the data pipeline was made ~5x cheaper); lr 2e-4 moves slowly (1.17 at KL 0.9);
lr 1e-3 over-optimises the reward model (RM score 2.5, KL 149, gold -15).
"""

from experiments import ppo
from rlhf_jax import experiment

SCHEMA = ppo.SCHEMA


def get_config(size: str = "default"):
    config = ppo.get_config(size)
    config.stage = "rsft"
    config.advantage = "best_of_n"
    config.policy_loss = "reinforce"
    config.loss_agg = "token_mean"
    config.kl.update(coef=0.0, in_reward=True)
    config.whiten_advantages = False   # the weights are a selection, not a baseline
    config.ppo.update(epochs=1, minibatches=1)
    config.optim.lr = 5e-4
    if size == "smoke":
        config.rollout.update(prompts_per_step=4, samples_per_prompt=4)
    else:
        config.rollout.update(prompts_per_step=16, samples_per_prompt=8)
        config.steps = 40
    return config


main = ppo.main

if __name__ == "__main__":
    experiment.run(get_config, main)
