"""Direct preference optimisation (DPO, cDPO, IPO, SimPO, ORPO, ..., KTO) from an SFT checkpoint.

    stage_dir = preference.train(config, workdir)   # writes workdir/<config.stage>/, returns it

The policy and a frozen reference both start from the SFT stage (`config.init_from`; when it
is empty, `workdir/sft`). `config.pref_loss` is a registry spec ("dpo(beta=0.1)",
"ipo(tau=0.1)", "simpo", ...): changing that string is the whole ablation. The trainer hands
every loss the same inputs and the registry passes each the subset it declares:

    policy_chosen_logps, policy_rejected_logps   [B] summed completion log-probs
    ref_chosen_logps, ref_rejected_logps         [B] the same under the frozen reference
    chosen_lengths, rejected_lengths             [B] number of completion tokens
    chosen_nll                                   [B] mean token NLL of the chosen completion

With `config.lora` the policy trains LoRA adapters on the frozen SFT weights, and the
reference is the policy with its adapters off (`model.adapters_off`): one copy of the weights,
the reference log-probs those of the SFT model bitwise (docs/model.md, "LoRA").

Chosen and rejected go through one forward pass (the [2B, T] pair batch, chosen rows first).
The reference log-probs are computed once per batch inside the jitted step but outside the
gradient, and not at all for reference-free losses (SimPO, ORPO). Rows with valid=0 (padding
of a final partial batch) carry zero weight. With data.packing=true (paired losses only) the
chosen and rejected sequences are packed into rows and the [B] inputs above are per-segment
sums (docs/data.md, "Sequence packing").

KTO on unpaired rows (Ethayarajh et al. 2024). A name registered under the kind `unpaired_loss`
(`pref_loss="kto(beta=0.1)"`) trains on unpaired rows instead of pairs: each a prompt, one
completion and a desirable flag, read from records of that form (`data.kind="unpaired"`,
docs/data.md) or from pairs split into rows (`data.split_pairs=True`: each pair a desirable row
of its chosen completion and an undesirable row of its rejected one; the testbed has pairs
only). `data.batch_size` then counts rows. The loss reads

    policy_logps, ref_logps          [B] summed completion log-probs, policy and reference
    desirable                        [B] 1 for a desirable completion, 0 otherwise
    kl_policy_logps, kl_ref_logps    [B] the same for the mismatched rows (prompt b with the
    kl_weights                           completion of the row before it; batching.py)

The mismatched rows cost one extra forward pass of the [B, T] batch under the policy and one
under the reference, both outside the gradient: KTO's reference point z0 = max(0, mean of their
log-ratios) estimates KL(pi || pi_ref) and is a constant of the step. Each step also logs
pref/desirable_logratio and pref/undesirable_logratio (mean log pi/pi_ref of each kind of row).
A paired loss on unpaired rows, an unpaired loss on pairs that are not split, or unpaired
records from a source that has none is refused when the config is read.

Re-running in the same workdir resumes from the latest checkpoint and ends with the same
parameters as an uninterrupted run. The checkpoint meta says model_kind="policy", so a DPO
policy loads and evaluates like any other policy (`common.load_stage`).

At the end: the loss's implicit-reward accuracy and margin on the test pairs (and, on the
testbed, their agreement with the gold ordering), then on the testbed a generation eval that
samples from the trained policy and from the reference on the same held-out prompts with the
same random numbers and reports gold reward (`gold/reward`, `gold/ref_reward`, `gold/gain`,
`gold/gain_in_ref_std`) and the sequence KL to the reference (`objective/kl`). For unpaired
rows the test eval is the loss's metrics on the test rows (shuffled, so that a batch mixes
desirable and undesirable rows), each batch with its own z0: eval/pref_accuracy is then the
share of rows on their side of z0 (r - z0 > 0 for desirable rows, < 0 for undesirable ones).
"""

import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import checkpoint, evaluation, losses, metrics as metrics_lib, model, registry
from rlhf_jax import rewards as rewards_lib, schema, sharding
from rlhf_jax.data import batching
from rlhf_jax.errors import ConfigError
from rlhf_jax.trainers import accumulate, common, fields

