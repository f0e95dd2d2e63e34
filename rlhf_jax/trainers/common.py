"""Pieces every stage shares: config checks, mesh, model and optimizer set-up, data sources,
checkpoint hand-off and resume, the non-finite guard.

A trainer (`sft.py`, `reward.py`, ...) stays a flat script that calls these in order; nothing
here knows which stage it serves.
"""

import contextlib
import contextvars
import dataclasses
import functools
import json
import logging
from pathlib import Path
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from rlhf_jax import checkpoint, hf, model, registry, sharding
from rlhf_jax.errors import CheckpointError, ConfigError
from rlhf_jax.data import batching, records, sources, synthetic
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.trainers import fields


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm was NaN or inf; the last good checkpoint is left intact."""


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def model_config(config) -> model.ModelConfig:
    """The ModelConfig described by `config.model` (a dict of ModelConfig fields)."""
    names = {f.name for f in dataclasses.fields(model.ModelConfig)}
    given = dict(config.model)
    unknown = sorted(set(given) - names)
    if unknown:
        raise ConfigError(f"config.model has unknown fields {unknown}; valid: {sorted(names)}")
    return model.ModelConfig(**given)


def require(ok: bool, message: str):
    """Config validation: raise a ConfigError that says what to change."""
    if not ok:
        raise ConfigError(message)


def optim_config(**overrides) -> ml_collections.ConfigDict:
    base = dict(lr=1e-3, warmup_steps=20, weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.99,
                schedule="cosine", end_lr_frac=0.1, state_dtype="param")
    base.update(overrides)
    return ml_collections.ConfigDict(base)


def make_optimizer(optim, total_steps: int, *, lora: bool = False
                   ) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine (or constant) decay and global-norm clipping.

    With `lora` it steps only the trainable leaves of a LoRA model (`trainable_only`)."""
    require(optim.schedule in fields.SCHEDULES,
            f"optim.schedule={optim.schedule!r}; choose one of {list(fields.SCHEDULES)}")
    warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(optim.lr, max(total_steps - warmup, 1),
                                            alpha=optim.end_lr_frac)
    else:
        decay = optax.constant_schedule(optim.lr)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, max(warmup, 1)), decay], [warmup])
    parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip else []
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                             weight_decay=optim.weight_decay))
    chain = optax.chain(*parts)
    if optim.get("state_dtype", "param") == "float32":
        chain = float32_state(chain)
    # LoRA: only the trainable leaves reach the (float32) optimizer; the base is never cast.
    return trainable_only(chain) if lora else chain


