"""GRPO on the synthetic testbed: G samples per prompt, group-normalised sequence rewards as the
advantage (no critic), the clipped surrogate, and KL to the SFT reference as a k3 loss term
(Shao et al. 2024). Variants are config strings:

    python -m experiments.grpo --workdir runs/pipe                       # GRPO, RM reward
    python -m experiments.grpo --workdir runs/pipe --config.advantage=dr_grpo \
        --config.loss_agg="seq_mean_token_sum_norm(norm=24)" --config.stage=dr_grpo
    python -m experiments.grpo --workdir runs/pipe --config.advantage=rloo \
        --config.policy_loss=reinforce --config.stage=rloo               # RLOO
    python -m experiments.grpo --workdir runs/pipe --config.reward=gold  # on the gold reward

Reads WORKDIR/sft (and WORKDIR/rm unless reward=gold); writes WORKDIR/grpo/ like
experiments.ppo. Expected: eval/gold/reward rises above the SFT value at step 0.
"""

from experiments import ppo
from rlhf_jax import experiment


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