STAGE = "dpo"


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stage = STAGE             # the stage directory under workdir
    c.init_from = ""            # the SFT stage directory; "" = workdir/sft
    c.pref_loss = "dpo(beta=0.2)"
    c.lora = ""                 # LoRA adapters, e.g. "lora(rank=16)": the reference is the base
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules={}, distributed=False))
    # How to compute (memory, not architecture; docs/scaling.md): applied to every model loaded.
    c.model = ml_collections.ConfigDict(fields.RUNTIME_MODEL_DEFAULTS)
    # Pairs: the testbed's Bradley-Terry-labelled pairs (tau = label noise temperature).
    # Testbed rows are at most 9 prompt + 24 completion tokens, so one bucket of 36 (as in the
    # SFT and reward stages) never truncates (docs/testbed.md). kind="unpaired" reads unpaired
    # rows, split_pairs=True reads pairs as unpaired rows (both for an unpaired loss: KTO).
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", name="", data_dir="", format="plain", kind="pairs",
        split_pairs=False, n_train=10_000, n_test=1_000, seed=0, tau=1.0, flip_rate=0.0,
        buckets=(36,), max_prompt_len=12, batch_size=32, packing=False))
    # Tuned on the default testbed SFT model (see experiments/dpo.py, which lists the runs):
    # with beta 0.2, 32 pairs at lr 5e-4 for 80 steps gain ~0.65 SFT std at KL ~4; with beta
    # 0.1, comparable budgets reached KL 4.9-13 for gains of -0.08 to 0.69 std.
    c.optim = common.optim_config(lr=5e-4, warmup_steps=10, schedule="constant")
    c.steps = 80
    c.micro_batches = 1         # gradient accumulation (trainers/accumulate.py); 1 = off
    c.log_every = 10
    c.save_every = 40
    c.keep = 2
    c.eval_batches = 32         # test-pair batches for the preference eval; 0 = skip
    # Generation eval (testbed only): held-out prompts, completions sampled at temperature.
    c.gen = ml_collections.ConfigDict(dict(
        n_prompts=512, batch_size=128, prompt_len=16, max_new_tokens=24, temperature=1.0))
    return c


# ---------------------------------------------------------------------------------------------
# Pieces (pure functions of arrays; the trainer below wires them up)
# ---------------------------------------------------------------------------------------------

# The registry kinds config.pref_loss may name, and the rows their losses train on (the batching
# kind): the kind a name is registered under picks the trainer's path (`PATHS` below).
LOSS_KINDS = {"pref_loss": "pairs", "unpaired_loss": "unpaired"}


def resolve_loss(spec: str) -> tuple[str, Callable]:
    """(registry kind, function with its arguments bound) of a config.pref_loss string."""
    name, _ = registry.parse(spec)
    kinds = [k for k in LOSS_KINDS if name in registry.names(k)]
    if len(kinds) != 1:
        listed = "; ".join(f"{', '.join(registry.names(k))} ({LOSS_KINDS[k]})"
                           for k in LOSS_KINDS)
        raise ConfigError(f"{'unknown' if not kinds else 'ambiguous'} preference loss "
                          f"{name!r}; registered: {listed}")
    return kinds[0], registry.get(kinds[0], spec)


class _LossField(schema.Field):
    """config.pref_loss: a registry spec of a pref_loss (pairs) or an unpaired_loss (unpaired
    rows). Its kind stays "spec" of pref_loss, so --help lists those functions' arguments."""

    def describe(self) -> str:
        kinds = " or ".join(f"{k} ({LOSS_KINDS[k]}: {', '.join(registry.names(k))})"
                            for k in LOSS_KINDS)
        return f"the name of a registered {kinds}, or 'name(arg=value)'"

    def problem(self, value) -> str | None:
        if not isinstance(value, str):
            return f"must be {self.describe()}"
        try:
            resolve_loss(value)
        except ValueError as e:
            return str(e)
        return None


REFERENCE_INPUTS = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "kl_ref_logps")


def needs_reference(loss_fn) -> bool:
    """Whether the loss reads reference log-probs; if not, no reference pass is traced."""
    return any(registry.accepts(loss_fn, name) for name in REFERENCE_INPUTS)


def pair_logps(graphdef, params, batch):
    """Summed completion log-probs of the [2B, T] pair batch, split into chosen and rejected.

    Returns (chosen [B], rejected [B], chosen token NLL mean [B], chosen lengths [B],
    rejected lengths [B]). Lengths count completion tokens (eos included), the |y| of the
    length-normalised losses (SimPO, ORPO, IPO). A packed batch (data.packing) gives the same
    [2B] sums, each over its own segment (`common.per_sequence`).
    """
    packed = common.packed_inputs(batch)
    logps_bt, _ = common.sequence_logps(graphdef, params, batch["tokens"], batch["mask"],
                                        batch["loss_mask"], packed=packed)
    target_mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    if packed is None:
        seq = jnp.sum(logps_bt, axis=-1)                                  # [2B]
        lengths = jnp.sum(target_mask, axis=-1)
    else:
        seq = common.per_sequence(logps_bt, batch)                        # [2B]
        lengths = common.per_sequence(target_mask, batch)
    b = seq.shape[0] // 2
    chosen_nll = -seq[:b] / jnp.maximum(lengths[:b], 1.0)
    return seq[:b], seq[b:], chosen_nll, lengths[:b], lengths[b:]