def float32_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` run in float32 whatever the parameters' dtype: its state (Adam's moments) is
    float32, gradients and parameters are cast up before it reads them, and the float32
    update it returns is added to the parameters by `optax.apply_updates`, which rounds the
    sum once into their dtype. With float32 parameters this is `inner` exactly."""
    up = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return inner.init(up(params))

    def update(grads, state, params=None):
        return inner.update(up(grads), state, None if params is None else up(params))

    return optax.GradientTransformation(init, update)


def _pick(tree) -> list:
    """The trainable leaves of `tree`, in order. An nnx.Variable stays one, with its logical
    axes, so the moments made from it carry them too and keep the parameter's layout on a mesh
    (`sharding.constrain_state`)."""
    return model.split_trainable(tree)[1]


def _raw(x):
    return x.get_value() if isinstance(x, nnx.Variable) else x


def trainable_only(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` over the trainable leaves of LoRA params alone (`model.is_trainable`: adapters
    and heads), so its state (AdamW's moments) holds adapter-sized arrays only; the frozen
    leaves get zero updates (their gradients are zeros anyway, `model.freeze_base`). Global-norm
    clipping inside `inner` sees the trainable gradients, which is all there is."""
    def init(params):
        return inner.init(_pick(params))

    def update(grads, state, params=None):
        updates, state = inner.update(_pick(grads), state,
                                      None if params is None else _pick(params))
        it = iter(updates)
        return jax.tree_util.tree_map_with_path(
            lambda path, g: _raw(next(it)) if model.is_trainable(path) else jnp.zeros_like(g),
            grads), state

    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------

def lora_fields(config) -> dict:
    """The ModelConfig fields of the stage's `lora` spec (registry kind "adapter"), {} when it
    is empty (no adapters: the whole model trains)."""
    spec = config.get("lora", "") or ""
    return registry.get("adapter", spec)() if spec else {}


def add_adapters(graphdef, params, cfg: model.ModelConfig, config, *, kind: str, mesh, rules,
                 seed: int):
    """The loaded model with the stage's LoRA adapters (`lora_fields`): (graphdef, params,
    cfg). The base parameters (and a reward or value head) are the given arrays, the adapters
    new (B = 0, so the model computes what it did). Unchanged when the stage has no `lora`."""
    changes = lora_fields(config)
    if not changes:
        return graphdef, params, cfg
    try:
        lora_cfg = cfg.replace(**changes)
    except ConfigError as e:
        raise ConfigError(f"lora={config.lora!r}: {e}") from None
    # Only the adapters are new: the model's shapes come from an abstract build, so no second
    # (random) copy of the base weights is ever made.
    graphdef, target = init_model(lora_cfg, kind=kind, mesh=mesh, rules=rules, seed=seed,
                                  abstract_only=True)
    base = nnx.to_pure_dict(params)
    key = jax.random.key(seed)
    counter = iter(range(1 << 30))

    def take(path, a):
        names = model.path_names(path)
        if names[-1] in model.ADAPTER_KEYS:
            value = model.init_adapter(names[-1], jax.random.fold_in(key, next(counter)),
                                       a.shape, a.dtype)
            return jax.device_put(value, a.sharding)
        node = base
        for n in names:
            node = node[n]
        return node

    params = jax.tree_util.tree_map_with_path(take, target)
    return graphdef, params, lora_cfg


def saved_part(tree):
    """What a checkpoint holds of a model's params: all of them, or for a LoRA model only its
    trainable part (`model.trainable_part`: adapters and heads; the base is its source stage)."""
    return model.trainable_part(tree) if model.has_adapters(tree) else tree


def save_checkpoint(ckpt, step: int, *, params, train: dict, meta: dict, force: bool = False):
    """ckpt.save of a stage's params and train state, a LoRA model's as its trainable part
    (`saved_part`; so is a model's params inside `train`, RL's critic). The meta of a LoRA stage
    records the checkpoint it adapts, `lora_base` (its sources' init_from), which `load_stage`
    merges the adapters into."""
    if model.has_adapters(params):
        meta = {**meta, "lora_base": meta["sources"]["init_from"]}
    return ckpt.save(step, params=saved_part(params),
                     train={k: saved_part(v) for k, v in train.items()}, meta=meta, force=force)


def jit_update(fn):
    """jax.jit(fn, donate_argnums=(0, 1)) for an update `fn(params, opt_state, *rest) ->
    (params, opt_state, *more)`. For a LoRA model the frozen base is split off and passed
    without donation (only adapters, heads and optimizer state are donated and returned), so
    the base arrays outlive every step: the reference (`model.adapters_off`) and the policy hold
    one copy of them. Either way the jitted step takes and returns (trainable parameters,
    optimizer state) first; the leaves stay nnx.Variables, with their logical axes.

    The step's `lower(params, opt_state, *rest)` lowers the program a call with these
    (abstract) arguments runs, and its `__wrapped__` is `fn` (tools/bench_memory.py reads both)."""
    plain = jax.jit(fn, donate_argnums=(0, 1))

    @functools.partial(jax.jit, donate_argnums=(0, 1), static_argnums=(3,))
    def update(train, opt_state, frozen, layout, *rest):
        params = model.join_trainable(layout, train, frozen)
        params, opt_state, *more = fn(params, opt_state, *rest)
        return (model.split_by_layout(layout, params)[0], opt_state, *more)

    @functools.wraps(fn)
    def step(params, opt_state, *rest):
        if not model.has_adapters(params):
            return plain(params, opt_state, *rest)
        layout, train, frozen = model.split_trainable(params)
        train, opt_state, *more = update(train, opt_state, frozen, layout, *rest)
        return (model.join_trainable(layout, train, frozen), opt_state, *more)

    def lower(params, opt_state, *rest):
        if not model.has_adapters(params):
            return plain.lower(params, opt_state, *rest)
        layout, train, frozen = model.split_trainable(params)
        return update.lower(train, opt_state, frozen, layout, *rest)

    step.lower = lower
    return step


# ---------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------

# The scope of the stage now running (`stage`); setup_mesh activates its mesh there.
_STAGE_SCOPE: contextvars.ContextVar = contextvars.ContextVar("rlhf_jax_stage", default=None)


def stage(train):
    """Decorator of a trainer's `train(config, workdir)`: the mesh `setup_mesh` builds stays
    active (`sharding.activate`: activation and state layouts in jitted steps) until `train`
    returns or raises, and no longer."""
    @functools.wraps(train)
    def run(*args, **kwargs):
        with contextlib.ExitStack() as scope:
            token = _STAGE_SCOPE.set(scope)
            try:
                return train(*args, **kwargs)
            finally:
                _STAGE_SCOPE.reset(token)

    return run


def setup_mesh(config, *batch_sizes: int):
    """Initialises multi-host JAX if configured, builds the mesh, checks the batch sizes.

    config.mesh: shape (data, fsdp, tensor) with -1 for "the rest", rules (overrides of
    sharding.DEFAULT_RULES), and the multi-host fields read by sharding.initialize_distributed.
    """
    sharding.initialize_distributed(config.mesh)
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    rules = {**sharding.DEFAULT_RULES, **dict(config.mesh.get("rules", None) or {})}
    for b in batch_sizes:
        sharding.check_batch_size(b, mesh, rules)
    scope = _STAGE_SCOPE.get()
    if scope is not None:            # inside a @stage train(): jitted steps see the mesh
        scope.enter_context(sharding.activate(mesh, rules))
    line = mesh_line(mesh, rules, batch_sizes[0] if batch_sizes else None)
    # On one device there is nothing to say on the terminal; the log has it either way.
    if mesh.size > 1 and jax.process_index() == 0:
        print(line, flush=True)
    logging.getLogger(__name__).info(line)
    return mesh, rules


def mesh_line(mesh, rules, batch_size=None) -> str:
    """"mesh data=2 fsdp=4 tensor=1 (8 devices, 1 process); batch 32 = 4 per device on
    (data, fsdp); rules embed->fsdp mlp->tensor ...": what a run is sharded as."""
    shape = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
    axes, shards = batch_shards(mesh, rules)
    procs = jax.process_count()
    out = (f"mesh {shape} ({records.plural(mesh.size, 'device')}, {procs} "
           f"process{'es' if procs > 1 else ''})")
    if batch_size is not None:
        out += (f"; batch {batch_size} = {batch_size // shards} per data shard on "
                f"({', '.join(axes)})")
    shown = " ".join(f"{k}->{v if isinstance(v, str) else ','.join(v or ()) or '-'}"
                     for k, v in rules.items() if k != "batch")
    return out + f"; rules {shown}"


def batch_shards(mesh, rules) -> tuple[tuple[str, ...], int]:
    """(the mesh axes the batch is split over, how many shards that makes)."""
    axes = rules.get("batch") or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return axes, int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def on_mesh(tree, mesh):
    """`tree` with every array as a jitted step's outputs carry it: a NamedSharding on `mesh`.

    jit keys its cache on the input types, which include the sharding: a state made outside
    the mesh (an optimizer count, the guard) or restored with the spec P(None, None) would make
    the second step compile the update again (seconds on a CPU), because the first step's
    outputs say NamedSharding(mesh, P()). Arrays keep their layout; only its spelling changes.
    """
    def one(x):
        s = getattr(x, "sharding", None)
        spec = s.spec if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh else ()
        spec = list(spec)
        while spec and spec[-1] is None:
            spec.pop()
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
            *spec)))

    return jax.tree.map(one, tree)


