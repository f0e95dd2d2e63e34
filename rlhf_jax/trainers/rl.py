"""On-policy RL from a reward: PPO, GRPO, RLOO and REINFORCE share this one trainer.

    stage_dir = rl.train(config, workdir)      # writes workdir/<config.stage>/ (default "ppo")

Each iteration:
  1. rollout   sample completions of a batch of prompts (G per prompt) with the KV-cache
               sampler; score them with the reward model (or the testbed's gold reward:
               "PPO-GT"); subtract a penalty from responses that never emit EOS;
  2. score     one forward pass each of the policy (old log-probs), the frozen reference
               (reference log-probs, once per batch) and, for GAE, the critic;
  3. rewards   KL to the reference as a per-token shaped reward (Ziegler et al. 2019) or as a
               loss term (GRPO, Shao et al. 2024), by config; optional reward clipping and
               whitening;
  4. advantage by `config.advantage` from the registry: gae (critic), grpo, dr_grpo, rloo,
               reinforce, best_of_n (selection weights: rejection-sampling fine-tuning);
  5. update    `config.policy_loss` (ppo_clip by default) plus the value loss, over
               ppo.epochs x ppo.minibatches inside one jit (lax.scan), donated state;
  6. KL controller update (fixed or adaptive, from the registry).

Algorithms are configs, not code paths: PPO = gae + ppo_clip + KL in the reward; GRPO = grpo +
ppo_clip + KL in the loss + G > 1; RLOO = rloo + reinforce + G > 1; rejection-sampling
fine-tuning (best-of-n completions fed back to SFT) = best_of_n + reinforce + G > 1, without
KL penalty or whitening (experiments/rsft.py).

With `config.lora` the policy and the critic train LoRA adapters (the critic's value head
whole) on frozen weights, and the reference is the policy with its adapters off: one copy of
the SFT weights (docs/model.md, "LoRA").
"""

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import advantages as adv_lib
from rlhf_jax import checkpoint, evaluation, kl as kl_lib, losses, model, registry, sampling
from rlhf_jax import rewards as rewards_lib, rollout as rollout_lib, schema, sharding
from rlhf_jax import metrics as metrics_lib
from rlhf_jax.aggregation import aggregate, denominator
from rlhf_jax.data import batching
from rlhf_jax.trainers import accumulate, common, fields


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stage = "ppo"
    c.init_from = ""             # the SFT stage directory ("" = WORKDIR/sft)
    c.reward_from = ""           # the reward-model stage directory ("" = WORKDIR/rm)
    c.reward = "model"           # "model" (r_phi) or "gold" (the testbed's r*: PPO-GT)
    c.lora = ""                  # LoRA adapters on the policy and the critic; "" = off
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules={}, distributed=False))
    # How to compute (memory, not architecture; docs/scaling.md): applied to every model loaded.
    c.model = ml_collections.ConfigDict(fields.RUNTIME_MODEL_DEFAULTS)
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", name="", data_dir="", format="plain", n_train=4_000, n_test=500, seed=0,
        buckets=(12,), max_prompt_len=11, packing=False))
    c.rollout = ml_collections.ConfigDict(dict(
        prompts_per_step=64, samples_per_prompt=1, max_new_tokens=24, temperature=1.0,
        mask_truncated=False, dynamic_sampling=False, max_draws=4))
    c.advantage = "gae(gamma=1.0, lam=0.95)"
    c.policy_loss = "ppo_clip(clip_eps=0.2)"
    c.loss_agg = "token_mean"
    c.kl = ml_collections.ConfigDict(dict(
        coef=0.05, estimator="k1", in_reward=True, controller="fixed"))
    c.value = ml_collections.ConfigDict(dict(coef=0.1, clip_eps=0.2))
    c.ppo = ml_collections.ConfigDict(dict(epochs=2, minibatches=2))
    c.missing_eos_penalty = 1.0  # subtracted from the score of a response without EOS
    c.reward_clip = 0.0          # clip scores to [-c, c]; 0 = off
    # Rescale the per-token rewards (score + KL penalty) of each rollout batch to unit std,
    # keeping their mean (advantages.whiten(shift_mean=False), TRL's whiten_rewards).
    c.whiten_rewards = False
    c.whiten_advantages = True
    c.entropy_coef = 0.0
    c.online_pref_loss = ""      # a pref_loss (e.g. "dpo(beta=0.1)"): online DPO; "" = off
    c.optim = common.optim_config(lr=3e-4, warmup_steps=5, schedule="constant")
    c.steps = 20
    c.micro_batches = 1          # per PPO minibatch (trainers/accumulate.py); 1 = off
    c.log_every = 5
    c.save_every = 20
    c.eval_every = 5
    c.eval_prompts = 256
    c.keep = 2
    return c


