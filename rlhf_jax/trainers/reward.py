"""Reward-model stage: the SFT model plus a scalar head, fit to preference pairs, then normalised.

    stage_dir = reward.train(config, workdir)     # writes workdir/rm/, returns it
    reward.results(stage_dir)                     # the normalisation and evaluation numbers

Where it starts. `config.init_from` names the SFT stage directory; empty means WORKDIR/sft, the
directory `sft.train` writes in the same workdir. The backbone is copied from that policy and a
fresh scalar head is added (`common.load_stage(..., kind="reward", new_head=True)`; Ouyang et
al. 2022 sec. 3.5, Ziegler et al. 2019 sec. 2.2: the reward model starts from the supervised
policy). With `config.lora` the backbone is frozen and trains LoRA adapters, the head whole
(docs/model.md, "LoRA").

What it trains. `config.loss` is a "reward_loss" registry spec: "bradley_terry" (default) or
"bradley_terry(margin=0.5)" for a fixed margin m in -log sigmoid(r+ - r- - m). The pairs batch
holds the B chosen rows then the B rejected rows ([2B, T]), so both are scored in one forward
pass. One epoch over the training pairs by default: steps = epochs * n_train // batch_size
unless `config.steps` is set. A K-wise loss (one taking `rewards` [B, K], i.e.
loss="plackett_luce") trains on the testbed's "rankings" lists instead (data.n_train lists of
K = 4 responses, best first; `rankings_iterator`), all K * B rows again in one forward pass;
its evaluation still uses the test split of the pairs, so the numbers compare across losses.
With data.packing=true (pairwise losses) the training pairs are packed into rows and each
sequence's reward is read at its own last token (docs/data.md, "Sequence packing").

After training: reward normalisation. A Bradley–Terry model is defined up to an additive
constant and, with early stopping, an arbitrary scale, so a KL coefficient tuned against one
reward model would mean something else against the next. As in Ziegler et al. 2019 (sec. 2.2,
"we normalise the reward model to have mean 0 and variance 1 on samples from the initial
policy"; lm-human-preferences `reward_gain`/`reward_bias`), we sample completions of training
prompts from the SFT policy, score them, and fold r' = gain * r + bias with gain = 1 / std and
bias = -mean / std into the head: kernel <- gain * kernel, head bias <- gain * head bias + bias.
Folding (instead of two extra variables) keeps the checkpoint an ordinary RewardModel that any
later stage loads with `common.load_stage(rm_dir, kind="reward")`.

Evaluation, on the test split of the pairs: `rm/eval_accuracy` (agreement with the labels,
which carry Bradley–Terry noise) and, when the pairs carry gold rewards (the testbed),
`rm/eval_gold_accuracy` (agreement with the gold ordering, pairs with equal gold reward left
out) and `rm/eval_gold_accuracy_far` (only pairs whose gold rewards differ by more than one
standard deviation of the gold reward over the SFT samples drawn for the normalisation). An RM
tie counts as half right.

Checkpoints and resume. Training checkpoints are written every `save_every` steps; re-running
resumes from the latest one exactly like SFT. The final checkpoint (step = steps) is written
only after normalisation and evaluation, holds the normalised parameters, and its meta carries
model_kind="reward", "normalization", "eval" and "score_probe" (the normalised scores of the
first 8 SFT samples, to check a hand-off); finding it, a re-run does nothing.
"""

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rlhf_jax import checkpoint, hf, metrics as metrics_lib, model, registry, schema, sharding
from rlhf_jax import rewards as rewards_lib, rollout
from rlhf_jax.data import batching, records
from rlhf_jax.trainers import accumulate, common, fields