# Config keys that may change between a run and its resumption: logging, checkpoint cadence,
# evaluation, the mesh (a stage resumes onto whatever mesh it runs on) and paths (a workdir
# may move). Everything else changes what the remaining steps compute.
RESUMABLE_CHANGES = ("log_every", "save_every", "keep", "eval_every", "eval_batches",
                     "eval_prompts", "gen", "mesh", "data.data_dir", "init_from", "reward_from",
                     "size", "model.remat", "model.logits_chunk", "model.attention")


# Config keys added after checkpoints were written, with the value that behaves as before: a
# checkpoint without the key was run that way.
ADDED_KEYS = {"data.format": "plain", "norm.policy_from": "", "data.kind": "pairs",
              "data.split_pairs": False, "micro_batches": 1, "optim.state_dtype": "param",
              "model.param_dtype": "", "data.packing": False, "lora": "",
              **{f"model.{k}": v for k, v in model.RUNTIME_DEFAULTS.items()}}


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def check_same_config(meta: dict, config, stage_dir) -> None:
    """Refuses to continue a stage whose checkpoint was written under a different config (other
    than RESUMABLE_CHANGES), naming the keys: resuming would silently mix two runs."""
    if "config" not in meta:
        return
    now = json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config))
    saved = json.loads(json.dumps(meta["config"]))
    saved, now = _flat(saved), _flat(now)
    def free(key):
        return any(key == f or key.startswith(f + ".") for f in RESUMABLE_CHANGES)

    for key, neutral in ADDED_KEYS.items():
        if key not in saved and key in now:
            saved[key] = neutral
    diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
            if not free(k) and saved.get(k) != now.get(k)}
    if diff:
        raise CheckpointError(
            f"{stage_dir} holds a run with a different config (saved, now): {diff}. To start "
            "afresh use a new --workdir (or --config.stage where the stage has one); to resume "
            "that run, set these values back")


def _describe_source(source) -> str:
    if source is None:
        return "none"
    return (f"{source['path']} (step {source['step']}, params fingerprint "
            f"{source.get('params') or 'unknown'})")