def row_logps(graphdef, params, tokens, mask, loss_mask):
    """Summed completion log-probs [B] of right-padded rows [B, T] (unpaired rows)."""
    logps_bt, _ = common.sequence_logps(graphdef, params, tokens, mask, loss_mask)
    return jnp.sum(logps_bt, axis=-1)


def reference_logps(graphdef, ref_params, batch):
    """Reference (chosen [B], rejected [B]) summed log-probs; constants for the gradient."""
    chosen, rejected, *_ = pair_logps(graphdef, jax.lax.stop_gradient(ref_params), batch)
    return jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)


def per_pair(loss_fn, **inputs):
    """The loss and each of its metrics for every pair alone: (loss [B], {name: [B]}).

    Training calls the loss on the whole batch (the batch contract in losses.py); this is for
    the evaluation, which needs each pair's implicit-reward margin (its sign against the gold
    order). For a loss with a batch statistic each pair is then scored with the statistic of
    that pair alone. Inputs: [B] each.
    """
    def one(kw):
        return registry.call(loss_fn, **{k: v[None] for k, v in kw.items()})

    return jax.vmap(one)(inputs)


def metric_prefix(metrics: dict) -> str:
    """The loss's namespace ("dpo", "ipo", ...), read off its "<prefix>/margin" metric."""
    return next(k.split("/")[0] for k in metrics if k.endswith("/margin"))


# ---------------------------------------------------------------------------------------------
# Compiled steps, shared by every run in a process that has the same model, loss and optimizer
# (a sweep in a notebook, the tests): jax.jit caches per function object, so building the
# closures once per key saves recompiling them on every `train` call.
# ---------------------------------------------------------------------------------------------

_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))  # one program, not one per leaf


@functools.lru_cache(maxsize=16)
def _optimizer(optim_items: tuple, steps: int, lora: bool = False):
    return common.make_optimizer(ml_collections.ConfigDict(dict(optim_items)), steps, lora=lora)


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, loss_fn, optimizer, use_ref: bool, loss_kind: str = "pref_loss",
              micro_batches: int = 1):
    """(update, eval_terms, init_opt), jitted, for a loss registered under `loss_kind`."""
    return PATHS[loss_kind].steps(graphdef, loss_fn, optimizer, use_ref, micro_batches)


def _pair_steps(graphdef, loss_fn, optimizer, use_ref: bool, micro_batches: int = 1):
    """The steps of a pref_loss on the [2B, T] pair batch.

    update(params, opt_state, guard, ref_params, batch, step) -> (params, opt_state, guard,
    metrics): one guarded optimizer step, params and opt_state donated. eval_terms(params,
    ref_params, batch) -> (loss [B], metrics {name: [B]}) per pair. ref_params is None for a
    reference-free loss, whose reference pass is then never traced.
    """
    def reference_inputs(ref_params, batch):
        if not use_ref:
            return {}
        # Looked up as a module global so a test can count how often it is traced.
        ref_c, ref_r = globals()["reference_logps"](graphdef, ref_params, batch)
        return dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)

    def inputs(params, ref_inputs, batch):
        chosen, rejected, chosen_nll, len_c, len_r = pair_logps(graphdef, params, batch)
        return dict(policy_chosen_logps=chosen, policy_rejected_logps=rejected,
                    chosen_lengths=len_c, rejected_lengths=len_r, chosen_nll=chosen_nll,
                    **ref_inputs)

    def loss_on(params, ref_inputs, batch):
        # The loss sees the whole batch (losses.py, "The preference-loss batch contract"):
        # padding pairs have weight 0, and a batch statistic (BCO's shift, AOT's ranks) is
        # the whole batch's.
        return registry.call(loss_fn, **inputs(params, ref_inputs, batch),
                             weights=batch["valid"])

    def pair_terms(params, ref_inputs, batch):
        # Per-pair values for the evaluation's per-pair margins (gold agreement): each pair
        # alone, which for a loss with a batch statistic is the statistic of that pair.
        return per_pair(loss_fn, **inputs(params, ref_inputs, batch))

    def micro_grads(params, ref_params, batch):
        """The whole batch's loss, metrics and gradient from micro-batches (accumulate.py):
        each micro-batch's loss weighted by its share of the batch's weight, reference
        log-probs per micro-batch, and a batch statistic computed once over the whole batch
        (one extra forward pass without gradient) and passed to every micro-batch."""
        rows = batch["valid"].shape[0]
        micro = accumulate.split(batch, micro_batches, rows)
        total = jnp.sum(jnp.where(batch["valid"] > 0, batch["valid"], 0).astype(jnp.float32))
        stat = {}
        if losses.has_batch_statistic(loss_fn):
            per_micro = jax.lax.map(lambda mb: jax.lax.stop_gradient(inputs(
                params, reference_inputs(ref_params, mb), mb)), micro)
            whole = jax.tree.map(lambda x: x.reshape((rows,) + x.shape[2:]), per_micro)
            stat = {"reference_point": losses.batch_reference_point(
                loss_fn, **whole, weights=micro["valid"].reshape(rows))}

        def share(params, mb):
            loss, m = registry.call(loss_fn, **inputs(params, reference_inputs(ref_params, mb),
                                                      mb), weights=mb["valid"], **stat)
            w = accumulate.weight_share(mb["valid"], total)
            return loss * w, jax.tree.map(lambda v: v * w, m)

        return accumulate.grads(share, params, micro)

    def update(params, opt_state, guard, ref_params, batch, step):
        if micro_batches == 1:
            # Reference log-probs once per batch, before and outside the gradient.
            ref_inputs = reference_inputs(ref_params, batch)
            (loss, m), grads = jax.value_and_grad(loss_on, has_aux=True)(params, ref_inputs,
                                                                         batch)
        else:
            (loss, m), grads = micro_grads(params, ref_params, batch)
        params, opt_state, guard, grad_norm = common.guarded_apply(
            optimizer, params, opt_state, grads, loss, guard, step)
        return params, opt_state, guard, {**m, "pref/loss": loss, "pref/grad_norm": grad_norm}

    def eval_terms(params, ref_params, batch):
        return pair_terms(params, reference_inputs(ref_params, batch), batch)

    return common.jit_update(update), jax.jit(eval_terms), optimizer.init