STAGE = "rm"


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""            # the SFT stage directory; "" = WORKDIR/sft
    c.loss = "bradley_terry"    # a reward_loss registry spec, e.g. "bradley_terry(margin=0.5)"
    c.lora = ""                 # LoRA adapters on the backbone (the head trains whole); "" = off
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules={}, distributed=False))
    # How to compute (memory, not architecture; docs/scaling.md): applied to every model loaded.
    c.model = ml_collections.ConfigDict(fields.RUNTIME_MODEL_DEFAULTS)
    # Preference pairs. n_train / n_test / seed / tau / flip_rate size and label the synthetic
    # testbed's pairs; with source="tfds", `name` is the prepared pairs dataset.
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", name="", data_dir="", format="plain", n_train=10_000,
        n_test=1_000, seed=0, tau=1.0, flip_rate=0.0, buckets=(36,), max_prompt_len=12, batch_size=64,
        packing=False))
    # Tuned on the default testbed run (see experiments/reward.py): lr 1e-4 stays at chance
    # after one epoch; on the default SFT model 1e-3 with decay to 0 reaches the acceptance
    # gold accuracies in one epoch, where 2e-3 and 3e-3 fall just short on far pairs.
    c.optim = common.optim_config(lr=1e-3, warmup_steps=10, weight_decay=0.0, end_lr_frac=0.0)
    c.epochs = 1                # passes over the training pairs when steps == 0
    c.steps = 0                 # 0: epochs * data.n_train // data.batch_size
    c.micro_batches = 1         # gradient accumulation (trainers/accumulate.py); 1 = off
    # Normalisation samples: completions of training prompts sampled from the SFT policy.
    # prompts_name is the prepared prompts dataset when data.source="tfds".
    c.norm = ml_collections.ConfigDict(dict(
        n_samples=1024, batch_size=256, temperature=1.0, max_new_tokens=0,
        prompts_name="", prompts_n_train=4_000, prompts_n_test=500, policy_from=""))
    c.log_every = 20
    c.save_every = 100
    c.keep = 2
    c.eval_batches = 0          # 0: the whole test split
    return c


SCHEMA = {
    "size": fields.SIZE, "seed": fields.SEED,
    "init_from": schema.Str(doc="the SFT stage directory; '' = WORKDIR/sft"),
    "loss": schema.Spec("reward_loss"),
    "mesh": fields.MESH,
    "model": fields.RUNTIME_MODEL,
    "lora": fields.LORA,
    "data": fields.data(tau=fields.TAU, flip_rate=fields.FLIP_RATE,
                        batch_size=fields.BATCH_SIZE),
    "optim": fields.OPTIM,
    "epochs": schema.Int(ge=0, doc="passes over the training pairs when steps=0"),
    **fields.loop(steps_min=0),
    "micro_batches": fields.MICRO_BATCHES,
    "norm": {
        "n_samples": schema.Int(ge=2, doc="SFT samples the reward is normalised on"),
        "batch_size": schema.Int(ge=1),
        "temperature": schema.Float(gt=0, doc="sampling temperature of the SFT policy"),
        "max_new_tokens": schema.Int(ge=0, doc="0 = up to the model's max_len"),
        "prompts_name": schema.Str(doc="the prepared prompts dataset when data.source='tfds'"),
        "prompts_n_train": schema.Int(ge=1), "prompts_n_test": schema.Int(ge=1),
        "policy_from": schema.Str(doc="the policy sampled for the normalisation; '' = "
                                      "init_from (set it when init_from is a reward model "
                                      "such as a *ForSequenceClassification checkpoint)"),
    },
    "eval_batches": schema.Int(ge=0, doc="held-out pair batches; 0 = the whole test split"),
}


def validate(config):
    """The checks that need no files or devices (the pipeline runs them all before training)."""
    schema.check(config, SCHEMA)
    common.check_data(config.data, batch_size=config.data.batch_size)
    common.check_micro_batches(config, config.data.batch_size, "data.batch_size")
    source = common.source(config.data)
    common.require(source.generated or bool(config.norm.prompts_name),
                   "norm.prompts_name must name the prepared prompts dataset when "
                   f"data.source={config.data.source!r} (the reward is normalised on samples "
                   "for its prompts)")
    common.require(_data_kind(config) == "pairs" or "rankings" in (source.kinds or ()),
                   f"loss={config.loss!r} trains on ranked lists, which only the review "
                   "testbed provides here; use data.source='synthetic' or a pairwise loss")
    if _data_kind(config) != "pairs":
        common.refuse_packing(config, f"with loss={config.loss!r}: its ranked lists are "
                                      "batched K rows per prompt, not packed")
    if config.micro_batches > 1:
        common.refuse_packing(config, f"with micro_batches={config.micro_batches}: a packed "
                                      "batch holds pairs across rows, which micro-batches "
                                      "would cut apart")
    common.require(config.steps > 0 or config.epochs > 0,
                   f"epochs={config.epochs} must be positive when steps=0")
    common.require(config.steps > 0 or config.epochs * config.data.n_train
                   >= config.data.batch_size,
                   f"epochs={config.epochs} x data.n_train={config.data.n_train} pairs make no "
                   f"batch of data.batch_size={config.data.batch_size}; set steps or lower "
                   "data.batch_size")


