"""Throughput of the transformer against the machine's own matrix-multiply peak.

    python -m tools.bench                      # small and medium configs, float32
    python -m tools.bench --quick              # small config, fewer repeats (~1-2 min on 2 cores)
    python -m tools.bench --configs small --dtype bfloat16 --uncached-batches 32
    python -m tools.bench --xla-defaults       # without the XLA:CPU fusion flag (see below)

For each config it prints train-step tokens/s and achieved FLOP/s, forward-only tokens/s, KV-cache
generation tokens/s (64 new tokens) at batch 32 and 128, and uncached generation (full forward
over the fixed-length buffer at every step) for comparison. Every FLOP/s figure is also given as a
fraction of a float32 matmul peak measured in the same run, so the ratio means the same on a
laptop, a CI box or an accelerator. FLOP counting is documented in docs/model.md.

Unless --xla-defaults is given, the run adds --xla_cpu_experimental_ynn_fusion_type=dot to
XLA_FLAGS (printed in the header). On this XLA:CPU version the default also fuses elementwise
backward ops (SiLU', the logits gradient) into YNNPACK matmul operands in transposed layout,
which costs ~15-20% of a small-model train step; the flag keeps YNNPACK to the matmuls. It only
affects CPU compilation, and the peak is measured under the same flags.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import experiment
from rlhf_jax import model as M
from rlhf_jax import sampling

SEQ_LEN, BATCH, PROMPT_LEN, NEW_TOKENS = 128, 32, 64, 64


def _time(fn, *, repeats: int, warmup: int = 1) -> float:
    """Best wall time of `fn()` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """Measured FLOP/s of one large jitted [n, n] x [n, n] matmul (2 n^3 FLOPs)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    seconds = _time(lambda: f(a, b).block_until_ready(), repeats=repeats, warmup=2)
    return 2 * n ** 3 / seconds


def flops_per_token(cfg: M.ModelConfig, seq_len: int) -> dict:
    """Forward FLOPs per token (multiply-add = 2 FLOPs), counted from the matmuls executed.

    matmul: 2 * (parameters used in matmuls: q/k/v/o, MLP, unembedding); embedding lookups are
    gathers and count 0. attention: 4 * n_layers * seq_len * d_model (QK^T and PV over the full
    [T, T] score matrix, which this implementation computes before masking).
    Training = 3 x forward (backward = 2 x forward, Kaplan et al. 2020 / Chinchilla appendix).
    """
    d, f, L = cfg.d_model, cfg.d_ff, cfg.n_layers
    attn_proj = d * cfg.head_size * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = d * f * (3 if cfg.activation in M.GATED else 2)
    matmul_params = L * (attn_proj + mlp) + d * cfg.vocab_size
    return {"matmul": 2 * matmul_params, "attention": 4 * L * seq_len * d,
            "matmul_params": matmul_params}


def _batch(cfg, b, t, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(2, cfg.vocab_size, size=(b, t)), jnp.int32)
    return tokens, jnp.ones((b, t), bool)


def bench_config(name: str, cfg: M.ModelConfig, *, peak: float, repeats: int,
                 gen_batches, uncached_batches) -> list[tuple[str, float, float | None]]:
    """Rows (label, tokens/s, achieved FLOP/s or None) for one config."""
    rows = []
    graphdef, params = M.create(cfg, seed=0)
    per_tok = flops_per_token(cfg, SEQ_LEN)
    fwd_flops_tok = per_tok["matmul"] + per_tok["attention"]
    tokens, mask = _batch(cfg, BATCH, SEQ_LEN)
    n_tok = BATCH * SEQ_LEN

    optimizer = optax.adamw(1e-4, weight_decay=0.01)

    def loss_fn(p, tokens, mask):
        logits, _ = M.apply(graphdef, p, tokens, mask_bt=mask)
        # Next-token targets: shift the [B, T] tokens rather than slice the [B, T, V] logits.
        targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
        target_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
        lp = M.token_logprobs(logits, targets, target_mask)
        return -jnp.sum(lp) / jnp.sum(target_mask)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(p, opt_state, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens, mask)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    state = {"p": jax.tree.map(jnp.copy, params), "o": optimizer.init(params)}

    def run_train():
        state["p"], state["o"], loss = train_step(state["p"], state["o"], tokens, mask)
        loss.block_until_ready()

    sec = _time(run_train, repeats=repeats)
    rows.append((f"{name} train step (B={BATCH}, T={SEQ_LEN})", n_tok / sec,
                 3 * fwd_flops_tok * n_tok / sec))

    forward = jax.jit(lambda p, t, m: M.apply(graphdef, p, t, mask_bt=m)[0])
    sec = _time(lambda: forward(params, tokens, mask).block_until_ready(), repeats=repeats)
    rows.append((f"{name} forward (B={BATCH}, T={SEQ_LEN})", n_tok / sec,
                 fwd_flops_tok * n_tok / sec))

    gen_kw = dict(max_new_tokens=NEW_TOKENS, temperature=1.0, eos_id=-1, pad_id=0)
    for use_cache, batches in ((True, gen_batches), (False, uncached_batches)):
        for b in batches:
            prompt, pmask = _batch(cfg, b, PROMPT_LEN, seed=1)
            fn = functools.partial(sampling.generate, (graphdef, params), prompt, pmask,
                                   jax.random.key(0), use_cache=use_cache, **gen_kw)
            sec = _time(lambda: fn()[0].block_until_ready(),
                        repeats=max(1, repeats // (2 if use_cache else 4)))
            label = "KV-cache" if use_cache else "uncached"
            rows.append((f"{name} generate {label} (B={b}, {PROMPT_LEN}+{NEW_TOKENS})",
                         b * NEW_TOKENS / sec, None))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="small,medium",
                        help="comma-separated names from model.PRESETS")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype (params stay float32)")
    parser.add_argument("--quick", action="store_true",
                        help="small config only, fewer repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gen-batches", default="32,128")
    parser.add_argument("--xla-defaults", action="store_true",
                        help="do not add --xla_cpu_experimental_ynn_fusion_type=dot (see "
                             "docs/model.md: on XLA:CPU it stops elementwise backward ops being "
                             "fused into transposed YNNPACK operands; no effect on TPU/GPU)")
    parser.add_argument("--uncached-configs", default="small",
                        help="configs that also time uncached generation (slow: a full "
                             "forward per new token)")
    parser.add_argument("--uncached-batches", default="32",
                        help="batches for the uncached reference (it is slow: full forward "
                             "per token); empty to skip")
    args = parser.parse_args(argv)

    if not args.xla_defaults:
        # Read when the backend starts, which has not happened yet (jax is imported, not used).
        experiment.use_fast_cpu_flags()
    configs = ["small"] if args.quick else args.configs.split(",")
    repeats = 2 if args.quick else args.repeats
    ints = lambda s: [int(x) for x in s.split(",") if x]
    print(f"devices: {jax.devices()}  cores: {os.cpu_count()}  jax {jax.__version__}  "
          f"compute dtype: {args.dtype}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    # The peak is re-measured before each config and the best kept, so contention from other
    # jobs on a shared machine lowers the ratios rather than inflating them.
    peak = matmul_peak(repeats=repeats + 2)
    print(f"float32 matmul peak (2048^3, jitted): {peak / 1e9:.1f} GFLOP/s\n")

    header = f"{'measurement':<46} {'tokens/s':>11} {'GFLOP/s':>9} {'/ peak':>7}"
    print(header)
    print("-" * len(header))
    speedups = []
    for name in configs:
        cfg = M.get_config(name, dtype=args.dtype, max_len=max(SEQ_LEN, PROMPT_LEN + NEW_TOKENS))
        peak = max(peak, matmul_peak(repeats=repeats + 2))
        uncached = ints(args.uncached_batches) if name in args.uncached_configs.split(",") else []
        rows = bench_config(name, cfg, peak=peak, repeats=repeats,
                            gen_batches=ints(args.gen_batches), uncached_batches=uncached)
        for label, tps, flops in rows:
            extra = (f"{flops / 1e9:>9.1f} {flops / peak:>7.1%}" if flops is not None
                     else f"{'':>9} {'':>7}")
            print(f"{label:<46} {tps:>11,.0f} {extra}", flush=True)
        gen = {label.split("(B=")[1].split(",")[0] + ":" + ("c" if "KV" in label else "u"): tps
               for label, tps, _ in rows if "generate" in label}
        for key, tps in gen.items():
            b, kind = key.split(":")
            if kind == "u" and f"{b}:c" in gen:
                speedups.append(f"{name} B={b}: KV cache {gen[f'{b}:c'] / tps:.1f}x uncached")
    print(f"\nbest float32 matmul peak seen: {peak / 1e9:.1f} GFLOP/s (ratios above use the peak "
          "known when each config ran)")
    for line in speedups:
        print(line)


if __name__ == "__main__":
    main()
