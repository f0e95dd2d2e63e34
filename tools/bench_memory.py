"""Compiled peak memory of one training step, per model size and memory feature.

    python -m tools.bench_memory                     # small, medium, 350m, 1b; budgets 16, 80 GiB
    python -m tools.bench_memory --sizes 350m,1b,llama_1b --budgets 24,40,80 --seq-len 2048
    python -m tools.bench_memory --configs plain,lora=16      # only these columns
    python -m tools.bench_memory --sizes tiny --set n_layers=1 --set vocab_size=4096 \
        --seq-len 64 --batch 4 --micro-batches 2 --logits-chunk 16 \
        --xla-option xla_cpu_use_fusion_emitters=false      # seconds: the test's size

The default run compiles 84 steps (3 stages x 4 sizes x 7 configurations), two at a time
(--jobs): the first six columns took 8 minutes on 2 CPU cores (870 s of CPU time; 12 minutes
while a test suite shared the cores), the lora column alone (`--configs lora=16`) 156 s beside
a test suite; docs/scaling.md has the tables it prints. On a GPU or TPU machine the same
command reads that backend's own analysis.

For every (stage, size, configuration) it builds one training step from abstract inputs
(`jax.ShapeDtypeStruct`, nothing allocated), compiles it for the default backend (never runs
it) and reads XLA's `compiled.memory_analysis()`. The peak of a step is

    arguments + outputs - aliased + temporaries + generated code

arguments: parameters, optimizer state, the batch (and DPO's reference parameters); outputs:
the new parameters and optimizer state (and metrics); aliased: the outputs that reuse donated
argument buffers (parameters and AdamW state are donated, as in the trainers), so they are not
counted twice; temporaries: everything the step allocates in between (activations, gradients,
logits). Generated code is 0 on CPU. Every step is jitted by the trainers' `common.jit_update`
and lowered through its `lower`, so a LoRA step is the trainers' program: the frozen base an
argument that is neither donated nor returned, adapters, heads and AdamW state donated.

Stages (each as its trainer builds it):

- sft: `trainers/sft.py`'s update: token NLL over the whole sequence (`common.sequence_logps`,
  token-mean `aggregate`), gradient, guarded AdamW (`common.make_optimizer`). B rows.
- dpo: the preference trainer's own jitted update (`preference._compiled`, `dpo(beta=0.1)`):
  chosen and rejected rows in one [2P, T] forward, the frozen reference's log-probs in the step
  outside the gradient, reference parameters an argument. P = B / 2 pairs (B rows), the second
  half of each row the completion.
- ppo: one optimizer step of `trainers/rl.py`'s update on B rollouts (prompt T / 2, completion
  T / 2): `ppo_clip` on the policy's completion log-probs (and their entropy, which the trainer
  computes), plus 0.1 x the clipped `value_loss` of a critic (a `ValueModel`, its own backbone),
  AdamW over both. The RL trainer also keeps the frozen reference policy and the reward model on
  the device through the update (fp32, not arguments of this step): their bytes are *added* to
  the PPO cells (printed below the table).

Configurations: plain; micro=k (`micro_batches`, gradient accumulation over k micro-batches);
remat=dots and remat=full (`model.remat`); chunk=c (`model.logits_chunk`); all (micro=k,
remat=full, chunk=c); lora=r (a stage's `lora="lora(rank=r)"`: alpha 32 on q, k, v, o and the
MLP, --lora-rank; AdamW over the trainable leaves only, `common.make_optimizer(lora=True)`).
Under lora, DPO has no reference parameters among its arguments (the reference log-probs come
from `model.adapters_off` of the step's own parameters, as the trainer's reference is the same
base arrays); PPO's policy and critic both carry adapters (the critic's value head trains
whole, as rl.py builds it), and of the resident models only the reward model counts (the
reference is the policy's base). --configs measures only the named columns.

XLA:CPU and rematerialisation. XLA:CPU removes `jax.checkpoint`'s optimization barriers before
its common-subexpression pass, which merges the recomputation back into the forward pass, so on
CPU the compiled remat columns barely move (docs/model.md, "Memory options"; XLA:GPU expands
the barriers only after scheduling). The tool therefore also prints, from shapes alone, what reverse-mode autodiff
saves for the backward pass (`jax.vjp`'s residuals of one micro-batch's loss, arguments
excluded), which is where remat acts and which does not depend on the backend; and, on a CPU
backend, an estimate for accelerators: the compiled peak minus the residuals remat removes,
less one block's share (the block being recomputed is alive in the backward pass):

    estimate = compiled - (saved without remat - saved with remat) * (n_layers - 1) / n_layers

Sizes (random init; `SIZES`): the `small` and `medium` presets (vocab 4096), and the Llama-style
shapes of `tools.bench.DEVICE_SIZES` (RMSNorm, RoPE, SwiGLU, untied unembedding, vocab 32000):
125m, 350m, 1b (TinyLlama-1.1B's shape); any `model.PRESETS` name works too (`llama_1b`:
Llama 3.2 1B, vocab 128256, tied). Every size runs with float32 master parameters and the
--dtype compute dtype (bfloat16 by default), max_len raised to --seq-len. The largest size that
fits a budget is the one with the most parameters whose peak is at most the budget; it is the
largest *tried*, so a larger one may fit too.

Caveats: a CPU analysis is XLA:CPU's program, not an accelerator's: it may keep float32 copies
where the CPU has no bfloat16 kernel, it never uses fused (flash) attention (`model.attention`
"dot_product"/"cudnn" on a GPU does not hold the [B, H, T, T] scores these tables are dominated
by), and its allocator is not a GPU's or TPU's. One device, no mesh: with FSDP the parameters,
gradients and AdamW state divide by the fsdp axis. The rollout's generation (KV cache) is a
separate program and is not counted in the PPO update.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import gc
import os
import time

import jax
import jax.extend.core
import jax.numpy as jnp

from rlhf_jax import losses, sharding
from rlhf_jax import model as M
from rlhf_jax.aggregation import aggregate, denominator
from rlhf_jax.trainers import accumulate, common, preference
from tools import bench

GIB = 2 ** 30

# Model shapes by name: the benchmark presets, then bench.py's accelerator shapes (one list for
# both tools), then any other preset.
SIZES = {"tiny": M.get_config("tiny"), "small": M.get_config("small"),
         "medium": M.get_config("medium"),
         **{k: v for k, v in bench.DEVICE_SIZES.items() if k != "tiny"},
         **{k: v for k, v in M.PRESETS.items() if k not in ("tiny", "small", "medium")}}

STAGES = ("sft", "dpo", "ppo")
# The step is compiled for its memory analysis only, never run: LLVM's optimisation level
# changes the machine code, not the buffers XLA assigns before it (the same bytes at every
# size checked, tiny to 350m), and at 0 a CPU compile takes about half the time.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
DPO_LOSS = "dpo(beta=0.1)"
PPO_VALUE_COEF, PPO_CLIP, PPO_ENTROPY_COEF = 0.1, 0.2, 0.0   # rl.default_config()'s


def configurations(micro: int, chunk: int, lora_rank: int = 16) -> dict:
    """{name: (micro_batches, ModelConfig overrides)}, in column order. The lora column's
    fields are the trainers' `lora="lora(rank=r)"` (`model.lora`: alpha 32, q, k, v, o, mlp)."""
    return {"plain": (1, {}),
            f"micro={micro}": (micro, {}),
            "remat=dots": (1, {"remat": "dots"}),
            "remat=full": (1, {"remat": "full"}),
            f"chunk={chunk}": (1, {"logits_chunk": chunk}),
            "all": (micro, {"remat": "full", "logits_chunk": chunk}),
            f"lora={lora_rank}": (1, M.lora(rank=lora_rank))}


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------