def _data_kind(config) -> str:
    """"rankings" for a K-wise loss (one that takes `rewards` [B, K]), else "pairs"."""
    fn = registry.get("reward_loss", config.loss)
    return "pairs" if registry.accepts(fn, "chosen_rewards") else "rankings"


def resolve_init_from(config, workdir: Path):
    """The SFT stage directory: config.init_from, or WORKDIR/sft when it is empty; or a
    Hugging Face checkpoint (hf:DIR), a causal LM or a *ForSequenceClassification model."""
    if hf.is_hf_dir(config.init_from):
        hf.read_config(hf.strip_prefix(config.init_from))    # exists and is readable
        return config.init_from
    init_from = Path(config.init_from) if config.init_from else workdir / "sft"
    common.require(checkpoint.stage_has_checkpoint(init_from),
                   f"init_from={str(init_from)!r} holds no complete SFT checkpoint"
                   f"{' (the default, WORKDIR/sft)' if not config.init_from else ''}; run "
                   "experiments.sft in this workdir first, or set --config.init_from=DIR to a "
                   "finished SFT stage directory")
    with checkpoint.Checkpointer(init_from) as ckpt:
        kind = ckpt.restore_meta().get("model_kind", "policy")
    # The normalisation samples from this model, so it must be a policy.
    common.require(kind == "policy", f"init_from={str(init_from)!r} holds a {kind} model; "
                                     "point --config.init_from at the SFT stage directory")
    return init_from


def total_steps(config) -> int:
    if config.steps:
        return int(config.steps)
    steps = int(config.epochs * config.data.n_train) // int(config.data.batch_size)
    common.require(steps > 0, f"epochs * data.n_train = {config.epochs * config.data.n_train} "
                              f"is less than one batch of {config.data.batch_size}")
    return steps


def fold_normalization(params, gain, bias):
    """Reward-model params whose output is gain * r + bias: scales the head kernel by gain and
    maps the head bias b to gain * b + bias. gain, bias: float scalars. Inputs are unchanged."""
    pure = nnx.to_pure_dict(params)
    head = pure["head"]
    head["kernel"] = head["kernel"] * jnp.asarray(gain, head["kernel"].dtype)
    head["bias"] = (head["bias"] * jnp.asarray(gain, head["bias"].dtype)
                    + jnp.asarray(bias, head["bias"].dtype))
    new_params = jax.tree.map(lambda x: x, params)   # a structural copy to fill in
    nnx.replace_by_pure_dict(new_params, pure)
    return new_params


def pair_accuracies(r_chosen, r_rejected, *, valid=None, gold_chosen=None, gold_rejected=None,
                    far=None) -> dict:
    """Held-out accuracies from per-pair scores (host numpy, shapes [N]).

    rm/eval_accuracy: the RM prefers the labelled choice (a tie counts half). With gold rewards:
    rm/eval_gold_accuracy against the gold ordering over pairs with different gold rewards, and,
    given `far` (a gold-reward gap), rm/eval_gold_accuracy_far over pairs with |gap| > far.
    """
    rc, rr = np.asarray(r_chosen, np.float64), np.asarray(r_rejected, np.float64)
    keep = np.ones(rc.shape, bool) if valid is None else np.asarray(valid) > 0
    win = np.where(rc > rr, 1.0, np.where(rc == rr, 0.5, 0.0))
    out = {"rm/eval_accuracy": float(np.mean(win[keep])), "rm/eval_pairs": float(keep.sum())}
    if gold_chosen is None:
        return out
    gap = np.asarray(gold_chosen, np.float64) - np.asarray(gold_rejected, np.float64)
    rm_gap = rc - rr
    agree = np.where(rm_gap == 0, 0.5, (np.sign(rm_gap) == np.sign(gap)).astype(np.float64))
    ordered = keep & (gap != 0)
    out["rm/eval_gold_accuracy"] = float(np.mean(agree[ordered]))
    if far is not None:
        is_far = keep & (np.abs(gap) > far)
        out["rm/eval_gold_accuracy_far"] = (float(np.mean(agree[is_far])) if is_far.any()
                                            else float("nan"))
        out["rm/eval_far_pairs"] = float(is_far.sum())
    return out