SCHEMA = {
    "size": fields.SIZE, "seed": fields.SEED,
    "stage": schema.Str(nonempty=True, doc="the stage directory under WORKDIR"),
    "init_from": schema.Str(doc="the SFT stage directory (policy init and reference); "
                                "'' = WORKDIR/sft"),
    "reward_from": schema.Str(doc="the reward-model stage directory; '' = WORKDIR/rm"),
    "lora": fields.LORA,
    "reward": rewards_lib.Expression(doc="what the policy optimises: 'model' (r_phi from "
                                         "reward_from), 'gold' (the testbed's r*), or a "
                                         "weighted sum of sources, e.g. 'model + "
                                         "0.1*length_penalty(target=20)' (docs/"
                                         "implementation_details.md)"),
    "mesh": fields.MESH,
    "model": fields.RUNTIME_MODEL,
    "data": fields.data(),
    "rollout": {
        "prompts_per_step": schema.Int(ge=1, doc="prompts sampled per iteration"),
        "samples_per_prompt": schema.Int(ge=1, doc="completions per prompt (the group G)"),
        "max_new_tokens": schema.Int(ge=1, doc="longest completion"),
        "temperature": schema.Float(gt=0, doc="sampling temperature of the rollouts"),
        "mask_truncated": schema.Bool(doc="no loss on completions cut at max_new_tokens "
                                          "(DAPO's overlong filtering; their rewards still "
                                          "enter the group statistics)"),
        "dynamic_sampling": schema.Bool(doc="DAPO: drop groups whose scores are all equal and "
                                            "refill the batch from further prompts"),
        "max_draws": schema.Int(ge=1, doc="prompt batches drawn per iteration at most with "
                                          "dynamic_sampling; groups still missing then are "
                                          "masked out of the loss"),
    },
    "advantage": schema.Spec("advantage"),
    "policy_loss": schema.Spec("policy_loss"),
    "loss_agg": schema.Spec("loss_agg"),
    "kl": {
        "coef": schema.Float(ge=0, doc="KL penalty coefficient (the controller's start)"),
        "estimator": schema.Spec("kl_estimator"),
        "in_reward": schema.Bool(doc="KL as a shaped per-token reward (true) or a loss term"),
        "controller": schema.Spec("kl_controller"),
    },
    "value": {
        "coef": schema.Float(ge=0, doc="weight of the value loss"),
        "clip_eps": schema.Float(gt=0, optional=True, doc="value clipping range; None = off"),
    },
    "ppo": {
        "epochs": schema.Int(ge=1, doc="passes over each rollout batch"),
        "minibatches": schema.Int(ge=1, doc="minibatches per pass; must divide the rollout"),
    },
    "missing_eos_penalty": schema.Float(ge=0, doc="subtracted from the score of a response "
                                                  "without EOS"),
    "reward_clip": schema.Float(ge=0, doc="clip scores to [-c, c]; 0 = off"),
    "whiten_rewards": schema.Bool(doc="rescale each batch's per-token rewards to unit std"),
    "whiten_advantages": schema.Bool(doc="normalise advantages per batch"),
    "entropy_coef": schema.Float(ge=0, doc="entropy bonus weight"),
    "online_pref_loss": schema.Field(
        "str", rule=lambda v: None if not v else _pref_loss_problem(v),
        doc="online DPO: a preference loss on the best and worst sample of each prompt by "
            "reward, in place of the policy loss; '' = off"),
    "optim": fields.OPTIM,
    **fields.loop(eval_every=True),
    "micro_batches": fields.MICRO_BATCHES,
    "eval_prompts": schema.Int(ge=1, doc="held-out prompts per evaluation (<= 256 or a "
                                         "multiple of 256)"),
}


def _pref_loss_problem(spec: str) -> str | None:
    try:
        registry.validate("pref_loss", spec)
    except ValueError as e:
        return str(e)
    return None