def _same_source(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.get("params") and b.get("params"):
        return a["params"] == b["params"]
    return a["step"] == b["step"]   # a source saved before checksums: the step is all we know


def check_same_sources(meta: dict, sources: dict, stage_dir) -> None:
    """Refuses to continue a stage from other source checkpoints than the ones its run started
    from (the SFT model that is DPO's reference, the reward model PPO optimises, ...).

    `sources` maps a config key (init_from, reward_from) to what `source_record` gives, or None
    where the key names nothing. The paths may differ (init_from and reward_from are in
    RESUMABLE_CHANGES: a workdir may move); the source's parameter fingerprint, recorded when
    the source was saved, may not. A checkpoint that predates the record is not checked.
    """
    recorded = meta.get("sources")
    if recorded is None:
        return
    for key in sorted(set(recorded) | set(sources)):
        was, now = recorded.get(key), sources.get(key)
        if not _same_source(was, now):
            raise CheckpointError(
                f"{stage_dir} holds a run that started from {key}={_describe_source(was)} but "
                f"{key} now gives {_describe_source(now)}: another checkpoint. To resume that "
                f"run point {key} at its checkpoint (the path may change, the parameters may "
                "not); to start afresh use a new --workdir (or --config.stage where the stage "
                "has one)")


def resume(ckpt, params, train: dict, data_iterator, config=None, sources=None):
    """(params, train, step) from the stage's newest checkpoint that restores, with
    `data_iterator` moved to where that run stood; the inputs unchanged and step 0 when there is
    no checkpoint yet. `params` and `train` give the structure, shapes and shardings to restore
    onto. With `config`, a checkpoint written under a different config is refused
    (check_same_config); with `sources`, one whose run started from other source checkpoints
    (check_same_sources). A damaged step is reported on stderr and the next older one used
    (`Checkpointer.restore_newest`); if none restores, a CheckpointError says so."""
    def check(meta):
        if config is not None:
            check_same_config(meta, config, ckpt.directory)
        if sources is not None:
            check_same_sources(meta, sources, ckpt.directory)

    # A LoRA model's params (and a model's in `train`, RL's critic) restore as what was
    # saved of them (`saved_part`) into the frozen base they were made with.
    out = ckpt.restore_newest(params=checkpoint.abstract(saved_part(params)),
                              train=checkpoint.abstract({k: saved_part(v)
                                                         for k, v in train.items()}),
                              check=check)
    if out is None:
        return params, train, 0
    saved_params, saved_train, meta = out

    def join(full, saved):
        return model.with_trainable_part(full, saved) if model.has_adapters(full) else saved

    data_iterator.set_state(meta["data_state"])
    return (join(params, saved_params), {k: join(v, saved_train[k]) for k, v in train.items()},
            meta["step"])


def place_batch(batch: dict, mesh, rules) -> dict:
    """The numeric arrays of a host batch, placed on the mesh (batch axis over data x fsdp)."""
    return sharding.shard_batch({k: np.asarray(v) for k, v in batch.items()}, mesh, rules)


# ---------------------------------------------------------------------------------------------
# Tokenizer and data
# ---------------------------------------------------------------------------------------------

def tokenizer_to_meta(tok) -> dict:
    return tokenizer_lib.to_meta(tok)


def tokenizer_from_meta(meta: dict):
    return tokenizer_lib.from_meta(meta)


def testbed() -> synthetic.Testbed:
    """The review testbed with its default settings (deterministic; built once per process)."""
    return sources.testbed()


def source(data) -> sources.Source:
    """The data source `data.source` names (rlhf_jax/data/sources.py)."""
    return sources.get(data.source)


def gold(data, tok) -> sources.Gold | None:
    """What evaluations report as the truth for a model with tokenizer `tok` on this data:
    the review testbed's r* (for its own token ids), the arithmetic task's exact match, or
    None (a dataset without one)."""
    return source(data).gold(tok)


def data_source(data, kind: str, split: str, workdir: Path):
    """A random-access source of `kind` records ("sft", "prompts", "pairs", "rankings") for
    `split`, from the registered data source `data.source` (sources.py). Every process of a
    multi-host run may call this at once on a shared workdir: `builders.prepare` lets the first
    prepare a testbed while the others wait for it."""
    return source(data).records(data, kind, split, workdir)


GOLD_FIELDS = ("gold_chosen", "gold_rejected")


def gold_fields(source) -> tuple[str, ...]:
    """The gold-reward fields the pair records of `source` carry (the testbed's do; HH-RLHF's
    and TL;DR's do not): what an evaluation can compare a model's preferences with. Read off
    the first record, so a trainer asks the data, not which source it came from."""
    if not len(source):
        return ()
    first = source[0]
    return GOLD_FIELDS if hasattr(first, "keys") and all(k in first for k in GOLD_FIELDS) \
        else ()


def check_data(data, *, batch_size: int) -> None:
    """The data fields that only make sense together, checked when the config is read: a TFDS
    source names its dataset; prompts fit the buckets with room for a response (the checks of
    batching.BatchConfig, under the config's own names)."""
    require(source(data).generated or bool(data.name),
            f"data.source={data.source!r} needs data.name: the prepared dataset to read (see "
            "docs/data.md)")
    try:
        batch_config(data, batch_size=batch_size, seed=0)
    except ConfigError as e:
        raise ConfigError(str(e).replace("batching: ", "data.", 1)) from None


def check_micro_batches(config, rows: int, what: str) -> None:
    """config.micro_batches must divide the rows of a batch (`what` names that setting)."""
    k = config.micro_batches
    require(rows % k == 0,
            f"micro_batches={k} does not divide {what}={rows}; use one of "
            f"{[d for d in range(1, rows + 1) if rows % d == 0]}")


def batch_config(data, *, batch_size: int, seed: int, shuffle: bool = True,
                 num_epochs=None, drop_remainder: bool = True, packing: bool = False,
                 pack_rows_multiple: int = 1) -> batching.BatchConfig:
    return batching.BatchConfig(batch_size=batch_size, buckets=tuple(data.buckets),
                                max_prompt_len=int(data.max_prompt_len), seed=seed,
                                shuffle=shuffle, num_epochs=num_epochs,
                                drop_remainder=drop_remainder, packing=packing,
                                pack_rows_multiple=pack_rows_multiple)


def refuse_packing(config, why: str) -> None:
    """A stage (or a setting of it) that cannot train on packed rows refuses data.packing=true,
    saying why."""
    require(not config.data.get("packing", False),
            f"data.packing=true is not supported {why}; set data.packing=false")


def pack_rows_multiple(config, mesh, rules) -> int:
    """Packed batches' row counts are multiples of this: the mesh's batch shards times
    micro_batches, so a packed batch is placed and split as an unpacked one."""
    return int(np.lcm(batch_shards(mesh, rules)[1], int(config.get("micro_batches", 1))))


def count_padding(stats: batching.PaddingStats | None, host_batch: dict, stage: str) -> None:
    """Adds a packed training batch to `stats` (None: not packing); the first is reported."""
    if stats is not None:
        stats.add(host_batch)
        if stats.batches == 1:
            packing_report(stats, stage)


def packing_report(stats: batching.PaddingStats | None, stage: str) -> None:
    """Prints (on process 0) and logs the padding shares of packed and unpacked batches so
    far (`PaddingStats.line`); nothing when not packing."""
    if stats is None:
        return
    line = stats.line(stage)
    if jax.process_index() == 0:
        print(line, flush=True)
    logging.getLogger(__name__).info(line)


# ---------------------------------------------------------------------------------------------
# Checkpoint hand-off
# ---------------------------------------------------------------------------------------------

def stage_meta(*, config, model_cfg: model.ModelConfig, tok, extra: dict | None = None,
               sources: dict | None = None) -> dict:
    """What a checkpoint carries besides arrays: model config, tokenizer, stage config, and
    `sources`: the checkpoints the run started from ({config key: source_record or None}),
    which a resumption must match (check_same_sources)."""
    out = {"model": dataclasses.asdict(model_cfg), "tokenizer": tokenizer_to_meta(tok),
           "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
           **(extra or {})}
    if sources is not None:
        out["sources"] = sources
    return out


def source_record(stage_dir, meta: dict, params=None) -> dict:
    """What a stage records of a checkpoint it starts from: its path, step and parameter
    fingerprint (the one saved with it; computed from `params` for a checkpoint older than
    the checksums)."""
    fingerprint = meta.get("checksums", {}).get("params")
    if fingerprint is None and params is not None:
        fingerprint = checkpoint.fingerprint(params)
    return {"path": str(Path(stage_dir).absolute()), "step": int(meta["step"]),
            "params": fingerprint}


def stage_source(stage_dir, *, key: str = "init_from") -> dict:
    """source_record of a stage's latest checkpoint, read from its meta alone (no arrays), or
    of a Hugging Face checkpoint directory."""
    if hf.is_hf_dir(stage_dir):
        return hf.source_record(stage_dir)
    with checkpoint.Checkpointer(stage_dir) as ckpt:
        try:
            meta = ckpt.restore_meta()
        except CheckpointError as e:
            raise CheckpointError(f"{key}={str(stage_dir)!r}: {e}") from e
    return source_record(stage_dir, meta)


def runtime(config) -> dict:
    """The stage's runtime model options (model.remat, model.logits_chunk, model.attention):
    how to compute, which a stage chooses whatever checkpoint it loads."""
    group = config.get("model", None) or {}
    out = {k: group[k] for k in model.RUNTIME_FIELDS if k in group}
    if group.get("param_dtype"):
        # The dtype the stage stores the parameters it loads in (fields.RUNTIME_MODEL; ''
        # keeps the checkpoint's). SFT's is its architecture field, so SFT with init_from
        # stores what it loads in model.param_dtype too.
        out["param_dtype"] = group["param_dtype"]
    return out


def load_stage(stage_dir, *, kind: str = "policy", mesh=None, rules=None, seed: int = 0,
               new_head: bool = False, key: str = "init_from", runtime: dict | None = None):
    """Restores the parameters of a finished stage onto `mesh`, as a model of `kind`.

    Returns (graphdef, params, model_cfg, tokenizer, meta). With new_head=True a policy
    checkpoint loaded as kind="reward"/"value" gets the policy backbone plus a freshly
    initialised head (the reward model and critic start from the SFT model, Ouyang et al. 2022;
    Ziegler et al. 2019); otherwise the checkpoint must hold a `kind` model, so that a reward
    model is never silently replaced by a policy with a random head. `key` is the config key
    that named `stage_dir`, for the error messages. `meta["source"]` is the `source_record` of
    the checkpoint read, for the loading stage's own meta (`stage_meta(sources=...)`).

    The latest checkpoint is read and checked against its checksums; if it is damaged this
    fails with a CheckpointError naming the step and its path. It does not fall back to an
    older step as a resumption does: the next stage would silently start from another model
    than the finished one (for the reward stage, one without its normalisation).

    `stage_dir` may also be a Hugging Face checkpoint ("hf:DIR", or a directory holding a
    config.json): see `load_hf`. `runtime` replaces the saved runtime options (`runtime()`).
    """
    if hf.is_hf_dir(stage_dir):
        return load_hf(stage_dir, kind=kind, mesh=mesh, rules=rules, seed=seed,
                       new_head=new_head, key=key, runtime=runtime)
    stage_dir = Path(stage_dir)
    require(checkpoint.stage_has_checkpoint(stage_dir),
            f"{key}={str(stage_dir)!r} holds no complete checkpoint; run the stage that "
            f"writes it first, or point {key} at its directory (e.g. WORKDIR/sft)")
    with checkpoint.Checkpointer(stage_dir) as ckpt:
        try:
            step = ckpt.latest_step()
            meta = ckpt.restore_meta(step)
            # A meta written before the runtime fields (model.RUNTIME_FIELDS) lacks them:
            # their defaults are how that run computed.
            # The arrays are read as saved (their checksums are of those) and then stored in
            # the runtime's param_dtype, if it asks for another.
            runtime = dict(runtime or {})
            param_dtype = runtime.pop("param_dtype", None)
            saved_cfg = model.ModelConfig(**{**model.RUNTIME_DEFAULTS, **meta["model"],
                                             **runtime})
            saved_kind = meta.get("model_kind", "policy")
            mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
            graphdef, target = init_model(saved_cfg, kind=saved_kind, mesh=mesh, rules=rules,
                                          seed=seed, abstract_only=True)
            if "lora_base" in meta:
                adapted, _, meta = ckpt.restore(params=model.trainable_part(target), step=step)
        except CheckpointError as e:
            raise CheckpointError(f"{key}={str(stage_dir)!r}: {e}") from e
        if "lora_base" not in meta:
            try:
                params, _, meta = ckpt.restore(params=target, step=step)
            except CheckpointError as e:
                raise CheckpointError(f"{key}={str(stage_dir)!r}: {e}") from e
    if "lora_base" in meta:
        graphdef, params, saved_cfg = _merge_lora_stage(
            stage_dir, meta, adapted, saved_cfg, kind=saved_kind, mesh=mesh, rules=rules,
            seed=seed, key=key, runtime=runtime)
    if param_dtype and param_dtype != saved_cfg.param_dtype:
        saved_cfg = saved_cfg.replace(param_dtype=param_dtype)
        graphdef = init_model(saved_cfg, kind=saved_kind, mesh=mesh, rules=rules, seed=seed,
                              abstract_only=True)[0]
        params = cast_params(params, param_dtype)
    meta["source"] = source_record(stage_dir, meta, params)
    tok = tokenizer_from_meta(meta["tokenizer"])
    if saved_kind == kind:
        return graphdef, params, saved_cfg, tok, meta
    where = {"reward": "the reward-model stage (e.g. WORKDIR/rm)",
             "policy": "a policy stage (e.g. WORKDIR/sft, or a DPO or PPO stage)",
             "value": "a policy or reward-model stage"}[kind]
    require(new_head and saved_kind == "policy" and kind in ("reward", "value"),
            f"{key}={str(stage_dir)!r} holds a {saved_kind} checkpoint, not a {kind} model; "
            f"point {key} at {where}")
    graphdef, head_params = init_model(saved_cfg, kind=kind, mesh=mesh, rules=rules, seed=seed)
    params = model.init_head_model_from_policy(head_params=head_params, policy_params=params)
    return graphdef, params, saved_cfg, tok, meta


def _merge_lora_stage(stage_dir, meta, adapted, cfg, *, kind, mesh, rules, seed, key, runtime):
    """A LoRA stage as plain weights: its base (`lora_base`, loaded as a `kind` model) with the
    saved trainable part put in and W + A @ B * alpha / r merged into every adapted kernel.
    Returns (graphdef, params, cfg) of the model without adapters."""
    base = meta["lora_base"]
    require(base is not None, f"{key}={str(stage_dir)!r}: a LoRA stage without a base")
    # The base as this stage trained on it: in the stage's own param_dtype.
    graphdef, params, _, _, base_meta = load_stage(
        base["path"], kind=kind, mesh=mesh, rules=rules, seed=seed, new_head=True,
        key=f"{key} (LoRA base of {stage_dir})",
        runtime={**(runtime or {}), "param_dtype": cfg.param_dtype})
    if not _same_source(base, base_meta["source"]):
        raise CheckpointError(
            f"{key}={str(stage_dir)!r} holds LoRA adapters of {_describe_source(base)}, but that "
            f"directory now holds {_describe_source(base_meta['source'])}; the adapters only "
            "make sense on the weights they were trained on: restore that checkpoint")

    full = _with_adapters(nnx.to_pure_dict(params), adapted)
    merged, plain = model.merge_adapters(full, cfg)
    graphdef = init_model(plain, kind=kind, mesh=mesh, rules=rules, seed=seed,
                          abstract_only=True)[0]
    new = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(new, merged)
    # Merged kernels keep the layout of the base kernels they replace.
    return graphdef, jax.tree.map(lambda x, b: jax.device_put(x, b.sharding), new, params), plain


def _with_adapters(full: dict, part: dict) -> dict:
    """Nested dict `full` with every entry of `part` set (new adapter keys added)."""
    out = dict(full)
    for k, v in part.items():
        out[k] = _with_adapters(full.get(k, {}), v) if isinstance(v, dict) else v
    return out


def load_hf(path, *, kind: str = "policy", mesh=None, rules=None, seed: int = 0,
            new_head: bool = False, key: str = "init_from", runtime: dict | None = None):
    """`load_stage` for a Hugging Face checkpoint directory: float32 master weights (or the
    runtime's param_dtype) computing in the checkpoint's own dtype, read straight onto the
    mesh (`hf.load`).

    kind="policy": a causal LM. kind="reward": a *ForSequenceClassification checkpoint's
    score head; with new_head=True a causal LM's backbone with a fresh head is accepted too.
    kind="value" (new_head=True): the backbone with a zero value head. meta carries the
    `hf.source_record` of the directory as its "source", step 0 and the model kind.
    """
    directory = hf.strip_prefix(path)
    shown = f"{key}={str(path)!r}"
    mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
    try:
        c = hf.read_config(directory)
        scored = hf.has_score_head(directory)
        require(kind != "reward" or new_head or scored,
                f"{shown} is a causal LM checkpoint with no reward head (score.weight); give "
                "a *ForSequenceClassification checkpoint or a reward stage directory")
        load_kind = "policy" if kind == "policy" else "reward"
        # bf16 checkpoints compute in bf16; float16 ones in float32 (fp16 training would need
        # loss scaling, which the trainers do not do).
        compute = "bfloat16" if hf.checkpoint_dtype(c) == "bfloat16" else "float32"
        graphdef, params, cfg, tok = hf.load(directory, kind=load_kind, dtype="float32",
                                             compute_dtype=compute, mesh=mesh, rules=rules,
                                             seed=seed)
        if runtime:      # how to compute: the same parameters under another graphdef
            cfg = cfg.replace(**runtime)
            graphdef = init_model(cfg, kind=load_kind, mesh=mesh, rules=rules, seed=seed,
                                  abstract_only=True)[0]
            if runtime.get("param_dtype"):      # and how to store them
                params = cast_params(params, runtime["param_dtype"])
    except (ConfigError, CheckpointError) as e:       # a DataError names its file already
        message = str(e)
        raise type(e)(message if message.startswith(shown) else f"{shown}: {message}") \
            from None
    meta = {"source": hf.source_record(directory), "step": 0, "model_kind": kind,
            "hf_config": c}
    if kind == "value":
        graphdef, params = value_from_reward((graphdef, params, cfg, tok, meta), mesh=mesh,
                                             rules=rules, seed=seed)
    return graphdef, params, cfg, tok, meta


def cast_params(params, dtype):
    """The floating-point parameters of `params` stored in `dtype` (same layout)."""
    dt = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        params)