def _logratio_means(logratio, desirable, valid):
    """Mean log pi/pi_ref over the real desirable rows and over the real undesirable ones (0
    where there are none): what KTO raises and lowers."""
    real = valid > 0
    out = {}
    for name, rows in (("desirable", real & (desirable > 0)),
                       ("undesirable", real & (desirable <= 0))):
        out[f"pref/{name}_logratio"] = (jnp.sum(jnp.where(rows, logratio, 0.0))
                                        / jnp.maximum(jnp.sum(rows), 1))
    return out


def _unpaired_steps(graphdef, loss_fn, optimizer, use_ref: bool, micro_batches: int = 1):
    """The steps of an unpaired_loss on unpaired rows (batching kind "unpaired"), with the
    signatures of `_pair_steps`, except that eval_terms returns the loss's metrics on the
    whole batch (its z0 is a statistic of the batch: a row alone has none)."""
    use_kl = registry.accepts(loss_fn, "kl_policy_logps")

    def constants(params, ref_params, batch):
        # Everything the loss reads but the policy's own log-probs, outside the gradient: the
        # reference's log-probs and, for KTO's z0, the mismatched rows' under the policy and
        # the reference (one extra [B, T] forward pass each).
        rows = (batch["tokens"], batch["mask"], batch["loss_mask"])
        kl_rows = (batch["kl_tokens"], batch["kl_mask"], batch["kl_loss_mask"])
        out = {}
        if use_ref:
            out["ref_logps"] = row_logps(graphdef, ref_params, *rows)
        if use_kl:
            out["kl_policy_logps"] = row_logps(graphdef, params, *kl_rows)
            out["kl_ref_logps"] = row_logps(graphdef, ref_params, *kl_rows)
            out["kl_weights"] = batch["kl_valid"]
        return jax.lax.stop_gradient(out)

    def loss_on(params, consts, batch):
        policy = row_logps(graphdef, params, batch["tokens"], batch["mask"], batch["loss_mask"])
        loss, m = registry.call(loss_fn, policy_logps=policy, desirable=batch["desirable"],
                                weights=batch["valid"], **consts)
        return loss, (m, policy)

    def micro_grads(params, consts, batch):
        """The whole batch's loss and gradient from micro-batches (accumulate.py): z0 from
        the whole batch (its policy log-probs in one extra pass without gradient), each
        micro-batch's loss weighted by its share of the batch's rows."""
        rows = batch["valid"].shape[0]
        keys = ("tokens", "mask", "loss_mask", "desirable", "valid")
        stat = {}
        if losses.has_batch_statistic(loss_fn):
            policy = jax.lax.stop_gradient(row_logps(graphdef, params, batch["tokens"],
                                                     batch["mask"], batch["loss_mask"]))
            stat = {"reference_point": losses.batch_reference_point(
                loss_fn, policy_logps=policy, desirable=batch["desirable"],
                weights=batch["valid"], **consts)}
        micro = accumulate.split({**{k: batch[k] for k in keys}, **consts}, micro_batches,
                                 rows)
        total = jnp.sum(jnp.where(batch["valid"] > 0, batch["valid"], 0).astype(jnp.float32))

        def share(params, mb):
            extra = {k: mb[k] for k in consts if k in mb}
            loss, (m, policy) = loss_on(params, {**extra, **stat}, mb)
            w = accumulate.weight_share(mb["valid"], total)
            if use_ref:
                m = {**m, **_logratio_means(policy - mb["ref_logps"], mb["desirable"],
                                            mb["valid"])}
            return loss * w, jax.tree.map(lambda v: v * w, m)

        return accumulate.grads(share, params, micro)

    def update(params, opt_state, guard, ref_params, batch, step):
        consts = constants(params, ref_params, batch)
        if micro_batches > 1:
            (loss, m), grads = micro_grads(params, consts, batch)
        else:
            (loss, (m, policy)), grads = jax.value_and_grad(loss_on, has_aux=True)(
                params, consts, batch)
            if use_ref:
                m = {**m, **_logratio_means(policy - consts["ref_logps"], batch["desirable"],
                                            batch["valid"])}
        params, opt_state, guard, grad_norm = common.guarded_apply(
            optimizer, params, opt_state, grads, loss, guard, step)
        return params, opt_state, guard, {**m, "pref/loss": loss, "pref/grad_norm": grad_norm}

    def eval_terms(params, ref_params, batch):
        return loss_on(params, constants(params, ref_params, batch), batch)[1][0]

    return common.jit_update(update), jax.jit(eval_terms), optimizer.init


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