def validate(config) -> int:
    """The checks that need no files or devices (the pipeline runs them all before training).
    Returns the rollout size (prompts_per_step x samples_per_prompt)."""
    schema.check(config, SCHEMA)
    r = config.rollout
    common.check_data(config.data, batch_size=r.prompts_per_step)
    common.refuse_packing(config, "by the RL trainer: its rows are prompts that generation "
                                  "extends in place, one per row")
    sources_used = rewards_lib.names(config.reward)
    common.require("model" in sources_used or not config.reward_from,
                   f"reward_from is not used with reward={config.reward!r}; leave it empty or "
                   "add the 'model' term to reward")
    provided = common.source(config.data).reward_inputs
    for term in rewards_lib.parse(config.reward):
        common.require(not registry.accepts(term.fn, "tables") or "tables" in provided,
                       f"the {term.name!r} reward reads the review testbed's gold tables, which "
                       f"data.source={config.data.source!r} does not have; use "
                       "data.source='synthetic', or another reward")
    n = r.prompts_per_step * r.samples_per_prompt
    common.require(n % config.ppo.minibatches == 0,
                   f"rollout size {n} (prompts_per_step x samples_per_prompt) is not divisible "
                   f"by ppo.minibatches={config.ppo.minibatches}")
    common.check_micro_batches(config, n // config.ppo.minibatches,
                               "the PPO minibatch (rollout size / ppo.minibatches)")
    common.require(config.micro_batches == 1 or not config.online_pref_loss,
                   "online_pref_loss pairs samples within each prompt's group across the "
                   "minibatch; set micro_batches=1")
    group_based = registry.accepts(registry.get("advantage", config.advantage), "group_size")
    common.require(not group_based or r.samples_per_prompt >= 2,
                   f"advantage {config.advantage!r} compares samples of the same prompt: set "
                   "rollout.samples_per_prompt >= 2")
    adv_name, adv_args = registry.parse(config.advantage)
    best_of_n = adv_name == "best_of_n"
    common.require(not best_of_n or adv_args.get("top", 1) < r.samples_per_prompt,
                   f"advantage {config.advantage!r} keeps top={adv_args.get('top', 1)} of "
                   f"rollout.samples_per_prompt={r.samples_per_prompt} samples, which selects "
                   "nothing: keep fewer than samples_per_prompt")
    common.require(not (best_of_n and config.whiten_advantages),
                   "advantage 'best_of_n' gives selection weights (1 = kept, 0 = dropped), "
                   "which whitening would turn into a baseline: set whiten_advantages=False")
    common.require(not (best_of_n and config.whiten_rewards),
                   "advantage 'best_of_n' keeps the completions with the highest sequence "
                   "return; whitening per-token rewards would rank them partly by length: set "
                   "whiten_rewards=False")
    common.require(registry.parse(config.policy_loss)[0] != "reinforce"
                   or config.ppo.epochs * config.ppo.minibatches == 1,
                   f"policy_loss 'reinforce' has no importance ratio, so each update needs fresh "
                   f"samples, but ppo.epochs={config.ppo.epochs} x ppo.minibatches="
                   f"{config.ppo.minibatches} would reuse them: set both to 1, or use "
                   "policy_loss='ppo_clip' to reuse samples")
    common.require(not config.online_pref_loss or (
        r.samples_per_prompt >= 2 and config.ppo.minibatches == 1),
        "online_pref_loss pairs the best and worst sample of each prompt: set "
        "rollout.samples_per_prompt >= 2 and ppo.minibatches=1 (a minibatch keeps whole "
        "groups)")
    remax = registry.accepts(registry.get("advantage", config.advantage), "baseline")
    common.require(not (remax and (r.dynamic_sampling or config.whiten_rewards)),
                   f"advantage {config.advantage!r} takes a greedy rollout of the same prompts "
                   "as its baseline; it does not combine with rollout.dynamic_sampling or "
                   "whiten_rewards")
    common.require(registry.parse(config.kl.controller)[0] != "adaptive" or config.kl.coef > 0,
                   "kl.controller 'adaptive' scales kl.coef multiplicatively, so from "
                   "kl.coef=0 it stays 0: start from a positive kl.coef")
    common.require(config.eval_prompts <= 256 or config.eval_prompts % 256 == 0,
                   f"eval_prompts={config.eval_prompts}: evaluation reads batches of 256 "
                   "prompts; use a number <= 256 or a multiple of 256")
    return n


# Reward terms logged under the names the rest of the pipeline reads.
_METRIC_NAMES = {"model": "rm/score", "gold": "gold/reward"}


def reward_metrics(rollout: dict) -> dict:
    """Batch means of each reward term of a rollout: rm/score (the reward model), gold/reward
    (the testbed), reward/<name> for the others."""
    return {_METRIC_NAMES.get(k.split("/", 1)[1], k): jnp.mean(v) for k, v in rollout.items()
            if k.startswith("reward/")}


def logp_gap(rollout: dict) -> dict:
    """|sampler log-prob - recomputed log-prob| over completion tokens (max and mean): how far
    the rollout engine and the training forward disagree about the tokens they share (here
    both are this model, in one process: float error; with a separate inference engine it is
    the mismatch that biases the importance ratio). RL samples the full tempered distribution
    (no top-k / top-p), so both log-probs are of one support."""
    mask = rollout["completion_mask"] > 0
    gap = jnp.where(mask, jnp.abs(rollout["sample_logps"] - rollout["logps"]), 0.0)
    return {"rollout/logp_gap_max": jnp.max(gap),
            "rollout/logp_gap_mean": jnp.sum(gap) / jnp.maximum(jnp.sum(mask), 1)}