def value_from_reward(reward, *, mesh, rules, seed: int = 0):
    """A critic (graphdef, params): the reward model's backbone and a zero-initialised value head.

    `reward` is what `load_stage(..., kind="reward")` returns.
    """
    _, rm_params, cfg, _, _ = reward
    graphdef, value_params = init_model(cfg, kind="value", mesh=mesh, rules=rules, seed=seed)
    value_params["backbone"] = jax.tree.map(jnp.copy, rm_params["backbone"])
    return graphdef, value_params


def init_model(cfg: model.ModelConfig, *, kind: str, mesh, rules, seed: int,
               abstract_only: bool = False):
    """(graphdef, params) initialised directly in the sharded layout (or its abstract shape)."""
    make = lambda: model.build(cfg, seed=seed, kind=kind)  # noqa: E731
    if abstract_only:
        from flax import nnx
        graphdef, abstract = nnx.split(nnx.eval_shape(make))
        shardings = sharding.param_shardings(abstract, mesh, rules)
        return graphdef, jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return sharding.init_sharded(make, mesh=mesh, rules=rules)


def sequence_logps(graphdef, params, tokens, mask, loss_mask, *, temperature: float = 1.0,
                   with_entropy: bool = False, packed: dict | None = None):
    """Per-token log-probs of tokens[:, 1:] under the policy (`model.target_logprobs`: chunked
    over positions when the model's cfg.logits_chunk > 0, so no [B, T, V] logits are held).
    packed: `packed_inputs(batch)` of a packed batch (segment ids and positions), else None.

    Returns (logps [B, T-1] zero outside loss_mask[:, 1:], entropy [B, T-1] with
    with_entropy, else None).
    """
    return model.target_logprobs(graphdef, params, tokens, tokens[:, 1:], loss_mask[:, 1:],
                                 mask_bt=mask, temperature=temperature,
                                 with_entropy=with_entropy, **(packed or {}))


