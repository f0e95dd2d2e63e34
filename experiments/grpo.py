"""GRPO on the synthetic testbed: G samples per prompt, group-normalised sequence rewards as the
advantage (no critic), the clipped surrogate, and KL to the SFT reference as a k3 loss term
(Shao et al. 2024). Variants are config strings:

    python -m experiments.grpo --workdir runs/pipe                       # GRPO, RM reward
    python -m experiments.grpo --workdir runs/pipe --config.advantage=dr_grpo \
        --config.loss_agg="seq_mean_token_sum_norm(norm=24)" --config.stage=dr_grpo
    python -m experiments.grpo --workdir runs/pipe --config.advantage=rloo \
        --config.policy_loss=reinforce --config.ppo.epochs=1 \
        --config.ppo.minibatches=1 --config.stage=rloo                    # RLOO (on-policy)
    python -m experiments.grpo --workdir runs/pipe --config.reward=gold  # on the gold reward

Reads WORKDIR/sft (and WORKDIR/rm unless reward=gold); writes WORKDIR/grpo/ like
experiments.ppo. Expected at the default size (20 iterations of 16 prompts x 4 samples, k3 KL
loss with coefficient 0.05; measured 2026-11-23 after the default quickstart's SFT and reward
model, 20 s on 2 CPU cores): eval/gold/reward 0.57 -> 2.08 at eval/objective/kl 3.0 nats,
RM score -0.03 -> 1.07; along the way gold 1.00 / 1.20 / 1.42 at KL 0.53 / 1.35 / 2.43 after
5 / 10 / 15 iterations.
"""

from experiments import ppo
from rlhf_jax import experiment

SCHEMA = ppo.SCHEMA


def get_config(size: str = "default"):
    config = ppo.get_config(size)
    config.stage = "grpo"
    config.advantage = "grpo"
    config.loss_agg = "seq_mean_token_mean"
    config.kl.update(in_reward=False, estimator="k3", coef=0.05)
    config.whiten_advantages = False  # the group normalisation is the scaling
    if size == "smoke":
        config.rollout.update(prompts_per_step=4, samples_per_prompt=4)
    else:
        config.rollout.update(prompts_per_step=16, samples_per_prompt=4)
    return config


main = ppo.main

if __name__ == "__main__":
    experiment.run(get_config, main)