def dynamic_sample(draw, key, *, group: int, n_groups: int, max_draws: int,
                   penalty: float) -> tuple[dict, dict]:
    """DAPO's dynamic sampling (Yu et al. 2025, sec. 3.2): rollouts of further prompt batches
    until `n_groups` groups have scores that are not all equal, at most `max_draws` batches.

    A group whose samples all score the same (every answer right, or every one wrong) has zero
    group-normalised advantage: it spends a batch slot on no gradient. Kept groups fill the
    batch in the order drawn; if the cap leaves slots empty they are filled with dropped groups
    whose rows get trainable = 0 (masked out of the loss), so a zero-variance group is never
    trained on. draw(key) -> rollout of one prompt batch; the i-th draw uses fold_in(key, i),
    and the prompts come from the checkpointed iterator, so a resumed run draws the same.
    Metrics: rollout/draws (batches drawn) and rollout/kept_group_frac (of groups drawn).
    """
    kept, dropped, drawn = [], [], 0
    while len(kept) < n_groups and drawn < max_draws:
        r = draw(jax.random.fold_in(key, drawn))
        drawn += 1
        # The score the policy optimises, before KL shaping (the reward and the EOS penalty).
        got = sharding.device_get({"reward": r["reward"], "eos": r["eos"]})
        scores = got["reward"] - penalty * (~got["eos"]).astype(np.float32)
        by_group = scores.reshape(-1, group)
        varied = np.max(by_group, axis=1) > np.min(by_group, axis=1)
        for g in range(by_group.shape[0]):
            (kept if varied[g] else dropped).append((r, g))
    total = drawn * n_groups
    n_kept = min(len(kept), n_groups)
    chosen = kept[:n_groups] + dropped[:n_groups - n_kept]
    trainable = np.repeat(np.arange(n_groups) < n_kept, group).astype(np.int32)
    keys = [k for k, v in chosen[0][0].items() if hasattr(v, "shape") and v.ndim >= 1]
    out = {k: jnp.concatenate([r[k][g * group:(g + 1) * group] for r, g in chosen])
           for k in keys}
    out["trainable"] = jnp.asarray(trainable)
    metrics = {"rollout/draws": float(drawn), "rollout/kept_group_frac": len(kept) / total}
    return out, metrics