SCHEMA = {
    "size": fields.SIZE, "seed": fields.SEED,
    "stage": schema.Str(nonempty=True, doc="the stage directory under WORKDIR"),
    "init_from": schema.Str(doc="the SFT stage directory (policy init and reference); "
                                "'' = WORKDIR/sft"),
    "pref_loss": _LossField("spec", registry_kind="pref_loss",
                            doc="the loss; its registry kind says which rows it trains on"),
    "lora": fields.LORA,
    "mesh": fields.MESH,
    "model": fields.RUNTIME_MODEL,
    "data": fields.data(kind=fields.PREF_DATA_KIND, split_pairs=fields.SPLIT_PAIRS,
                        tau=fields.TAU, flip_rate=fields.FLIP_RATE,
                        batch_size=fields.BATCH_SIZE),
    "optim": fields.OPTIM,
    **fields.loop(),
    "micro_batches": fields.MICRO_BATCHES,
    "eval_batches": schema.Int(ge=0, doc="held-out pair (or row) batches for the preference "
                                         "eval; 0 = skip"),
    "gen": {
        "n_prompts": schema.Int(ge=0, doc="held-out prompts sampled for the gold-reward and "
                                          "KL eval (testbed only); 0 = skip"),
        "batch_size": schema.Int(ge=1),
        "prompt_len": schema.Int(ge=1),
        "max_new_tokens": schema.Int(ge=1),
        "temperature": schema.Float(gt=0),
    },
}


def validate(config):
    """The checks that need no files or devices (the pipeline runs them all before training)."""
    schema.check(config, SCHEMA)
    common.check_data(config.data, batch_size=config.data.batch_size)
    check_rows(config)
    common.check_micro_batches(config, config.data.batch_size, "data.batch_size")
    if resolve_loss(config.pref_loss)[0] != "pref_loss":
        common.refuse_packing(config, f"with pref_loss={config.pref_loss!r}: its unpaired rows "
                                      "come with mismatched KL rows built row by row, which "
                                      "are not packed")
    if config.micro_batches > 1:
        common.refuse_packing(config, f"with micro_batches={config.micro_batches}: a packed "
                                      "batch holds pairs across rows, which micro-batches "
                                      "would cut apart")
    common.require(config.micro_batches == 1 or losses.splits(resolve_loss(config.pref_loss)[1]),
                   f"pref_loss={config.pref_loss!r} pairs rows across the whole batch, so "
                   "micro-batches do not add up to it; set micro_batches=1")


# How to get the rows a loss trains on, for the one-line error when the data gives the others.
_GET_ROWS = {
    "pairs": "use a paired loss with pair records (data.kind='pairs', data.split_pairs=False)",
    "unpaired": "set data.split_pairs=True to split each pair into a desirable and an "
                "undesirable row, or read unpaired records (data.kind='unpaired')",
}