def peak(compiled) -> dict:
    """The parts of `compiled.memory_analysis()` and their sum (bytes): see the docstring."""
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError(f"backend {jax.default_backend()} gives no memory analysis")
    parts = {"arguments": ma.argument_size_in_bytes, "outputs": ma.output_size_in_bytes,
             "aliased": ma.alias_size_in_bytes, "temp": ma.temp_size_in_bytes,
             "code": ma.generated_code_size_in_bytes}
    parts["peak"] = (parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temp"]
                     + parts["code"])
    return parts


def saved_bytes(loss_fn, params, batch) -> int:
    """Bytes reverse-mode autodiff keeps for the backward pass of loss_fn(params, batch) w.r.t.
    params: `jax.vjp`'s residuals, from shapes alone (traced, not compiled). Residuals that are
    arguments (parameters, batch) are not counted: they exist anyway. Computed values are,
    bf16 copies of the parameters included."""
    p_leaves, p_tree = jax.tree.flatten(params)
    b_leaves, b_tree = jax.tree.flatten(batch)

    def residuals(*leaves):
        p = jax.tree.unflatten(p_tree, leaves[:len(p_leaves)])
        b = jax.tree.unflatten(b_tree, leaves[len(p_leaves):])
        return jax.vjp(lambda p: loss_fn(p, b), p)[1]

    closed = jax.make_jaxpr(residuals)(*p_leaves, *b_leaves)
    jaxpr = closed.jaxpr
    inputs = set(jaxpr.invars) | set(jaxpr.constvars)
    seen, total = set(), 0
    for v in jaxpr.outvars:
        if isinstance(v, jax.extend.core.Literal) or v in inputs or v in seen:
            continue
        seen.add(v)
        total += v.aval.size * v.aval.dtype.itemsize
    return total


