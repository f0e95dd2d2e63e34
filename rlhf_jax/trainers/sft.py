"""Supervised fine-tuning: next-token loss on completion tokens, the prompt masked.

    stage_dir = sft.train(config, workdir)        # writes workdir/sft/, returns it

Re-running in the same workdir resumes from the latest checkpoint and ends with the same
parameters as an uninterrupted run. The checkpoint carries the model config and tokenizer,
which is all the next stage (reward model, DPO, PPO) needs besides the parameters.

With data.packing=true the training batches are packed rows (docs/data.md, "Sequence
packing"): the same examples and the same token loss, fewer padding tokens. With
`config.lora` the init_from model is frozen and LoRA adapters train on it; the checkpoint
holds the adapters and loads merged (docs/model.md, "LoRA").
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from rlhf_jax import checkpoint, metrics as metrics_lib, schema
from rlhf_jax.aggregation import aggregate, denominator
from rlhf_jax.data import batching
from rlhf_jax.data import tokenizer as tokenizer_lib, tokenizer_files
from rlhf_jax.trainers import accumulate, common, fields

STAGE = "sft"


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""            # a stage directory to start from; "" = random init
    c.lora = ""                 # LoRA adapters on the init_from model, e.g. "lora(rank=16)"
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=0, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=512, max_len=48,
        norm="rmsnorm", position="rope", activation="swiglu", tie_embeddings=True,
        use_bias=False, param_dtype="float32", dtype="float32",
        remat="none", logits_chunk=0, attention="einsum"))    # the last three: how to compute
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules={}, distributed=False))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", name="", data_dir="", format="plain", tokenizer="", n_train=20_000,
        n_test=1_000, seed=0, buckets=(36,), max_prompt_len=12, batch_size=64,
        packing=False))
    c.optim = common.optim_config(lr=3e-3, warmup_steps=30)
    c.steps = 600
    c.micro_batches = 1         # gradient accumulation (trainers/accumulate.py); 1 = off
    c.log_every = 20
    c.save_every = 200
    c.keep = 2
    c.eval_batches = 4
    return c


SCHEMA = {
    "size": fields.SIZE, "seed": fields.SEED,
    "init_from": schema.Str(doc="a stage directory to start from; '' = random initialisation"),
    "lora": fields.LORA,
    "model": fields.MODEL, "mesh": fields.MESH,
    "data": fields.data(
        tokenizer=schema.Str(doc="a sentencepiece .model or a Hugging Face tokenizer directory; "
                                 "'' = the testbed's tokenizer"),
        batch_size=fields.BATCH_SIZE),
    "optim": fields.OPTIM,
    **fields.loop(),
    "micro_batches": fields.MICRO_BATCHES,
    "eval_batches": schema.Int(ge=0, doc="held-out batches for eval/sft_loss; 0 = skip"),
}


def validate(config):
    """The checks that need no files or devices (the pipeline runs them all before training)."""
    schema.check(config, SCHEMA)
    common.model_config(config)      # the architecture's own checks (heads divide d_model...)
    common.check_data(config.data, batch_size=config.data.batch_size)
    common.check_micro_batches(config, config.data.batch_size, "data.batch_size")
    common.require(not (config.init_from and config.data.tokenizer),
                   "data.tokenizer is not used with init_from (the checkpoint carries its "
                   "tokenizer); leave one of them empty")
    common.require(bool(config.init_from or config.data.tokenizer)
                   or common.source(config.data).tokenizer() is not None,
                   f"data.tokenizer is required with data.source={config.data.source!r} (a "
                   "sentencepiece .model or a Hugging Face tokenizer directory), unless "
                   "init_from gives a checkpoint with its own")
    common.require(not config.lora or bool(config.init_from),
                   f"lora={config.lora!r} adapts a trained model; set init_from to its stage "
                   "or Hugging Face directory (the frozen base a LoRA checkpoint refers to)")


def load_tokenizer(config, workdir: Path) -> tokenizer_lib.BaseTokenizer:
    """data.tokenizer: a SentencePiece .model file, or a directory holding a Hugging Face
    tokenizer (tokenizer.json or tokenizer.model, with its config files); else the data
    source's own (a testbed's)."""
    if config.data.tokenizer:
        path = Path(config.data.tokenizer)
        if path.is_dir():
            return tokenizer_files.load_pretrained(path)
        common.require(path.is_file(),
                       f"data.tokenizer={config.data.tokenizer!r} does not exist; give the path "
                       "of a sentencepiece .model or of a Hugging Face tokenizer directory")
        return tokenizer_lib.Tokenizer.load(config.data.tokenizer)
    tok = common.source(config.data).tokenizer()
    common.require(tok is not None, f"data.tokenizer is required with data.source="
                   f"{config.data.source!r}, which has no tokenizer of its own")
    return tok


@common.stage
def train(config, workdir) -> Path:
    workdir = Path(workdir)
    stage_dir = workdir / STAGE

    # --- config, mesh ---------------------------------------------------------------------
    validate(config)
    mesh, rules = common.setup_mesh(config, config.data.batch_size)

    # --- data ------------------------------------------------------------------------------
    sources = {"init_from": None}   # what the run starts from; a resumption must match it
    if config.init_from:
        graphdef, params, model_cfg, tok, init_meta = common.load_stage(
            config.init_from, mesh=mesh, rules=rules, seed=config.seed,
            runtime=common.runtime(config))
        sources["init_from"] = init_meta["source"]
        graphdef, params, model_cfg = common.add_adapters(
            graphdef, params, model_cfg, config, kind="policy", mesh=mesh, rules=rules,
            seed=config.seed)
    else:
        tok = load_tokenizer(config, workdir)
        model_cfg = common.model_config(config)
        if model_cfg.vocab_size == 0:
            model_cfg = model_cfg.replace(vocab_size=tok.vocab_size)
        common.require(model_cfg.vocab_size >= tok.vocab_size,
                       f"model.vocab_size={model_cfg.vocab_size} is smaller than the "
                       f"tokenizer's {tok.vocab_size}; set it to 0 to follow the tokenizer")
        graphdef, params = common.init_model(model_cfg, kind="policy", mesh=mesh, rules=rules,
                                             seed=config.seed)
    common.require(max(config.data.buckets) <= model_cfg.max_len,
                   f"data.buckets go up to {max(config.data.buckets)} but model.max_len is "
                   f"{model_cfg.max_len}; raise model.max_len or lower the buckets")
    packing = bool(config.data.get("packing", False))
    train_it = batching.make_iterator(
        common.data_source(config.data, "sft", "train", workdir), kind="sft", tokenizer=tok,
        config=common.batch_config(
            config.data, batch_size=config.data.batch_size, seed=config.seed, packing=packing,
            pack_rows_multiple=common.pack_rows_multiple(config, mesh, rules)),
        name="sft/train", format=config.data.format)

    # --- model, optimizer, update step ------------------------------------------------------
    optimizer = common.make_optimizer(config.optim, config.steps, lora=bool(config.lora))
    opt_state = optimizer.init(params)   # eager: the moments keep the params' sharding

    def loss_fn(params, batch, normalizer=None):
        # Packed rows (data.packing): the same token sum over the same token count.
        logps, _ = common.sequence_logps(graphdef, params, batch["tokens"], batch["mask"],
                                         batch["loss_mask"], packed=common.packed_inputs(batch))
        return aggregate(-logps, batch["loss_mask"][:, 1:], "token_mean",
                         normalizer=normalizer)

    k = config.micro_batches

    def update(params, opt_state, guard, batch, step):
        if k == 1:
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        else:
            # Each micro-batch's token sum over the whole batch's token count (accumulate.py).
            used = {key: batch[key] for key in ("tokens", "mask", "loss_mask", "segment_ids",
                                                "positions") if key in batch}
            den = denominator(batch["loss_mask"][:, 1:], "token_mean")
            (loss, _), grads = accumulate.grads(
                lambda p, mb, d: (loss_fn(p, mb, d), {}), params,
                accumulate.split(used, k, batch["tokens"].shape[0]), den)
        params, opt_state, guard, grad_norm = common.guarded_apply(
            optimizer, params, opt_state, grads, loss, guard, step)
        return params, opt_state, guard, {"sft/loss": loss, "sft/grad_norm": grad_norm}

    update = common.jit_update(update)
    eval_loss = jax.jit(loss_fn)

    # --- checkpoint: resume -------------------------------------------------------------------
    guard = common.init_guard()
    ckpt = checkpoint.Checkpointer(stage_dir, max_to_keep=config.keep,
                                   save_interval_steps=config.save_every)
    params, train_state, step = common.resume(ckpt, params, {"opt": opt_state}, train_it,
                                                config, sources=sources)
    opt_state = train_state["opt"]

    def save(step, force=False):
        meta = common.stage_meta(config=config, model_cfg=model_cfg, tok=tok, sources=sources,
                                 extra={"data_state": train_it.get_state(),
                                        "model_kind": "policy"})
        common.save_checkpoint(ckpt, step, params=params, train={"opt": opt_state}, meta=meta,
                               force=force)

    params, opt_state, guard = common.on_mesh((params, opt_state, guard), mesh)

    # --- loop -------------------------------------------------------------------------------
    writer = metrics_lib.MetricsWriter(stage_dir)
    values = None
    bar = metrics_lib.progress(total=config.steps, initial=step, desc="sft")
    token_rate = metrics_lib.TokenRate()
    padding = batching.PaddingStats(config.data.buckets) if packing else None
    while step < config.steps:
        host_batch = next(train_it)
        token_rate.add(host_batch["mask"])
        common.count_padding(padding, host_batch, STAGE)
        batch = common.place_batch(host_batch, mesh, rules)
        params, opt_state, guard, m = update(params, opt_state, guard, batch, jnp.int32(step))
        step += 1
        last = step == config.steps
        if step % config.log_every == 0 or last:
            m = metrics_lib.to_host(m)  # waits for the step, so the rate below is honest
            values = writer.write(step, {**m, "time/tokens_per_s": token_rate.rate(),
                                         **(padding.metrics() if padding else {})})
            common.raise_if_bad(guard, values)   # a host sync anyway: stop early
            bar.set_postfix(metrics_lib.format_postfix(values, ["sft/loss"]))
        if step % config.save_every == 0 or last:
            common.raise_if_bad(guard, values)
            save(step, force=last)
        bar.update(1)
    bar.close()
    common.raise_if_bad(guard, values)
    common.packing_report(padding, STAGE)

    # --- eval: held-out completion NLL --------------------------------------------------------
    if config.eval_batches:
        test_it = batching.make_iterator(
            common.data_source(config.data, "sft", "test", workdir), kind="sft", tokenizer=tok,
            config=common.batch_config(config.data, batch_size=config.data.batch_size,
                                       seed=config.seed, shuffle=False), name="sft/test",
            format=config.data.format)
        losses = [eval_loss(params, common.place_batch(next(test_it), mesh, rules))
                  for _ in range(config.eval_batches)]
        writer.write(step, {"eval/sft_loss": jnp.mean(jnp.stack(losses))})
    writer.close()
    ckpt.close()
    return stage_dir