def check_rows(config) -> None:
    """The loss, the records and the split of pairs agree: a paired loss trains on pairs, an
    unpaired loss (KTO) on unpaired rows, which the data source must be able to supply."""
    data = config.data
    common.require(not (data.split_pairs and data.kind != "pairs"),
                   f"data.split_pairs=True splits pair records, but data.kind={data.kind!r} "
                   "records are unpaired rows already; set data.split_pairs=False")
    have = common.source(data).kinds       # None: whatever a prepared dataset holds
    common.require(have is None or data.kind in have,
                   f"data.kind={data.kind!r}: data.source={data.source!r} has no {data.kind} "
                   f"records (it has {', '.join(have or ())}); read them from a prepared TFDS "
                   "dataset (data.source='tfds')" + (
                       ", or split its pairs into rows (data.kind='pairs', "
                       "data.split_pairs=True)" if have and "pairs" in have else ""))
    rows = LOSS_KINDS[resolve_loss(config.pref_loss)[0]]
    given = "unpaired" if data.kind == "unpaired" or data.split_pairs else "pairs"
    split = " with data.split_pairs=True" if data.split_pairs else ""
    common.require(given == rows,
                   f"pref_loss={config.pref_loss!r} trains on {rows} rows, but "
                   f"data.kind={data.kind!r}{split} gives {given} rows; {_GET_ROWS[rows]}")