_MESH = None


@functools.cache
def _abstract_model(cfg, kind):
    """(graphdef, abstract params) of a `kind` model, as the trainers lay them out."""
    global _MESH
    if _MESH is None:
        _MESH = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return common.init_model(cfg, kind=kind, mesh=_MESH, rules=sharding.DEFAULT_RULES, seed=0,
                             abstract_only=True)


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _spec(shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _optimizer(cfg):
    # The trainers' AdamW (global-norm clipping, warm-up + cosine); its state: count, mu, nu.
    # A LoRA model's (cfg.lora_rank > 0) steps its trainable leaves only, as in the trainers.
    return common.make_optimizer(common.optim_config(), 1000, lora=cfg.lora_rank > 0)




# ----------------------------------------------------------------------------------------------
# The stages: (jitted step, its abstract arguments, residual loss, its abstract arguments,
# resident bytes outside the step)
# ----------------------------------------------------------------------------------------------

def sft_step(cfg, micro: int, batch: int, seq_len: int):
    """trainers/sft.py's update (the same loss, accumulation and guarded AdamW)."""
    graphdef, params = _abstract_model(cfg, "policy")
    optimizer = _optimizer(cfg)

    def loss_fn(params, b, normalizer=None):
        logps, _ = common.sequence_logps(graphdef, params, b["tokens"], b["mask"],
                                         b["loss_mask"])
        return aggregate(-logps, b["loss_mask"][:, 1:], "token_mean", normalizer=normalizer)

    def update(params, opt_state, guard, b, step):
        if micro == 1:
            loss, grads = jax.value_and_grad(loss_fn)(params, b)
        else:
            den = denominator(b["loss_mask"][:, 1:], "token_mean")
            (loss, _), grads = accumulate.grads(
                lambda p, mb, d: (loss_fn(p, mb, d), {}), params,
                accumulate.split(b, micro, batch), den)
        params, opt_state, guard, grad_norm = common.guarded_apply(
            optimizer, params, opt_state, grads, loss, guard, step)
        return params, opt_state, guard, {"sft/loss": loss, "sft/grad_norm": grad_norm}

    def rows(n):
        return {k: _spec((n, seq_len)) for k in ("tokens", "mask", "loss_mask")}

    args = (params, jax.eval_shape(optimizer.init, params), jax.eval_shape(common.init_guard),
            rows(batch), _spec(()))
    return common.jit_update(update), args, loss_fn, (params, rows(batch // micro)), 0


def dpo_step(cfg, micro: int, batch: int, seq_len: int):
    """The preference trainer's update itself (`preference._compiled`), on batch / 2 pairs.
    With LoRA the reference is the policy's own params with the adapters off
    (`model.adapters_off`, as the trainer passes it): no second copy among the arguments."""
    graphdef, params = _abstract_model(cfg, "policy")
    optimizer = _optimizer(cfg)
    kind, loss = preference.resolve_loss(DPO_LOSS)
    update, _, _ = preference._compiled(graphdef, loss, optimizer, True, kind, micro)
    pairs = batch // 2
    reference = (params,)
    if cfg.lora_rank:
        # The trainer's reference arrays are the frozen base the step already takes; as a
        # second argument the analysis would count them twice, so the step derives them.
        pref_update = update.__wrapped__
        update = common.jit_update(lambda params, opt_state, guard, b, step: pref_update(
            params, opt_state, guard, M.adapters_off(params), b, step))
        reference = ()

    def pair_batch(p):
        return {"tokens": _spec((2 * p, seq_len)), "mask": _spec((2 * p, seq_len)),
                "loss_mask": _spec((2 * p, seq_len)), "valid": _spec((p,), jnp.float32)}

    def loss_fn(params, b):      # the policy's part of the step; reference log-probs constants
        chosen, rejected, *_ = preference.pair_logps(graphdef, params, b)
        zero = jnp.zeros_like(chosen)
        value, _ = losses.dpo(policy_chosen_logps=chosen, policy_rejected_logps=rejected,
                              ref_chosen_logps=zero, ref_rejected_logps=zero,
                              weights=b["valid"])
        return value

    args = (params, jax.eval_shape(optimizer.init, params), jax.eval_shape(common.init_guard),
            *reference, pair_batch(pairs), _spec(()))
    return update, args, loss_fn, (params, pair_batch(pairs // micro)), 0


def ppo_step(cfg, micro: int, batch: int, seq_len: int):
    """One optimizer step of trainers/rl.py's update (default PPO config: gae + ppo_clip, KL in
    the reward, critic, token-mean) on `batch` rollouts of seq_len tokens, half completion.
    With LoRA both the policy and the critic carry adapters (the critic's value head trains
    whole), as rl.py builds them."""
    graphdef, policy = _abstract_model(cfg, "policy")
    value_graphdef, value = _abstract_model(cfg, "value")
    params = {"policy": policy, "value": value}
    optimizer = _optimizer(cfg)
    completion = seq_len - seq_len // 2
    p_len = seq_len - completion

    def loss_fn(params, mb):
        m = mb["completion_mask"]
        logps, entropy = M.target_logprobs(graphdef, params["policy"], mb["seq"],
                                           mb["completion"], m, mask_bt=mb["seq_mask"],
                                           with_entropy=True)
        loss, metrics = losses.ppo_clip(logps=logps, old_logps=mb["logps"],
                                        advantages=mb["advantages"], mask=m, clip_eps=PPO_CLIP)
        ent = aggregate(entropy, m, "token_mean")
        loss = loss - PPO_ENTROPY_COEF * ent
        values = M.apply_value(value_graphdef, params["value"], mb["seq"],
                               mask_bt=mb["seq_mask"])[:, p_len - 1:-1]
        vloss, vmetrics = losses.value_loss(values=values, old_values=mb["values"],
                                            returns=mb["returns"], mask=m, clip_eps=PPO_CLIP)
        loss = loss + PPO_VALUE_COEF * vloss
        return loss, {**metrics, **vmetrics, "policy/entropy": ent, "train/loss": loss}

    def micro_grads(params, mb):
        den = denominator(mb["completion_mask"], "token_mean")

        def share(params, part):
            loss, m = loss_fn(params, part)
            own = denominator(part["completion_mask"], "token_mean")
            w = jnp.where(den > 0, own / jnp.where(den > 0, den, 1.0), 0.0)
            return loss * w, jax.tree.map(lambda v: v * w, m)

        return accumulate.grads(share, params, accumulate.split(mb, micro, batch))

    def update(params, opt_state, guard, mb, step):
        if micro == 1:
            (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
        else:
            (loss, m), grads = micro_grads(params, mb)
        params, opt_state, guard, grad_norm = common.guarded_apply(
            optimizer, params, opt_state, grads, loss, guard, step)
        return params, opt_state, guard, {**m, "train/grad_norm": grad_norm}

    def rollouts(n):
        f32 = jnp.float32
        return {"seq": _spec((n, seq_len)), "seq_mask": _spec((n, seq_len)),
                "completion": _spec((n, completion)), "completion_mask": _spec((n, completion)),
                **{k: _spec((n, completion), f32)
                   for k in ("logps", "ref_logps", "advantages", "values", "returns")}}

    args = (params, jax.eval_shape(optimizer.init, params), jax.eval_shape(common.init_guard),
            rollouts(batch), _spec(()))
    # Resident through the update: the frozen reference policy (with LoRA the policy's own
    # base, `model.adapters_off`: no extra bytes) and the reward model (without adapters).
    plain = cfg.without_adapters()
    resident = ((0 if cfg.lora_rank else _nbytes(policy))
                + _nbytes(_abstract_model(plain, "reward")[1]))
    return (common.jit_update(update), args, lambda p, mb: loss_fn(p, mb)[0],
            (params, rollouts(batch // micro)), resident)


STEPS = {"sft": sft_step, "dpo": dpo_step, "ppo": ppo_step}


def lower(stage: str, cfg, micro: int, batch: int, seq_len: int):
    """(the lowered step, resident bytes beside it): the Python half of a measurement."""
    step, args, _, _, resident = STEPS[stage](cfg, micro, batch, seq_len)
    return step.lower(*args), resident   # common.jit_update's lower: a LoRA base not donated


def compile_peak(lowered, options=None) -> dict:
    """`peak` of the compiled step (the C++ half: it releases the GIL, so several run at once);
    options: XLA compiler options added to COMPILER_OPTIONS."""
    return peak(lowered.compile(compiler_options={**COMPILER_OPTIONS, **(options or {})}))


def measure(stage: str, cfg, micro: int, batch: int, seq_len: int, options=None) -> dict:
    """Compiled parts and peak, resident bytes, their total and the saved residual bytes of one
    step (bytes)."""
    lowered, resident = lower(stage, cfg, micro, batch, seq_len)
    out = compile_peak(lowered, options)
    out.update(resident=resident, total=out["peak"] + resident,
               saved=measure_saved(stage, cfg, micro, batch, seq_len))
    return out


@functools.cache
def measure_saved(stage: str, cfg, micro: int, batch: int, seq_len: int) -> int:
    """Only the saved residual bytes of a step (traced, not compiled); cached, since the
    remat columns' estimate asks again for their configuration without remat."""
    _, _, loss_fn, res_args, _ = STEPS[stage](cfg, micro, batch, seq_len)
    return saved_bytes(loss_fn, *res_args)


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

def largest_fitting(table: dict, params: dict, budget_bytes: float) -> dict:
    """{config: the size with the most parameters whose value is <= budget_bytes, or None}.

    table: {size: {config: bytes}} (a missing or None cell does not fit); params: {size: n}."""
    configs = list(dict.fromkeys(c for row in table.values() for c in row))
    out = {}
    for c in configs:
        fits = [s for s, row in table.items()
                if row.get(c) is not None and row[c] <= budget_bytes]
        out[c] = max(fits, key=lambda s: params[s]) if fits else None
    return out


def accelerator_estimate(cells: dict, configs: dict, n_layers: int) -> dict:
    """{config: bytes}: the compiled total minus what remat removes from the saved residuals,
    less one block's share (see the module docstring). cells: {config: measure() output}, with
    a "saved_plain" entry per remat config (the same config's residuals without remat)."""
    out = {}
    for name, cell in cells.items():
        drop = max(cell.get("saved_plain", cell["saved"]) - cell["saved"], 0)
        out[name] = cell["total"] - drop * (n_layers - 1) / n_layers
    return out


def _format_table(title: str, rows: dict, columns: list, fmt) -> list[str]:
    width = max(10, *(len(c) + 2 for c in columns))
    lines = [title, f"  {'size':<9}" + "".join(f"{c:>{width}}" for c in columns)]
    for size, row in rows.items():
        lines.append(f"  {size:<9}" + "".join(
            f"{fmt(row.get(c)):>{width}}" for c in columns))
    return lines


def _gib(x) -> str:
    if x is None:
        return "-"
    v = x / GIB
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def _fits_lines(table, params, budgets, columns) -> list[str]:
    lines = []
    for budget in budgets:
        best = largest_fitting(table, params, budget * GIB)
        lines.append(f"  fits {budget:g} GiB:".ljust(20) + "  ".join(
            f"{c} {best.get(c) or 'none'}" for c in columns))
    return lines


def run(sizes, *, budgets=(16, 80), seq_len=1024, batch=8, dtype="bfloat16", micro=4,
        chunk=256, lora_rank=16, only=None, overrides=None, stages=STAGES,
        compiler_options=None, jobs=None, echo=print) -> dict:
    """Measures every (stage, size, configuration), compiling on `jobs` threads (default: the
    CPU count, at most 4); prints the tables; returns {"cells": {stage: {size: {config:
    measure()}}}, "params": {size: n}, "configs": [...], "wall_s": seconds}. only: the
    configuration names to measure (default all)."""
    if batch % 2 or (batch // 2) % micro:
        raise SystemExit(f"--batch {batch} must be even with batch / 2 a multiple of "
                         f"--micro-batches {micro} (DPO splits batch / 2 pairs)")
    configs = configurations(micro, chunk, lora_rank)
    if only:
        unknown = [c for c in only if c not in configs]
        if unknown:
            raise SystemExit(f"unknown configurations {unknown}; choose from {list(configs)}")
        configs = {c: v for c, v in configs.items() if c in only}
    base = {}
    for name in sizes:
        if name not in SIZES:
            raise SystemExit(f"unknown size {name!r}; choose from {list(SIZES)}")
        base[name] = SIZES[name].replace(max_len=max(SIZES[name].max_len, seq_len),
                                         dtype=dtype, param_dtype="float32",
                                         **(overrides or {}))
    params = {n: M.count_params(_abstract_model(c, "policy")[1]) for n, c in base.items()}
    backend = jax.default_backend()
    t_start = time.perf_counter()
    echo(f"bench_memory: compiled peak memory of one training step (XLA memory analysis of the "
         f"compiled step; nothing is run)\nbackend {backend} ({jax.devices()[0].device_kind}), "
         f"jax {jax.__version__}; {batch} rows x {seq_len} tokens (DPO {batch // 2} pairs; PPO "
         f"{batch} rollouts, completion {seq_len - seq_len // 2}); float32 master parameters, "
         f"{dtype} compute; AdamW (mu, nu float32)")
    echo("peak = arguments + outputs - aliased (donated) + temporaries + generated code")
    echo("configurations: " + "; ".join(
        f"{k} = micro_batches {m}" + "".join(f", {f} {v}" for f, v in o.items())
        for k, (m, o) in configs.items()))
    echo("\nsizes (random init):\n  size      d_model layers heads kv  d_ff   vocab  tied  params")
    for n, c in base.items():
        echo(f"  {n:<9} {c.d_model:>7} {c.n_layers:>6} {c.n_heads:>5} {c.n_kv_heads:>3} "
             f"{c.d_ff:>5} {c.vocab_size:>7}  {'yes' if c.tie_embeddings else 'no':<4} "
             f"{params[n] / 1e6:>7.1f}M")
    cells = {s: {} for s in stages}
    jobs = jobs or min(os.cpu_count() or 1, 4)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for stage in stages:
            t0 = time.perf_counter()
            pending = []
            for size, cfg in base.items():
                row = cells[stage][size] = {}
                for name, (k, runtime) in configs.items():
                    # Lower here, compile on the pool, trace the residuals meanwhile; at most
                    # 2 x jobs lowered steps wait (a 1b one holds tens of MB).
                    while sum(not f.done() for f in pending) >= 2 * jobs:
                        concurrent.futures.wait(pending, return_when="FIRST_COMPLETED")
                    lowered, resident = lower(stage, cfg.replace(**runtime), k, batch, seq_len)
                    pending.append(pool.submit(compile_peak, lowered, compiler_options))
                    del lowered
                    row[name] = {"resident": resident, "future": pending[-1],
                                 "saved": measure_saved(stage, cfg.replace(**runtime), k,
                                                        batch, seq_len)}
                    if runtime.get("remat"):   # the residuals without remat, for the estimate
                        plain = {f: v for f, v in runtime.items() if f != "remat"}
                        row[name]["saved_plain"] = measure_saved(
                            stage, cfg.replace(**plain), k, batch, seq_len)
            for row in cells[stage].values():
                for cell in row.values():
                    cell.update(cell.pop("future").result())
                    cell["total"] = cell["peak"] + cell["resident"]
            pending.clear()
            measure_saved.cache_clear()
            gc.collect()
            _print_stage(stage, cells[stage], base, params, configs, budgets, backend,
                         time.perf_counter() - t0, echo)
    wall = time.perf_counter() - t_start
    echo(f"\ntotal {wall:.0f} s")
    return {"cells": cells, "params": params, "configs": list(configs), "wall_s": wall}


TITLES = {"sft": "SFT step (token NLL, AdamW)",
          "dpo": "DPO step (preference trainer's update, policy + frozen reference)",
          "ppo": "PPO update (ppo_clip policy + value loss critic, AdamW over both; + resident "
                 "reference and reward model)"}


def _print_stage(stage, rows, base, params, configs, budgets, backend, seconds, echo):
    columns = list(configs)
    total = {s: {c: cell["total"] for c, cell in row.items()} for s, row in rows.items()}
    echo("")
    echo("\n".join(_format_table(f"{TITLES[stage]}: peak GiB ({seconds:.0f} s)",
                                 total, columns, _gib)))
    big = max(rows, key=lambda s: params[s])
    for name in [c for c in columns if c == "plain" or c.startswith("lora=")]:
        p = rows[big][name]
        echo(f"  ({big}, {name}: arguments {_gib(p['arguments'])} + outputs "
             f"{_gib(p['outputs'])} - aliased {_gib(p['aliased'])} + temporaries "
             f"{_gib(p['temp'])} + code {_gib(p['code'])}"
             + (f" + resident {_gib(p['resident'])}" if p["resident"] else "") + " GiB)")
    echo("\n".join(_fits_lines(total, params, budgets, columns)))
    saved = {s: {c: cell["saved"] for c, cell in row.items()} for s, row in rows.items()}
    echo("\n".join(_format_table(
        "  saved for the backward pass (jax.vjp residuals of one micro-batch, arguments "
        "excluded; shapes only), GiB", saved, columns, _gib)))
    if backend == "cpu":
        est = {s: accelerator_estimate(row, configs, base[s].n_layers)
               for s, row in rows.items()}
        echo("\n".join(_format_table(
            "  XLA:CPU merges remat's recomputation back (no saving in the compiled remat "
            "columns); estimate for GPU/TPU with remat's saving, GiB", est, columns, _gib)))
        echo("\n".join(_fits_lines(est, params, budgets, columns)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="small,medium,350m,1b",
                        help=f"comma-separated, from {list(SIZES)}")
    parser.add_argument("--budgets", default="16,80", help="GiB, comma-separated")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8,
                        help="rows per step (SFT sequences, DPO 2 x pairs, PPO rollouts)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="compute dtype (parameters stay float32)")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--logits-chunk", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=16,
                        help="rank of the lora=r configuration (alpha 32; q, k, v, o, mlp)")
    parser.add_argument("--configs", default="",
                        help="comma-separated configuration names to measure, e.g. "
                             "plain,lora=16; '' = all")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a ModelConfig field of every size (repeatable), e.g. "
                             "vocab_size=128256")
    parser.add_argument("--jobs", type=int, default=0,
                        help="compiles at once (threads); 0 = the CPU count, at most 4")
    parser.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                        help="an XLA compiler option for every compile (repeatable), e.g. "
                             "xla_cpu_use_fusion_emitters=false: on XLA:CPU 3-4x faster to "
                             "compile tiny models (the test's), slower at 350m; the same bytes "
                             "to within a few hundred")
    args = parser.parse_args(argv)
    options = {}
    for item in args.xla_option:
        key, _, text = item.partition("=")
        if not key or not text:
            raise SystemExit(f"--xla-option {item!r}: expected NAME=VALUE")
        lowered = text.lower()
        options[key] = (lowered == "true" if lowered in ("true", "false")
                        else int(text) if text.lstrip("-").isdigit() else text)
    overrides = bench.config_overrides(args.set, SIZES["tiny"])
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; choose from {list(STAGES)}")
    return run([s for s in args.sizes.split(",") if s],
               budgets=[float(b) for b in args.budgets.split(",") if b], seq_len=args.seq_len,
               batch=args.batch, dtype=args.dtype, micro=args.micro_batches,
               chunk=args.logits_chunk, lora_rank=args.lora_rank,
               only=[c for c in args.configs.split(",") if c], overrides=overrides, stages=stages,
               compiler_options=options, jobs=args.jobs)


if __name__ == "__main__":
    main()