def packed_inputs(batch: dict) -> dict | None:
    """The model inputs of a packed batch (batching.collate_packed): {segment_ids_bt,
    positions_bt}; None for an unpacked one."""
    if "segment_ids" not in batch:
        return None
    return {"segment_ids_bt": batch["segment_ids"], "positions_bt": batch["positions"]}


def per_sequence(values_bt, batch: dict):
    """Sums over each packed sequence of values [R, T-1] aligned with tokens[:, 1:] (a token's
    log-prob sits one column left of it): [N] in the unpacked order (batch["read_at"] has N
    entries). A padding token's index N falls outside and is dropped."""
    n = batch["read_at"].shape[0]
    index = batch["seq_index"][:, 1:]
    return jax.ops.segment_sum(values_bt.reshape(-1), index.reshape(-1), num_segments=n)


# ---------------------------------------------------------------------------------------------
# Guarded optimizer step
# ---------------------------------------------------------------------------------------------

def init_guard() -> dict:
    """State of the non-finite guard: the first bad step (-1: none) and its loss / grad norm."""
    return {"bad_step": jnp.int32(-1), "bad_loss": jnp.float32(0), "bad_grad_norm": jnp.float32(0)}


def guarded_apply(optimizer, params, opt_state, grads, loss, guard, step):
    """One optimizer update that is skipped when the loss or the gradient norm is not finite.

    The step index and values of the first bad step are recorded in `guard`, which the trainer
    inspects whenever it syncs with the host anyway (logging, checkpointing) and raises from
    (`raise_if_bad`). So the inner loop never waits on the host, and the parameters that reach a
    checkpoint are never the product of a NaN update.
    Returns (params, opt_state, guard, grad_norm).
    """
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    first_bad = (~ok) & (guard["bad_step"] < 0)
    guard = {"bad_step": jnp.where(first_bad, jnp.int32(step), guard["bad_step"]),
             "bad_loss": jnp.where(first_bad, jnp.float32(loss), guard["bad_loss"]),
             "bad_grad_norm": jnp.where(first_bad, grad_norm, guard["bad_grad_norm"])}
    # Parameters, moments and guard leave in the layout they are declared in (on a mesh; see
    # sharding.constrain_state), so the next step reuses this compilation.
    new_params, new_opt_state, guard = sharding.constrain_state(
        (keep(new_params, params), keep(new_opt_state, opt_state), guard))
    return new_params, new_opt_state, guard, grad_norm


def raise_if_bad(guard, last_values: dict | None = None):
    """Raises NonFiniteError if the guard recorded a non-finite step (one host transfer)."""
    g = jax.device_get(guard)
    if int(g["bad_step"]) >= 0:
        raise NonFiniteError(
            f"non-finite loss or gradient at step {int(g['bad_step']) + 1} (loss "
            f"{float(g['bad_loss'])}, grad norm {float(g['bad_grad_norm'])}); that update was "
            f"not applied and the last good checkpoint is kept. Last logged metrics: "
            f"{last_values}. Lower the learning rate or check the data, then re-run to resume")