@common.stage
def train(config, workdir) -> Path:
    workdir = Path(workdir)
    stage_dir = workdir / config.stage
    init_from = Path(config.init_from) if config.init_from else workdir / "sft"

    # --- config, mesh ---------------------------------------------------------------------
    validate(config)
    loss_kind, loss_fn = resolve_loss(config.pref_loss)
    path = PATHS[loss_kind]                      # pairs, or unpaired rows (KTO)
    use_ref = needs_reference(loss_fn)
    mesh, rules = common.setup_mesh(config, config.data.batch_size,
                                     2 * config.data.batch_size)

    # --- model: policy and frozen reference from the SFT stage -------------------------------
    graphdef, params, model_cfg, tok, init_meta = common.load_stage(
        init_from, mesh=mesh, rules=rules, seed=config.seed, runtime=common.runtime(config))
    gold = common.gold(config.data, tok)   # the data's gold reward: the generation eval
    sources = {"init_from": init_meta["source"]}   # the reference: a resumption must match it
    common.require(max(config.data.buckets) <= model_cfg.max_len,
                   f"data.buckets go up to {max(config.data.buckets)} but the SFT model's "
                   f"max_len is {model_cfg.max_len}; lower the buckets")
    # Checked now, not when the generation eval starts after training.
    common.require(not (gold is not None and config.gen.n_prompts)
                   or config.gen.prompt_len + config.gen.max_new_tokens <= model_cfg.max_len,
                   f"gen.prompt_len + gen.max_new_tokens = "
                   f"{config.gen.prompt_len + config.gen.max_new_tokens} exceeds the SFT "
                   f"model's max_len {model_cfg.max_len}; lower one of them")
    # The reference is the SFT parameters themselves. The policy gets its own copy, since its
    # buffers are donated to the update step. With lora the policy is the SFT parameters plus
    # adapters, and the reference that model with its adapters off (`model.adapters_off`), the
    # same base arrays: one copy of the weights (set after the resume, below).
    if config.lora:
        graphdef, params, model_cfg = common.add_adapters(
            graphdef, params, model_cfg, config, kind="policy", mesh=mesh, rules=rules,
            seed=config.seed)
        ref_params = None
    else:
        ref_params = params
        params = _copy(params)

    # --- data --------------------------------------------------------------------------------
    # Records of config.data.kind, batched as the rows the loss trains on (pairs split into
    # unpaired rows with data.split_pairs).
    def records(split):
        return common.data_source(config.data, config.data.kind, split, workdir)

    packing = bool(config.data.get("packing", False))

    def iterator(source, split, extra=(), **batch):
        return batching.make_iterator(
            source, kind=LOSS_KINDS[loss_kind], split_pairs=config.data.split_pairs,
            tokenizer=tok, extra_fields=extra, name=f"{config.data.kind}/{split}",
            config=common.batch_config(config.data, batch_size=config.data.batch_size,
                                       seed=config.seed, **batch), format=config.data.format)

    train_it = iterator(records("train"), "train", packing=packing,
                        pack_rows_multiple=common.pack_rows_multiple(config, mesh, rules))

    # --- update step ------------------------------------------------------------------------
    optimizer = _optimizer(tuple(sorted(config.optim.items())), config.steps, bool(config.lora))
    update, eval_terms, init_opt = _compiled(graphdef, loss_fn, optimizer, use_ref, loss_kind,
                                             config.micro_batches)
    opt_state = init_opt(params)

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
                                        "model_kind": "policy", "init_from": str(init_from)})
        common.save_checkpoint(ckpt, step, params=params, train={"opt": opt_state}, meta=meta,
                               force=force)

    params, opt_state, guard = common.on_mesh((params, opt_state, guard), mesh)
    if config.lora:
        ref_params = model.adapters_off(params)   # the frozen base arrays, never donated
    held_ref = ref_params if use_ref else None  # reference-free: never passed to the step

    # --- loop -------------------------------------------------------------------------------
    writer = metrics_lib.MetricsWriter(stage_dir)
    values = None
    token_rate = metrics_lib.TokenRate()
    t_start, cpu_start, start_step = time.perf_counter(), time.process_time(), step
    bar = metrics_lib.progress(total=config.steps, initial=step, desc=config.stage)
    padding = batching.PaddingStats(config.data.buckets) if packing else None
    while step < config.steps:
        host_batch = next(train_it)
        token_rate.add(host_batch["mask"])
        common.count_padding(padding, host_batch, config.stage)
        batch = common.place_batch(host_batch, mesh, rules)
        params, opt_state, guard, m = update(params, opt_state, guard, held_ref, batch,
                                             jnp.int32(step))
        step += 1
        last = step == config.steps
        if step % config.log_every == 0 or last:
            m = metrics_lib.to_host(m)  # waits for the step, so the rate below is honest
            values = writer.write(step, {**m, "time/tokens_per_s": token_rate.rate(),
                                         **(padding.metrics() if padding else {})})
            common.raise_if_bad(guard, values)   # a host sync anyway: stop early
            bar.set_postfix(metrics_lib.format_postfix(values, ["pref/loss"]))
        if step % config.save_every == 0 or last:
            common.raise_if_bad(guard, values)
            save(step, force=last)
        bar.update(1)
    bar.close()
    common.raise_if_bad(guard, values)
    common.packing_report(padding, config.stage)
    # Wall and CPU time of this run's training steps (first-step compile included), for the
    # time budget; on a shared machine the CPU time (all threads) is the steadier number.
    results = {"time/train_wall_s": time.perf_counter() - t_start,
               "time/train_cpu_s": time.process_time() - cpu_start,
               "time/train_steps": float(step - start_step)}

    # --- eval: test pairs (or rows) ----------------------------------------------------------
    if config.eval_batches:
        test_source = records("test")
        # Gold rewards are fields of the records (the testbed's), whatever the tokenizer.
        extra = common.gold_fields(test_source) if path.gold else ()
        test_it = iterator(test_source, "test", extra, shuffle=path.shuffle_test, num_epochs=1,
                           drop_remainder=False)
        results.update(path.evaluate(eval_terms, params, held_ref, test_it,
                                     config.eval_batches, mesh, rules, gold=bool(extra)))

    # --- eval: generation on held-out prompts (gold reward and KL) ---------------------------
    if gold is not None and config.gen.n_prompts:
        gen = config.gen
        prompts_data = ml_collections.ConfigDict(config.data.to_dict())
        prompts_data.n_train = prompts_data.n_test = int(gen.n_prompts)
        prompt_cfg = batching.BatchConfig(
            batch_size=gen.batch_size, buckets=(gen.prompt_len,),
            max_prompt_len=min(config.data.max_prompt_len, gen.prompt_len - 1), seed=config.seed,
            shuffle=False, num_epochs=1, drop_remainder=False)

        prompts = list(batching.make_iterator(
            common.data_source(prompts_data, "prompts", "test", workdir), kind="prompts",
            tokenizer=tok, config=prompt_cfg, name="prompts/test", format=config.data.format,
            text_fields=rewards_lib.record_fields(rewards_lib.parse(gold.expr))))
        evaluator = evaluation.Evaluator(
            graphdef=graphdef, ref_params=ref_params, prompts=prompts,
            max_new_tokens=gen.max_new_tokens, eos_id=tok.stop_ids, pad_id=tok.pad_id,
            gold=gold, tokenizer=tok, temperature=gen.temperature)
        # The same key for both: a paired comparison on the same random numbers.
        key = jax.random.key(config.seed)
        policy = evaluation.summarize(evaluator.samples(params, key))
        ref = evaluation.summarize(evaluator.samples(ref_params, key, kl=False))
        gain = policy["gold/reward"] - ref["gold/reward"]
        results.update(policy)
        results.update({"gold/ref_reward": ref["gold/reward"],
                        "gold/ref_reward_std": ref["gold/reward_std"],
                        "response/ref_length": ref["response/length"], "gold/gain": gain,
                        "gold/gain_in_ref_std": gain / max(ref["gold/reward_std"], 1e-6)})
    # One line for the last step: read_metrics keeps the last line per step.
    writer.write(step, {**(values or {}), **results})
    writer.close()
    ckpt.close()
    return stage_dir