@common.stage
def train(config, workdir) -> Path:
    workdir = Path(workdir)
    stage_dir = workdir / config.stage
    n_rollout = validate(config)
    r = config.rollout
    group = r.samples_per_prompt

    # --- mesh, models -----------------------------------------------------------------------
    mesh, rules = common.setup_mesh(config, n_rollout, n_rollout // config.ppo.minibatches)
    sft_dir = config.init_from or str(workdir / "sft")
    runtime = common.runtime(config)
    graphdef, ref_params, model_cfg, tok, sft_meta = common.load_stage(
        sft_dir, mesh=mesh, rules=rules, runtime=runtime)
    # The reference and the reward model: a resumption must start from the same checkpoints.
    sources = {"init_from": sft_meta["source"], "reward_from": None}
    # With lora the policy is the SFT weights plus adapters and the reference is that model
    # with its adapters off (`model.adapters_off`, set below): one copy of the weights.
    if config.lora:
        graphdef, policy_params, model_cfg = common.add_adapters(
            graphdef, ref_params, model_cfg, config, kind="policy", mesh=mesh, rules=rules,
            seed=config.seed)
        # Until the state is final (after a resumption, below), the reference under the new
        # graphdef is this policy with its adapters off.
        ref_params = model.adapters_off(policy_params)
    else:
        policy_params = jax.tree.map(jnp.copy, ref_params)
    adv_fn = registry.get("advantage", config.advantage)
    online_fn = (registry.get("pref_loss", config.online_pref_loss)
                 if config.online_pref_loss else None)
    # Online DPO replaces the policy loss, so the advantage (and a critic) go unused.
    uses_critic = registry.accepts(adv_fn, "values") and online_fn is None
    uses_greedy = registry.accepts(adv_fn, "baseline")   # ReMax: a greedy rollout per prompt
    terms = rewards_lib.parse(config.reward)
    reward = None
    if "model" in rewards_lib.names(config.reward):
        rm_dir = config.reward_from or str(workdir / "rm")
        reward = common.load_stage(rm_dir, kind="reward", mesh=mesh, rules=rules,
                                   key="reward_from", runtime=runtime)
        sources["reward_from"] = reward[4]["source"]
        common.require(reward[3].same_ids(tok),
                       f"reward_from={rm_dir!r} uses another tokenizer than the policy "
                       f"({sft_dir!r}); the reward model scores the policy's tokens directly, "
                       "so both must come from the same tokenizer")
    if uses_critic:
        # The critic starts from the reward model (Ziegler et al. 2019; Ouyang et al. 2022), or
        # from the SFT policy when optimising the gold reward, with a zero value head, so early
        # values are 0 and advantages are the returns.
        if reward is not None:
            value_graphdef, value_params = common.value_from_reward(
                reward, mesh=mesh, rules=rules, seed=config.seed)
        else:
            value_graphdef, value_params = common.load_stage(
                sft_dir, kind="value", mesh=mesh, rules=rules, seed=config.seed,
                new_head=True, runtime=runtime)[:2]
        # With lora the critic gets adapters too; its value head trains whole.
        critic_cfg = reward[2] if reward is not None else model_cfg.without_adapters()
        value_graphdef, value_params, _ = common.add_adapters(
            value_graphdef, value_params, critic_cfg, config, kind="value", mesh=mesh,
            rules=rules, seed=config.seed)
    else:
        value_graphdef, value_params = None, {}
    gold = common.gold(config.data, tok)
    common.require("gold" not in rewards_lib.names(config.reward) or gold is not None,
                   "reward='gold' scores the testbed's own token ids, and this policy "
                   f"({config.init_from or 'WORKDIR/sft'}) uses another tokenizer; use "
                   "reward='model' with reward_from, or start from a testbed SFT stage")
    # The data's gold reward (the testbed's r*, a task's exact match) is logged beside
    # whatever the policy optimises.
    monitor = rewards_lib.parse(gold.expr) if gold is not None else ()
    score_params = {"ref": ref_params}
    if gold is not None:
        score_params.update({k: jax.tree.map(jnp.asarray, v) for k, v in gold.inputs.items()})
    # Fields of the prompt records the rewards read (a verifier's answer) ride with the batches.
    text_fields = rewards_lib.record_fields(terms + tuple(monitor))
    if reward is not None:
        score_params["reward"] = reward[1]
    p_len = max(config.data.buckets)
    common.require(p_len + r.max_new_tokens <= model_cfg.max_len,
                   f"prompt bucket {p_len} + rollout.max_new_tokens {r.max_new_tokens} exceeds "
                   f"the model's max_len {model_cfg.max_len}")

    # With micro-batches, the rollout is scored in chunks of the micro-batch size too.
    score_chunks = config.ppo.minibatches * config.micro_batches if config.micro_batches > 1 \
        else 1

    # --- data ----------------------------------------------------------------------------------
    prompt_it = batching.make_iterator(
        common.data_source(config.data, "prompts", "train", workdir), kind="prompts",
        tokenizer=tok, config=common.batch_config(config.data, batch_size=r.prompts_per_step,
                                                  seed=config.seed), name="prompts/train",
        format=config.data.format, text_fields=text_fields)

    # --- losses from the registry ---------------------------------------------------------------
    policy_loss_fn = registry.get("policy_loss", config.policy_loss)
    controller = registry.get("kl_controller", config.kl.controller)
    kl_estimator = config.kl.estimator

    # --- targets: scores, per-token rewards, advantages, returns of a scored rollout ----------
    def shaped_rewards(rollout, m, kl_coef):
        """(scores [N], per-token rewards [N, L]) of a scored rollout."""
        scores = rollout["reward"] - config.missing_eos_penalty * (
            ~rollout["eos"]).astype(jnp.float32)
        if config.reward_clip:
            scores = jnp.clip(scores, -config.reward_clip, config.reward_clip)
        # KL as a shaped reward, or (kl.in_reward=False) only the score, the KL going to the loss.
        rewards = adv_lib.kl_shaped_rewards(
            scores=scores, logps=rollout["logps"], ref_logps=rollout["ref_logps"],
            mask=m, kl_coef=kl_coef if config.kl.in_reward else 0.0, estimator=kl_estimator)
        return scores, rewards

    def make_targets(rollout, completion_mask, kl_coef, greedy=None):
        """(advantages, returns, scores) of a rollout from `rollout.sample_and_score`; greedy:
        the greedy rollout of the same prompts, whose returns are ReMax's baseline."""
        m = completion_mask
        scores, rewards = shaped_rewards(rollout, m, kl_coef)
        if config.whiten_rewards:
            rewards = adv_lib.whiten(rewards, m, shift_mean=False)
        baseline = None
        if greedy is not None:
            _, greedy_rewards = shaped_rewards(greedy, greedy["completion_mask"], kl_coef)
            baseline = jnp.repeat(jnp.sum(greedy_rewards, axis=1), group)
        advantages, returns = registry.call(adv_fn, rewards=rewards, mask=m,
                                            values=rollout.get("values"), group_size=group,
                                            baseline=baseline)
        if config.whiten_advantages:
            advantages = adv_lib.whiten(advantages, m)
        return advantages, returns, scores

    make_targets = jax.jit(make_targets)

    # --- update: epochs x minibatches in one jit --------------------------------------------
    optimizer = common.make_optimizer(config.optim, config.steps * config.ppo.epochs
                                      * config.ppo.minibatches, lora=bool(config.lora))
    params = {"policy": policy_params, "value": value_params}
    opt_state = optimizer.init(params)   # eager: the moments keep the params' sharding

    def online_pref_loss(logps, mb):
        """Online DPO (Guo et al. 2024): each prompt's best and worst sample by score form a
        pair, scored by a preference loss under the sampling policy's reference; groups whose
        scores are all equal give no pair (weight 0)."""
        m = mb["completion_mask"]
        seq = jnp.sum(logps, axis=1).reshape(-1, group)
        ref = jnp.sum(jnp.where(m > 0, mb["ref_logps"], 0.0), axis=1).reshape(-1, group)
        lengths = jnp.sum(m, axis=1).astype(jnp.float32).reshape(-1, group)
        scores = mb["scores"].reshape(-1, group)
        best, worst = jnp.argmax(scores, axis=1), jnp.argmin(scores, axis=1)

        def pick(x, i):
            return jnp.take_along_axis(x, i[:, None], axis=1)[:, 0]
        chosen_len = pick(lengths, best)
        return registry.call(
            online_fn, policy_chosen_logps=pick(seq, best), policy_rejected_logps=pick(seq, worst),
            ref_chosen_logps=pick(ref, best), ref_rejected_logps=pick(ref, worst),
            chosen_lengths=chosen_len, rejected_lengths=pick(lengths, worst),
            chosen_nll=-pick(seq, best) / jnp.maximum(chosen_len, 1.0),
            weights=(jnp.max(scores, axis=1) > jnp.min(scores, axis=1)).astype(jnp.float32))

    def loss_fn(params, mb, kl_coef):
        m = mb["completion_mask"]
        logps, entropy = model.target_logprobs(
            graphdef, params["policy"], mb["seq"], mb["completion"], m, mask_bt=mb["seq_mask"],
            temperature=r.temperature, with_entropy=online_fn is None)
        if online_fn is not None:
            loss, metrics = online_pref_loss(logps, mb)
            return loss, {**metrics, "train/loss": loss}
        loss, metrics = registry.call(policy_loss_fn, logps=logps, old_logps=mb["logps"],
                                      advantages=mb["advantages"], mask=m, agg=config.loss_agg)
        ent = aggregate(entropy, m, config.loss_agg)
        metrics["policy/entropy"] = ent
        loss = loss - config.entropy_coef * ent
        if not config.kl.in_reward:
            kl_t = kl_lib.estimate(logps=logps, ref_logps=mb["ref_logps"], kind=kl_estimator,
                                   mask=m)
            kl_loss = aggregate(kl_t, m, config.loss_agg)
            loss = loss + kl_coef * kl_loss
            metrics["objective/kl_loss"] = kl_loss
        if uses_critic:
            values = model.apply_value(value_graphdef, params["value"], mb["seq"],
                                       mask_bt=mb["seq_mask"])[:, p_len - 1:-1]
            vloss, vmetrics = losses.value_loss(values=values, old_values=mb["values"],
                                                returns=mb["returns"], mask=m,
                                                clip_eps=config.value.clip_eps,
                                                agg=config.loss_agg)
            loss = loss + config.value.coef * vloss
            metrics.update(vmetrics)
        metrics["train/loss"] = loss
        return loss, metrics

    def micro_grads(params, mb, kl_coef):
        """A minibatch's loss, metrics and gradient from micro-batches (accumulate.py). Every
        term of the loss aggregates the same mask the same way (config.loss_agg), so a
        micro-batch's loss times (its denominator / the minibatch's) is its share; metrics are
        weighted the same way (a max, such as ppo/ratio_max, becomes a weighted mean)."""
        den = denominator(mb["completion_mask"], config.loss_agg)

        def share(params, micro, kl_coef):
            loss, m = loss_fn(params, micro, kl_coef)
            own = denominator(micro["completion_mask"], config.loss_agg)
            w = jnp.where(den > 0, own / jnp.where(den > 0, den, 1.0), 0.0)
            return loss * w, jax.tree.map(lambda v: v * w, m)

        rows = mb["completion_mask"].shape[0]
        return accumulate.grads(share, params, accumulate.split(mb, config.micro_batches, rows),
                                kl_coef)

    def update(params, opt_state, guard, batch, rng, kl_coef, step):
        e, k = config.ppo.epochs, config.ppo.minibatches
        perms = jax.vmap(lambda key: jax.random.permutation(key, n_rollout))(
            jax.random.split(rng, e))
        if online_fn is not None:       # whole groups, in order: the pairs are formed in them
            perms = jnp.tile(jnp.arange(n_rollout), (e, 1))
        order = perms.reshape(e * k, n_rollout // k)

        def one(carry, idx):
            params, opt_state, guard = carry
            # The gathered minibatch is split over the batch axes like the rollout; unplaced,
            # every device would gather and compute all of it.
            mb = jax.tree.map(lambda x: x[idx], batch)
            mb = jax.lax.with_sharding_constraint(mb, sharding.batch_shardings(mb, mesh, rules))
            if config.micro_batches == 1:
                (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb,
                                                                             kl_coef)
            else:
                (loss, m), grads = micro_grads(params, mb, kl_coef)
            params, opt_state, guard, grad_norm = common.guarded_apply(
                optimizer, params, opt_state, grads, loss, guard, step)
            return (params, opt_state, guard), {**m, "train/grad_norm": grad_norm}

        (params, opt_state, guard), ms = jax.lax.scan(one, (params, opt_state, guard), order)
        return params, opt_state, guard, jax.tree.map(jnp.mean, ms)

    update = common.jit_update(update)

    # --- checkpoint: resume ------------------------------------------------------------------------
    # Replicated on the mesh, so that a key restored onto it is too (a key on one device
    # would not combine with the mesh in the first rollout after a resume). Made by a jit with
    # that output sharding: device_put cannot move a key onto devices of other processes.
    rng = jax.jit(lambda: jax.random.key(config.seed), out_shardings=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))()
    kl_state = kl_lib.init_controller(config.kl.coef)
    guard = common.init_guard()
    ckpt = checkpoint.Checkpointer(stage_dir, max_to_keep=config.keep,
                                   save_interval_steps=config.save_every)
    policy, train_state, step = common.resume(
        ckpt, params["policy"],
        {"opt": opt_state, "rng": rng, "kl": kl_state, "value": params["value"]}, prompt_it,
        config, sources=sources)
    params = {"policy": policy, "value": train_state["value"]}
    opt_state, rng, kl_state = train_state["opt"], train_state["rng"], train_state["kl"]

    def save(step, force=False):
        meta = common.stage_meta(config=config, model_cfg=model_cfg, tok=tok, sources=sources,
                                 extra={"data_state": prompt_it.get_state(),
                                        "model_kind": "policy"})
        # The policy is what later stages and evaluation load; the critic stays in `train`.
        common.save_checkpoint(
            ckpt, step, params=params["policy"],
            train={"opt": opt_state, "rng": rng, "kl": kl_state, "value": params["value"]},
            meta=meta, force=force)

    params, opt_state, guard, kl_state, rng = common.on_mesh(
        (params, opt_state, guard, kl_state, rng), mesh)
    if config.lora:
        ref_params = model.adapters_off(params["policy"])   # the frozen base arrays
        score_params["ref"] = ref_params

    # --- eval -----------------------------------------------------------------------------------
    evaluator = None
    if config.eval_every:
        test_it = batching.make_iterator(
            common.data_source(config.data, "prompts", "test", workdir), kind="prompts",
            tokenizer=tok, config=common.batch_config(
                config.data, batch_size=min(config.eval_prompts, 256), seed=config.seed,
                shuffle=False), name="prompts/test", format=config.data.format,
            text_fields=rewards_lib.record_fields(monitor))
        eval_prompts = [next(test_it) for _ in range(max(1, config.eval_prompts // 256))]
        evaluator = evaluation.Evaluator(
            graphdef=graphdef, ref_params=ref_params, prompts=eval_prompts,
            max_new_tokens=r.max_new_tokens, eos_id=tok.stop_ids, pad_id=tok.pad_id,
            reward=None if reward is None else reward[:2], gold=gold, tokenizer=tok,
            temperature=r.temperature, max_rows=n_rollout,  # the rollouts' compiled sampler
            place=lambda b: common.place_batch(b, mesh, rules))

    # --- loop -----------------------------------------------------------------------------------
    writer = metrics_lib.MetricsWriter(stage_dir)
    values = None
    bar = metrics_lib.progress(total=config.steps, initial=step, desc=config.stage)
    eval_key = jax.random.key(config.seed + 1)
    if evaluator is not None and step == 0:
        writer.write(0, {f"eval/{k}": v for k, v in evaluator.policy_metrics(
            params["policy"], eval_key).items()})
    while step < config.steps:
        t0 = time.perf_counter()
        rng, k_sample, k_update = jax.random.split(rng, 3)
        score_params.update(policy=params["policy"])
        if uses_critic:
            score_params["value"] = params["value"]

        def draw(key):
            batch = next(prompt_it)
            if uses_greedy:
                greedy_rollouts.append(greedy_rollout(batch, key))
            placed = common.place_batch({k: np.repeat(batch[k], group, axis=0)
                                         for k in ("tokens", "mask")}, mesh, rules)
            fields = {k: np.repeat(batch[k], group) for k in text_fields}
            # Old log-probs are recomputed by a training-layout forward, so the first ratio of
            # the update is exactly 1 (the sampler's agree to ~1e-6: rollout/logp_gap_*).
            return rollout_lib.sample_and_score(
                graphdef=graphdef, terms=terms, monitor=monitor, params=score_params,
                prompt=placed["tokens"], prompt_mask=placed["mask"], rng=key,
                max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                stop_ids=tok.stop_ids, pad_id=tok.pad_id, tokenizer=tok, recompute=True,
                value_graphdef=value_graphdef if uses_critic else None,
                reward_graphdef=None if reward is None else reward[0], fields=fields,
                chunks=score_chunks)

        def greedy_rollout(batch, key):
            """Each prompt's greedy completion, scored like the samples (ReMax's baseline)."""
            placed = common.place_batch({k: batch[k] for k in ("tokens", "mask")}, mesh, rules)
            completion, completion_mask, logps = sampling.generate(
                (graphdef, params["policy"]), placed["tokens"], placed["mask"], key,
                max_new_tokens=r.max_new_tokens, temperature=0.0, eos_id=tok.stop_ids,
                pad_id=tok.pad_id)
            return rollout_lib.score(
                graphdef=graphdef, terms=terms, params=score_params, prompt=placed["tokens"],
                prompt_mask=placed["mask"], completion=completion,
                completion_mask=completion_mask, sample_logps=logps,
                temperature=r.temperature, stop_ids=tok.stop_ids, tokenizer=tok,
                recompute=True, reward_graphdef=None if reward is None else reward[0],
                fields={k: batch[k] for k in text_fields})

        greedy_rollouts = []
        if r.dynamic_sampling:
            rollout, sampling_metrics = dynamic_sample(draw, k_sample, group=group,
                                                       n_groups=r.prompts_per_step,
                                                       max_draws=r.max_draws,
                                                       penalty=config.missing_eos_penalty)
        else:
            rollout, sampling_metrics = draw(k_sample), {}
        completion, completion_mask = rollout["completion"], rollout["completion_mask"]
        greedy = greedy_rollouts[0] if greedy_rollouts else None
        if greedy is not None:
            greedy = {k: greedy[k] for k in ("reward", "eos", "logps", "ref_logps",
                                             "completion_mask")}
            sampling_metrics["rollout/greedy_reward"] = jnp.mean(greedy["reward"])
        advantages, returns, scores = make_targets(rollout, completion_mask, kl_state.kl_coef,
                                                   greedy)
        # DAPO's overlong filtering (Yu et al. 2025, sec. 3.4): a completion the sampler cut
        # at max_new_tokens (no stop id) takes no part in the loss; it still shaped its
        # group's advantages above.
        loss_mask = (completion_mask * rollout["eos"][:, None].astype(jnp.int32)
                     if r.mask_truncated else completion_mask)
        if "trainable" in rollout:    # dynamic sampling could not fill every group
            loss_mask = loss_mask * rollout["trainable"][:, None]
        train_batch = {"seq": rollout["seq"], "seq_mask": rollout["seq_mask"],
                       "completion": completion, "completion_mask": loss_mask,
                       "logps": rollout["logps"], "ref_logps": rollout["ref_logps"],
                       "advantages": advantages, "returns": returns, "scores": scores}
        if uses_critic:
            train_batch["values"] = rollout["values"]
        log_now = (step + 1) % config.log_every == 0 or step + 1 == config.steps
        if log_now:
            jax.block_until_ready(train_batch)
        t1 = time.perf_counter()
        params, opt_state, guard, m = update(params, opt_state, guard, train_batch, k_update,
                                             kl_state.kl_coef, jnp.int32(step))
        seq_kl = rollout["kl"]
        m.update({"objective/kl": jnp.mean(seq_kl),
                  "objective/kl_k3": jnp.mean(rollout["kl_k3"]),
                  "objective/kl_coef": kl_state.kl_coef,
                  "objective/scores": jnp.mean(scores),
                  "response/length": jnp.mean(jnp.sum(completion_mask, axis=1)),
                  "response/eos_rate": jnp.mean(rollout["eos"])})
        m.update(reward_metrics(rollout))
        m.update(logp_gap(rollout))
        m.update(sampling_metrics)
        if r.mask_truncated:
            m["rollout/loss_token_frac"] = jnp.sum(loss_mask) / jnp.maximum(
                jnp.sum(completion_mask), 1)
        kl_state = controller(kl_state, kl=jnp.mean(seq_kl), n_steps=n_rollout)
        step += 1
        if log_now:
            values = jax.device_get(m)
            t2 = time.perf_counter()
            tokens = float(np.sum(sharding.device_get(completion_mask)))
            if "time/reward_host_s" in rollout:
                values["time/reward_host_s"] = rollout["time/reward_host_s"]
            values.update({"time/rollout_s": t1 - t0, "time/update_s": t2 - t1,
                           "time/tokens_per_s": tokens / max(t2 - t0, 1e-9)})
            values = writer.write(step, values)
            common.raise_if_bad(guard, values)
            bar.set_postfix(metrics_lib.format_postfix(
                values, ["objective/scores", "objective/kl", "gold/reward"]))
        if evaluator is not None and (step % config.eval_every == 0 or step == config.steps):
            writer.write(step, {f"eval/{k}": v for k, v in evaluator.policy_metrics(
                params["policy"], eval_key).items()})
        if step % config.save_every == 0 or step == config.steps:
            common.raise_if_bad(guard, values)
            save(step, force=step == config.steps)
        bar.update(1)
    bar.close()
    common.raise_if_bad(guard, values)
    writer.close()
    ckpt.close()
    return stage_dir