def results(stage_dir) -> dict:
    """The normalisation and evaluation numbers stored in a finished stage's final checkpoint."""
    with checkpoint.Checkpointer(stage_dir) as ckpt:
        meta = ckpt.restore_meta()
    common.require("normalization" in meta,
                   f"{stage_dir} holds no finished reward-model stage (no normalisation yet); "
                   "run reward.train to the end")
    return {**meta["normalization"], **meta["eval"]}


def _sub_data(data, **changes) -> ml_collections.ConfigDict:
    """A copy of the data config with some fields changed (e.g. another dataset's sizes)."""
    out = ml_collections.ConfigDict(data.to_dict())
    out.update(changes)
    return out


@common.stage
def train(config, workdir) -> Path:
    workdir = Path(workdir)
    stage_dir = workdir / STAGE

    # --- config, mesh -------------------------------------------------------------------------
    validate(config)
    init_from = resolve_init_from(config, workdir)
    steps = total_steps(config)
    mesh, rules = common.setup_mesh(config, config.data.batch_size, config.norm.batch_size)
    ckpt = checkpoint.Checkpointer(stage_dir, max_to_keep=config.keep,
                                   save_interval_steps=config.save_every)
    try:
        meta = ckpt.restore_meta() if ckpt.latest_step() is not None else {}
    except checkpoint.DamagedCheckpointError:
        meta = {}   # not finished after all: the resumption below reports it and falls back
    if "normalization" in meta:
        common.check_same_config(meta, config, stage_dir)
        common.check_same_sources(meta, {"init_from": common.stage_source(init_from)},
                                  stage_dir)
        ckpt.close()   # a finished stage: its final checkpoint is already normalised
        return stage_dir

    # --- model: SFT backbone + fresh scalar head ----------------------------------------------
    graphdef, params, model_cfg, tok, init_meta = common.load_stage(
        init_from, kind="reward", mesh=mesh, rules=rules, seed=config.seed, new_head=True,
        runtime=common.runtime(config))
    sources = {"init_from": init_meta["source"]}   # a resumption must start from the same SFT
    # With lora: adapters on the backbone; the head trains whole.
    graphdef, params, model_cfg = common.add_adapters(
        graphdef, params, model_cfg, config, kind="reward", mesh=mesh, rules=rules,
        seed=config.seed)
    common.require(max(config.data.buckets) <= model_cfg.max_len,
                   f"data.buckets go up to {max(config.data.buckets)} but the SFT model's "
                   f"max_len is {model_cfg.max_len}; lower data.buckets")

    # --- data ---------------------------------------------------------------------------------
    kind = _data_kind(config)
    packing = bool(config.data.get("packing", False))    # pairs only (validate)
    train_cfg = common.batch_config(
        config.data, batch_size=config.data.batch_size, seed=config.seed, packing=packing,
        pack_rows_multiple=common.pack_rows_multiple(config, mesh, rules))
    train_source = common.data_source(config.data, kind, "train", workdir)
    if kind == "pairs":
        train_it = batching.make_iterator(train_source, kind="pairs", tokenizer=tok,
                                          config=train_cfg, name="pairs/train",
                                          format=config.data.format)
    else:
        train_it = rankings_iterator(train_source, tokenizer=tok, config=train_cfg,
                                     name="rankings/train", format=config.data.format)

    # --- update step --------------------------------------------------------------------------
    loss_spec = registry.get("reward_loss", config.loss)
    optimizer = common.make_optimizer(config.optim, steps, lora=bool(config.lora))
    opt_state = optimizer.init(params)   # eager: the moments keep the params' sharding

    def score(params, tokens, mask):
        return model.apply_reward(graphdef, params, tokens, mask_bt=mask)

    def loss_fn(params, batch):
        # One forward pass over all K * B rows (pairs: K = 2, the B chosen rows first), then
        # [B, K] with column k the k-th ranked response, best first. Packed rows: one reward
        # per sequence, read at its last token, in the same order.
        packed = common.packed_inputs(batch)
        r = (score(params, batch["tokens"], batch["mask"]) if packed is None else
             model.apply_reward(graphdef, params, batch["tokens"], mask_bt=batch["mask"],
                                read_at=batch["read_at"], **packed))
        b = batch["valid"].shape[0]
        rewards_bk = r.reshape(r.shape[0] // b, b).T
        return registry.call(loss_spec, chosen_rewards=rewards_bk[:, 0],
                             rejected_rewards=rewards_bk[:, 1], rewards=rewards_bk)

    k = config.micro_batches

    def update(params, opt_state, guard, batch, step):
        if k == 1:
            (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        else:
            # Reward losses are plain means over a batch's (always full) lists, so each of k
            # equal micro-batches contributes 1/k of the loss and metrics (accumulate.py).
            used = {key: batch[key] for key in ("tokens", "mask", "valid")}
            (loss, m), grads = accumulate.grads(
                lambda p, mb: jax.tree.map(lambda v: v / k, loss_fn(p, mb)), params,
                accumulate.split(used, k, batch["valid"].shape[0]))
        params, opt_state, guard, grad_norm = common.guarded_apply(
            optimizer, params, opt_state, grads, loss, guard, step)
        return params, opt_state, guard, {**m, "rm/total_loss": loss, "rm/grad_norm": grad_norm}

    update = common.jit_update(update)
    score_jit = jax.jit(score)

    # --- checkpoint: resume -------------------------------------------------------------------
    guard = common.init_guard()
    params, train_state, step = common.resume(ckpt, params, {"opt": opt_state}, train_it,
                                                config, sources=sources)
    opt_state = train_state["opt"]

    def save(step, extra=None, force=False):
        meta = common.stage_meta(config=config, model_cfg=model_cfg, tok=tok, sources=sources,
                                 extra={"data_state": train_it.get_state(),
                                        "model_kind": "reward", "init_from": str(init_from),
                                        **(extra or {})})
        common.save_checkpoint(ckpt, step, params=params, train={"opt": opt_state}, meta=meta,
                               force=force)

    # --- loop ---------------------------------------------------------------------------------
    params, opt_state, guard = common.on_mesh((params, opt_state, guard), mesh)
    writer = metrics_lib.MetricsWriter(stage_dir)
    values = None
    bar = metrics_lib.progress(total=steps, initial=step, desc="rm")
    token_rate = metrics_lib.TokenRate()
    padding = batching.PaddingStats(config.data.buckets) if packing else None
    t0 = time.perf_counter()
    while step < steps:
        host_batch = next(train_it)
        token_rate.add(host_batch["mask"])
        common.count_padding(padding, host_batch, STAGE)
        batch = common.place_batch(host_batch, mesh, rules)
        params, opt_state, guard, m = update(params, opt_state, guard, batch, jnp.int32(step))
        step += 1
        last = step == steps
        if step % config.log_every == 0 or last:
            m = metrics_lib.to_host(m)  # waits for the step, so the rate below is honest
            values = writer.write(step, {**m, "rm/epoch": train_it.epoch,
                                         "time/tokens_per_s": token_rate.rate(),
                                         **(padding.metrics() if padding else {})})
            common.raise_if_bad(guard, values)   # a host sync anyway: stop early
            bar.set_postfix(metrics_lib.format_postfix(
                values, ["rm/loss", "rm/accuracy", "rm/pairwise_accuracy"]))
        # The last step is saved only after normalisation, below: its checkpoint is the result.
        if step % config.save_every == 0 and not last:
            common.raise_if_bad(guard, values)
            save(step)
        bar.update(1)
    bar.close()
    common.raise_if_bad(guard, values)
    common.packing_report(padding, STAGE)
    train_seconds = time.perf_counter() - t0

    # --- normalisation on SFT samples (Ziegler et al. 2019 sec. 2.2) --------------------------
    policy_from = config.norm.policy_from or init_from
    policy_graphdef, policy_params, _, policy_tok, _ = common.load_stage(
        policy_from, kind="policy", mesh=mesh, rules=rules, seed=config.seed,
        key="norm.policy_from" if config.norm.policy_from else "init_from",
        runtime=common.runtime(config))
    common.require(policy_tok.same_ids(tok),
                   f"norm.policy_from={str(policy_from)!r} uses another tokenizer than the "
                   "reward model; the normalisation scores the policy's tokens directly")
    samples = sample_policy(config, workdir, (policy_graphdef, policy_params), tok, mesh, rules)
    sample_batches = [common.place_batch({"tokens": t, "mask": m}, mesh, rules)
                      for t, m in zip(samples["tokens"], samples["mask"])]
    raw = np.concatenate([sharding.device_get(score_jit(params, b["tokens"], b["mask"]))
                          for b in sample_batches])
    mean, std = float(raw.mean()), float(raw.std())
    common.require(std > 0, "the reward model gives every SFT sample the same score; it cannot "
                            "be normalised (check the training metrics in rm/metrics.jsonl)")
    gain, bias = 1.0 / std, -mean / std
    params = common.on_mesh(fold_normalization(params, gain, bias), mesh)
    after = np.concatenate([sharding.device_get(score_jit(params, b["tokens"], b["mask"]))
                            for b in sample_batches])
    norm = {"rm/norm_gain": gain, "rm/norm_bias": bias, "rm/norm_mean_before": mean,
            "rm/norm_std_before": std, "rm/norm_mean_after": float(after.mean()),
            "rm/norm_std_after": float(after.std()), "rm/norm_samples": float(raw.size)}
    if samples["gold"] is not None:
        norm["rm/sft_gold_mean"] = float(samples["gold"].mean())
        norm["rm/sft_gold_std"] = float(samples["gold"].std())

    # --- eval: held-out pairs -----------------------------------------------------------------
    test_source = common.data_source(config.data, "pairs", "test", workdir)
    gold_fields = common.gold_fields(test_source)      # the testbed's records carry them
    test_it = batching.make_iterator(
        test_source, kind="pairs", tokenizer=tok,
        config=common.batch_config(config.data, batch_size=config.data.batch_size,
                                   seed=config.seed, shuffle=False, num_epochs=1,
                                   drop_remainder=False),
        extra_fields=gold_fields, name="pairs/test", format=config.data.format)
    cols = {k: [] for k in ("rc", "rr", "valid", *gold_fields)}
    for i, host_batch in enumerate(test_it):
        if config.eval_batches and i >= config.eval_batches:
            break
        batch = common.place_batch(host_batch, mesh, rules)
        r = sharding.device_get(score_jit(params, batch["tokens"], batch["mask"]))
        b = r.shape[0] // 2
        cols["rc"].append(r[:b])
        cols["rr"].append(r[b:])
        for k in ("valid", *gold_fields):
            cols[k].append(host_batch[k])
    cols = {k: np.concatenate(v) for k, v in cols.items()}
    evals = pair_accuracies(
        cols["rc"], cols["rr"], valid=cols["valid"], gold_chosen=cols.get("gold_chosen"),
        gold_rejected=cols.get("gold_rejected"), far=norm.get("rm/sft_gold_std"))
    evals["rm/train_seconds"] = train_seconds

    # read_metrics keeps one line per step, so the last training values ride along here.
    writer.write(step, {**(values or {}), **norm, **evals})
    writer.close()
    # The first normalised scores ride along so a later load can check it got this very model.
    save(step, extra={"normalization": norm, "eval": evals,
                      "score_probe": [float(x) for x in after[:8]]}, force=True)
    ckpt.close()
    return stage_dir


def sample_policy(config, workdir, policy, tok, mesh, rules) -> dict:
    """Completions of training prompts sampled from `policy` = (graphdef, params).

    Returns {"tokens": [[B, P + N]] host arrays per batch, "mask": same (1 on the real prompt
    and the completion up to and including eos), "gold": [n] gold rewards or None (not the
    testbed)}.
    Prompts are left-padded to data.max_prompt_len; N = norm.max_new_tokens, or what is left of
    max(data.buckets) when 0, so samples are as long as the training sequences can be.
    """
    norm = config.norm
    prompt_len = int(config.data.max_prompt_len)
    new_tokens = int(norm.max_new_tokens) or max(config.data.buckets) - prompt_len
    common.require(new_tokens > 0, f"norm.max_new_tokens={new_tokens} leaves no room to sample")
    # A testbed generates its prompts (as many as asked); a dataset's are a prepared dataset.
    pdata = (_sub_data(config.data, n_train=norm.prompts_n_train, n_test=norm.prompts_n_test)
             if common.source(config.data).generated
             else _sub_data(config.data, name=norm.prompts_name))
    gold = common.gold(config.data, tok)
    monitor = rewards_lib.parse(gold.expr) if gold is not None else ()
    text_fields = rewards_lib.record_fields(monitor)
    prompts_it = batching.make_iterator(
        common.data_source(pdata, "prompts", "train", workdir), kind="prompts", tokenizer=tok,
        config=batching.BatchConfig(batch_size=norm.batch_size,
                                    buckets=(prompt_len, max(config.data.buckets)),
                                    max_prompt_len=prompt_len, seed=config.seed),
        name="prompts/train", format=config.data.format, text_fields=text_fields)
    params = {"policy": policy[1], **(gold.inputs if gold is not None else {})}
    rng = jax.random.key(config.seed)
    tokens, masks, golds, n = [], [], [], 0
    while n < norm.n_samples:
        host = next(prompts_it)
        batch = common.place_batch({k: host[k] for k in ("tokens", "mask")}, mesh, rules)
        rng, key = jax.random.split(rng)
        r = rollout.sample_and_score(
            graphdef=policy[0], terms=(), monitor=monitor, params=params,
            prompt=batch["tokens"], prompt_mask=batch["mask"], rng=key,
            max_new_tokens=new_tokens, temperature=float(norm.temperature),
            stop_ids=tok.stop_ids, pad_id=tok.pad_id, tokenizer=tok,
            fields={k: host[k] for k in text_fields})
        tokens.append(sharding.device_get(r["seq"]))
        masks.append(sharding.device_get(r["seq_mask"]))
        if gold is not None:
            golds.append(sharding.device_get(rewards_lib.total(monitor, r)))
        n += r["seq"].shape[0]
    # The last batch may overshoot n_samples; keep every sample (they are all from the policy).
    return {"tokens": tokens, "mask": masks,
            "gold": np.concatenate(golds) if golds else None}


def rankings_iterator(source, *, tokenizer, config: batching.BatchConfig,
                      name: str = "rankings", format: str = "plain") -> batching.BatchIterator:
    """K-wise batches of ranked lists {prompt, responses [K] best first} for Plackett–Luce.

    Returns a checkpointable iterator of {"tokens" [K*B, T], "mask" [K*B, T], "valid" [B]}:
    rows k*B .. (k+1)*B - 1 hold the k-th ranked response of each prompt (so for K = 2 the
    layout is the pairs batch's, chosen first), right-padded `[bos] prompt response [eos]`,
    truncated by `batching.truncate`'s rule. Every list in the source must have the same K.
    """
    common.require(config.drop_remainder, "rankings batches are always full; build the iterator "
                   "with drop_remainder=True")
    enc = batching.TextEncoder(tokenizer, format=format)

    def encode(index, record):
        prompt = enc.prompt(batching.as_text(record["prompt"], name=name, index=index,
                                             field="prompt"))
        rows = []
        for response in record["responses"]:
            response = enc.response(batching.as_text(response, name=name, index=index,
                                                     field="responses"))
            p, r = batching.truncate(prompt, response, max_prompt_len=config.max_prompt_len,
                                     max_len=config.max_len, prefix=tokenizer.prefix_ids)
            rows.append(p + r)
        return rows

    def to_batch(indices, rows):
        examples = [encode(i, r) for i, r in zip(indices, rows)]
        ks = {len(ex) for ex in examples}
        if len(ks) != 1:
            raise records.DataError(file=name, index=None, field="responses",
                                    reason=f"lists of different lengths {sorted(ks)} in a batch")
        k, b = ks.pop(), len(examples)
        seqs = [ex[j] for j in range(k) for ex in examples]
        length = batching.bucket_length(max(len(x) for x in seqs), config.buckets)
        tokens = np.full((k * b, length), tokenizer.pad_id, np.int32)
        mask = np.zeros((k * b, length), np.int32)
        for row, seq in enumerate(seqs):
            tokens[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        return {"tokens": tokens, "mask": mask, "valid": np.ones(b, np.int32)}

    return batching.index_batches(source, kind="rankings", config=config, to_batch=to_batch)