def _pair_eval(eval_terms, params, ref_params, test_it, max_batches, mesh, rules, *, gold):
    """Implicit-reward accuracy and margin of the loss on test pairs, valid rows only.

    eval/pref_accuracy and eval/pref_margin are the loss's own "<prefix>/accuracy" and
    "<prefix>/margin" under loss-independent names, so ablations share a column; with gold
    rewards also eval/gold_agreement, the fraction of pairs whose implicit-reward order matches
    the gold order (noiseless, unlike the Bradley-Terry-sampled labels). Every metric of the
    loss appears as eval/<name>.
    """
    sums, n, agree, n_gold = {}, 0.0, 0.0, 0.0
    for i, host in enumerate(test_it):
        if i >= max_batches:
            break
        batch = common.place_batch({k: v for k, v in host.items()
                                    if k not in ("gold_chosen", "gold_rejected")}, mesh, rules)
        m = sharding.device_get(eval_terms(params, ref_params, batch)[1])   # {name: [B]}
        valid = np.asarray(host["valid"]).astype(bool)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(np.sum(np.asarray(v)[valid]))
        n += float(np.sum(valid))
        if gold:
            margin = np.asarray(m[metric_prefix(m) + "/margin"])
            gold_diff = np.asarray(host["gold_chosen"]) - np.asarray(host["gold_rejected"])
            keep = valid & (gold_diff != 0)
            agree += float(np.sum((np.sign(margin) == np.sign(gold_diff))[keep]))
            n_gold += float(np.sum(keep))
    out = _eval_means(sums, n)
    if out and gold and n_gold:
        out["eval/gold_agreement"] = agree / n_gold
    return out


def _eval_means(sums: dict, n: float) -> dict:
    """eval/<metric> = sums[metric] / n for every metric of the loss, and its accuracy and
    margin again as eval/pref_accuracy and eval/pref_margin (loss-independent names, so
    ablations share a column); {} without rows."""
    if n == 0:
        return {}
    out = {f"eval/{k}": v / n for k, v in sums.items()}
    prefix = metric_prefix(sums)
    out["eval/pref_accuracy"] = out[f"eval/{prefix}/accuracy"]
    out["eval/pref_margin"] = out[f"eval/{prefix}/margin"]
    return out


def _unpaired_eval(eval_terms, params, ref_params, test_it, max_batches, mesh, rules, *,
                   gold=False):
    """The loss's metrics on test rows, each batch's weighted by its number of real rows.

    For KTO each batch has its own z0 (from its mismatched rows), and eval/pref_accuracy is
    kto/accuracy: the share of rows on their side of z0, r - z0 > 0 for a desirable row and
    < 0 for an undesirable one (ties count half); eval/pref_margin the signed beta (r - z0).
    Unpaired rows have no gold order to agree with (`gold` is always False here).
    """
    del gold
    sums, n = {}, 0.0
    for i, host in enumerate(test_it):
        if i >= max_batches:
            break
        rows = float(np.sum(host["valid"]))
        m = sharding.device_get(eval_terms(params, ref_params,
                                           common.place_batch(host, mesh, rules)))
        for k, v in m.items():   # batch means over real rows: weighted, they add up
            sums[k] = sums.get(k, 0.0) + rows * float(v)
        n += rows
    return _eval_means(sums, n)


# ---------------------------------------------------------------------------------------------
# The two paths: which rows a loss kind trains on, and how they are stepped and evaluated
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Path:
    steps: Callable          # (graphdef, loss_fn, optimizer, use_ref, micro_batches)
                             #   -> (update, eval_terms, init)
    evaluate: Callable       # the test eval over eval_terms
    gold: bool               # the test eval compares with the records' gold rewards
    shuffle_test: bool       # test rows are shuffled (seeded) before the first eval_batches


PATHS = {
    "pref_loss": _Path(_pair_steps, _pair_eval, gold=True, shuffle_test=False),
    # Shuffled: rows split from pairs are all chosen ones, then all rejected ones, and a
    # prepared dataset may be sorted by its flag too; a batch should hold both kinds.
    "unpaired_loss": _Path(_unpaired_steps, _unpaired_eval, gold=False, shuffle_test=True),
}
