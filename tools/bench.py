"""Throughput of the transformer against the machine's own matrix-multiply peak.

    python -m tools.bench                      # small and medium configs, float32
    python -m tools.bench --quick              # small config, fewer repeats (~1-2 min on 2 cores)
    python -m tools.bench --configs small --dtype bfloat16 --uncached-batches 32
    python -m tools.bench --xla-defaults       # without the XLA:CPU fusion flag (see below)
    python -m tools.bench --device             # accelerator mode: 125m, 350m, 1b (see below)
    python -m tools.bench --device --sizes tiny   # the same on a CPU in seconds (the test's run)

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

Device mode (--device) measures one chip (device 0; the device count is printed) against two
peaks measured in the same process, before and after the sizes (the larger kept): a bfloat16
[n, n] x [n, n] matmul (n doubling from 1024 until one takes >= 5 ms, up to 16384; the best
FLOP/s) and the memory bandwidth (a float32 array of 256 MiB doubling up to 4 GiB until a pass
takes >= 10 ms: in-place x + 1, bytes read + written, and a sum, bytes read; the larger). The
same code runs on CPU, GPU and TPU; only these sizes adapt to the machine. For each model size
(`DEVICE_SIZES`, Llama-style: RMSNorm, RoPE, SwiGLU, untied unembedding, vocab 32000, bf16
compute with float32 master parameters)

    size  d_model layers heads kv d_ff  params  fwd FLOPs/token at T=1024 (docs/model.md)
    125m   768     12     12   12 2048  134M    0.257 G
    350m  1024     24     16   16 2816  374M    0.783 G
    1b    2048     22     32    4 5632  1.10B   2.253 G    (TinyLlama-1.1B's shape)
    tiny    32      1      4    2   64  13k     31 k at T=64 (vocab 64: the "tiny" preset with
                                                  one layer; the CPU test size)

it prints three tables, every figure also as a ratio to a measured peak:

- training step (forward, backward, AdamW; jitted, donated) on --batch x --seq-len tokens
  (default 8 x 1024): tokens/s, FLOP/s = 3 x forward FLOPs x tokens/s, MFU = FLOP/s / bf16
  matmul peak;
- DPO step as the preference trainer runs it (chosen and rejected rows in one [2B, T] forward,
  frozen reference log-probs inside the step outside the gradient, `losses.dpo`, AdamW) on
  --dpo-pairs pairs (default 4) of --seq-len tokens, the second half of each row scored:
  pairs/s and MFU with FLOPs = 4 x forward (reference 1x, policy 3x) over the 2B rows;
- KV-cache decode through `sampling.generate` (--decode-batch rows, --prompt-len prompt,
  --new-tokens new; default 32, 128, 256): time per decode step = (generate(N) - generate(1))
  / (N - 1), so the prefill cancels; new tokens/s; bytes/step = every weight in its stored
  dtype (float32 as the trainers hold them for rollouts, or --decode-params bfloat16; the
  untied embedding table counts only the rows gathered) + K and V of every layer up to the
  current length in the compute dtype, averaged over the timed steps; "/ bandwidth" = bytes/step
  x steps/s / measured bandwidth peak. The attention reads the whole [S] cache buffer (masked),
  so the implementation moves more bytes than this bound counts; the gap lowers the ratio.

A size or figure that runs out of memory says so in its row and the rest go on. `--set
FIELD=VALUE` (repeatable) overrides a ModelConfig field of every size, e.g. --set remat=dots or
--set attention=dot_product where the model has them; `--repeats` (default 5) is best-of.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import experiment
from rlhf_jax import losses
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


_matmul = jax.jit(lambda x, y: x @ y)   # module level: a re-measured peak reuses its compile


def matmul_peak(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """Measured FLOP/s of one large jitted [n, n] x [n, n] matmul (2 n^3 FLOPs)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    seconds = _time(lambda: _matmul(a, b).block_until_ready(), repeats=repeats, warmup=2)
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


def _target_logps(graphdef, p, tokens, mask, loss_mask):
    """Per-token log-probs [B, T] of the next tokens where loss_mask[:, 1:] is set (0 elsewhere).

    Next-token targets: shift the [B, T] tokens rather than slice the [B, T, V] logits."""
    logits, _ = M.apply(graphdef, p, tokens, mask_bt=mask)
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    target_mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    return M.token_logprobs(logits, targets, target_mask), target_mask


def _train_step(graphdef, optimizer):
    """Jitted LM step (params, opt_state, tokens, mask) -> (params, opt_state, loss): forward,
    backward, optimizer update; params and optimizer state donated."""
    def loss_fn(p, tokens, mask):
        lp, target_mask = _target_logps(graphdef, p, tokens, mask, mask)
        return -jnp.sum(lp) / jnp.sum(target_mask)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(p, opt_state, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens, mask)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    return train_step


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
    train_step = _train_step(graphdef, optimizer)
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


# ----------------------------------------------------------------------------------------------
# Device mode (--device): bf16 MFU, DPO pairs/s and decode bandwidth on one accelerator chip
# ----------------------------------------------------------------------------------------------

# Llama-style shapes (RMSNorm, RoPE, SwiGLU, untied unembedding, vocab 32000), bf16 compute with
# float32 master parameters. "1b" is TinyLlama-1.1B's shape (grouped-query attention, 4 kv heads).
_LLAMA = dict(vocab_size=32000, dtype="bfloat16", param_dtype="float32")
DEVICE_SIZES = {
    # The unit tests' preset with one layer: its parameter shapes, whose eager initialisation
    # the test suite has compiled already.
    "tiny": M.get_config("tiny", n_layers=1, dtype="bfloat16"),
    "125m": M.ModelConfig(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048,
                          **_LLAMA),
    "350m": M.ModelConfig(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=2816,
                          **_LLAMA),
    "1b": M.ModelConfig(d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632,
                        **_LLAMA),
}
# Workload defaults: accelerator sizes, and a CPU-in-seconds set for "tiny". Flags override both.
DEVICE_DEFAULTS = dict(batch=8, seq_len=1024, dpo_pairs=4, decode_batch=32, prompt_len=128,
                       new_tokens=256)
TINY_DEFAULTS = dict(batch=4, seq_len=64, dpo_pairs=2, decode_batch=4, prompt_len=8,
                     new_tokens=256)


def bf16_matmul_peak(repeats: int = 5, sizes=(1024, 2048, 4096, 8192, 16384),
                     enough_s: float = 0.005) -> tuple[float, int]:
    """(best FLOP/s, its n) of `matmul_peak` in bfloat16 over growing n; stops after the first
    n whose matmul takes >= enough_s, so a CPU stops at n = 1024 and an accelerator reaches the
    sizes that fill it (8-16k)."""
    best = (0.0, 0)
    for n in sizes:
        flops = matmul_peak(n, repeats=repeats, dtype=jnp.bfloat16)
        best = max(best, (flops, n))
        if 2 * n ** 3 / flops >= enough_s:
            break
    return best


# The bandwidth kernels. x + 1 runs in place (donated): no fresh output buffer per call, whose
# page faults would be timed on a CPU. Module level, so a re-measured peak reuses the compiles.
_increment = jax.jit(lambda x: x + 1.0, donate_argnums=0)
_total = jax.jit(jnp.sum)


def bandwidth_peak(repeats: int = 5, min_mib: int = 256, max_mib: int = 4096,
                   enough_s: float = 0.01) -> dict:
    """Memory bandwidth (bytes/s) of jitted streaming kernels on a float32 array that doubles
    from min_mib until one pass takes >= enough_s or max_mib is reached (larger than any
    on-chip cache from the start; an accelerator reaches max_mib, where a pass takes ~1 ms, so
    the dispatch overhead counted in it is small). Returns the figures at the largest size:
    "copy" (x += 1 in place, bytes read + written), "sum" (bytes read), "peak" (their max) and
    "mib"."""
    step, total = _increment, _total
    mib = min_mib
    while True:
        x = {"a": jnp.zeros((mib * 2 ** 20 // 4,), jnp.float32)}

        def copy():
            x["a"] = step(x["a"])
            x["a"].block_until_ready()

        copy_s = _time(copy, repeats=repeats, warmup=2)
        sum_s = _time(lambda: total(x["a"]).block_until_ready(), repeats=repeats, warmup=2)
        del x
        if copy_s >= enough_s or mib * 2 > max_mib:
            break
        mib *= 2
    nbytes = mib * 2 ** 20
    out = {"copy": 2 * nbytes / copy_s, "sum": nbytes / sum_s, "mib": mib}
    out["peak"] = max(out["copy"], out["sum"])
    return out


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return "resource_exhausted" in text or "out of memory" in text


def _dpo_step(graphdef, optimizer, beta: float = 0.1):
    """Jitted DPO step as the preference trainer runs it: chosen and rejected rows in one
    [2B, T] batch, reference log-probs from the frozen reference inside the step but outside
    the gradient, `losses.dpo`, AdamW; params and optimizer state donated."""
    def pair_logps(p, tokens, mask, loss_mask):
        lp, _ = _target_logps(graphdef, p, tokens, mask, loss_mask)
        seq = jnp.sum(lp, axis=-1)
        b = seq.shape[0] // 2
        return seq[:b], seq[b:]

    def loss_fn(p, ref_c, ref_r, tokens, mask, loss_mask):
        c, r = pair_logps(p, tokens, mask, loss_mask)
        loss, _ = losses.dpo(policy_chosen_logps=c, policy_rejected_logps=r,
                             ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, beta=beta)
        return loss

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, opt_state, ref_p, tokens, mask, loss_mask):
        ref_c, ref_r = jax.lax.stop_gradient(pair_logps(ref_p, tokens, mask, loss_mask))
        loss, grads = jax.value_and_grad(loss_fn)(p, ref_c, ref_r, tokens, mask, loss_mask)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    return step


def decode_bytes_per_step(cfg: M.ModelConfig, params, batch: int, cache_lengths) -> float:
    """Bytes a KV-cache decode step must read at least, averaged over the steps whose cache
    holds `cache_lengths` slots: every weight in its stored dtype (the untied embedding and the
    learned position table only as the `batch` rows gathered), plus K and V of every layer up
    to the current length in the cache dtype (the compute dtype)."""
    weights = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [getattr(p, "key", getattr(p, "name", "")) for p in path]
        gathered = "pos_embed" in names or ("embed" in names and not cfg.tie_embeddings)
        weights += (batch * leaf.shape[-1] if gathered else leaf.size) * leaf.dtype.itemsize
    per_slot = 2 * cfg.n_layers * batch * cfg.n_kv_heads * cfg.head_size * \
        jnp.dtype(cfg.dtype).itemsize
    return weights + per_slot * float(np.mean(cache_lengths))


def _device_size(name: str, cfg: M.ModelConfig, w: dict, *, repeats: int,
                 decode_params: str) -> dict:
    """The three measurements for one size: {"train"|"dpo"|"decode": dict or error text}."""
    graphdef, params = M.create(cfg, seed=0)
    out = {"params": M.count_params(params)}
    per_tok = flops_per_token(cfg, w["seq_len"])
    fwd_tok = per_tok["matmul"] + per_tok["attention"]
    out["fwd_flops_per_token"] = fwd_tok
    optimizer = optax.adamw(1e-4, weight_decay=0.01)

    def guarded(key, fn):
        try:
            out[key] = fn()
        except Exception as err:   # noqa: BLE001 - one size's failure must not lose the rest
            out[key] = "out of memory" if _is_oom(err) else f"{type(err).__name__}: {err}"
            if not _is_oom(err):
                traceback.print_exc()
        finally:
            gc.collect()

    def train():
        b, t = w["batch"], w["seq_len"]
        tokens, mask = _batch(cfg, b, t)
        step = _train_step(graphdef, optimizer)
        state = {"p": jax.tree.map(jnp.copy, params)}
        state["o"] = optimizer.init(state["p"])

        def run():
            state["p"], state["o"], loss = step(state["p"], state["o"], tokens, mask)
            loss.block_until_ready()

        sec = _time(run, repeats=repeats)
        return {"shape": f"{b} x {t}", "rate": b * t / sec, "flops": 3 * fwd_tok * b * t / sec}

    def dpo():
        b, t = w["dpo_pairs"], w["seq_len"]
        tokens, mask = _batch(cfg, 2 * b, t, seed=2)
        # [prompt | response]: the second half of every row is scored.
        loss_mask = mask & (jnp.arange(t) >= t // 2)[None]
        step = _dpo_step(graphdef, optimizer)
        state = {"p": jax.tree.map(jnp.copy, params)}
        state["o"] = optimizer.init(state["p"])

        def run():
            state["p"], state["o"], loss = step(state["p"], state["o"], params, tokens, mask,
                                                loss_mask)
            loss.block_until_ready()

        sec = _time(run, repeats=repeats)
        # Reference forward (1x) + policy forward and backward (3x) over 2B rows of T tokens.
        return {"shape": f"{b} x 2 x {t}", "rate": b / sec,
                "flops": 4 * fwd_tok * 2 * b * t / sec}

    def decode():
        b, p, n = w["decode_batch"], w["prompt_len"], w["new_tokens"]
        if n < 2:
            raise ValueError("--new-tokens must be >= 2 (decode time is a difference of runs)")
        dp = params if decode_params == "float32" else jax.tree.map(
            lambda x: x.astype(decode_params) if jnp.issubdtype(x.dtype, jnp.floating) else x,
            params)
        prompt, pmask = _batch(cfg, b, p, seed=1)

        def seconds(new):
            fn = functools.partial(sampling.generate, (graphdef, dp), prompt, pmask,
                                   jax.random.key(0), max_new_tokens=new, temperature=1.0,
                                   eos_id=-1, pad_id=0)
            return _time(lambda: fn()[0].block_until_ready(), repeats=repeats)

        # generate(n) = prefill + n decode steps (step i reads slots 0..p+i); generate(1) =
        # prefill + 1 step, so the difference is the n - 1 steps i = 1 .. n-1.
        step_s = (seconds(n) - seconds(1)) / (n - 1)
        if step_s <= 0:
            raise RuntimeError("decode time not measurable: generate(n) <= generate(1); "
                               "raise --new-tokens")
        per_step = decode_bytes_per_step(cfg, dp, b, [p + i + 1 for i in range(1, n)])
        return {"shape": f"{b} x ({p}+{n})", "rate": b / step_s, "bytes_per_step": per_step,
                "bandwidth": per_step / step_s}

    guarded("train", train)
    guarded("dpo", dpo)
    guarded("decode", decode)
    return out


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"


def config_overrides(items, like: M.ModelConfig) -> dict:
    """--set FIELD=VALUE items -> {field: value} typed like the ModelConfig `like`'s fields."""
    overrides = {}
    for item in items:
        key, _, text = item.partition("=")
        if not hasattr(like, key) or not text:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with a ModelConfig field")
        current = getattr(like, key)
        overrides[key] = (text.lower() in ("1", "true", "yes") if isinstance(current, bool)
                          else type(current)(text))
    return overrides


def device_mode(args) -> list[dict]:
    """Runs and prints the device benchmark (see the module docstring); returns one dict per
    size with its measurements and the ratios (mfu, dpo_mfu, decode_bw) where measured."""
    overrides = config_overrides(args.set, DEVICE_SIZES["tiny"])
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in DEVICE_SIZES]
    if unknown:
        raise SystemExit(f"unknown --sizes {unknown}; choose from {list(DEVICE_SIZES)}")
    dev = jax.devices()[0]
    print(f"device mode: {dev.device_kind}  backend {jax.default_backend()}  "
          f"{jax.device_count()} device(s) (measured on one)  jax {jax.__version__}  "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if overrides:
        print(f"model overrides: {overrides}")
    repeats = args.repeats
    # The peaks are measured before and after the sizes and the larger kept, so contention
    # from other jobs lowers the ratios rather than inflating them.
    peaks = [(bf16_matmul_peak(repeats=max(repeats, 5)), bandwidth_peak(repeats=max(repeats, 5)))]

    results = []
    for name in sizes:
        print(f"measuring {name} ...", flush=True)
        w = dict(TINY_DEFAULTS if name == "tiny" else DEVICE_DEFAULTS)
        w.update({k: getattr(args, k) for k in w if getattr(args, k) is not None})
        cfg = DEVICE_SIZES[name].replace(
            max_len=max(w["seq_len"], w["prompt_len"] + w["new_tokens"]), **overrides)
        try:
            r = _device_size(name, cfg, w, repeats=repeats, decode_params=args.decode_params)
        except Exception as err:   # noqa: BLE001 - e.g. the parameters alone do not fit
            if not _is_oom(err):
                raise
            r = {k: "out of memory" for k in ("train", "dpo", "decode")}
        r["size"] = name
        results.append(r)

    peaks.append((bf16_matmul_peak(repeats=max(repeats, 5)),
                  bandwidth_peak(repeats=max(repeats, 5))))
    peak, peak_n = max(p[0] for p in peaks)
    bw = max((p[1] for p in peaks), key=lambda b: b["peak"])
    print(f"\nbf16 matmul peak: {_si(peak, 'FLOP/s')} (jitted [n, n] x [n, n], best n = "
          f"{peak_n}; best of before and after)")
    print(f"memory bandwidth peak: {_si(bw['peak'], 'B/s')} (float32 {bw['mib']} MiB: copy "
          f"{_si(bw['copy'], 'B/s')} read + written, sum {_si(bw['sum'], 'B/s')} read; best of "
          "before and after)\n")
    for r in results:
        for key, ratio in (("train", "mfu"), ("dpo", "dpo_mfu")):
            if isinstance(r[key], dict):
                r[ratio] = r[key]["flops"] / peak
        if isinstance(r["decode"], dict):
            r["decode_bw"] = r["decode"]["bandwidth"] / bw["peak"]
    for r in results:
        r["peaks"] = {"bf16_matmul_flops": peak, "bandwidth_bytes": bw["peak"]}

    def table(title, head, key, cells):
        print(title)
        line = f"{'size':<6} {'params':>8} " + " ".join(f"{h:>{n}}" for h, n in head)
        print(line)
        print("-" * len(line))
        for r in results:
            n_params = _si(r["params"], "").strip() if "params" in r else "-"
            lead = f"{r['size']:<6} {n_params:>8} "
            if isinstance(r[key], dict):
                print(lead + " ".join(f"{c:>{n}}" for c, (_, n) in zip(cells(r), head)))
            else:
                print(lead + r[key].splitlines()[0][:120])
        print()

    table("training step, bf16 compute, fp32 params, AdamW (FLOPs: 3 x forward, docs/model.md)",
          [("B x T", 14), ("fwd FLOP/tok", 13), ("tokens/s", 12), ("FLOP/s", 13),
           ("MFU", 7)], "train",
          lambda r: [r["train"]["shape"], _si(r["fwd_flops_per_token"], ""),
                     f"{r['train']['rate']:,.0f}", _si(r["train"]["flops"], ""),
                     f"{r['mfu']:.1%}"])
    table("DPO step: [2B, T] policy forward + backward and frozen reference forward "
          "(FLOPs: 4 x forward)",
          [("pairs x 2 x T", 16), ("pairs/s", 12), ("FLOP/s", 13), ("MFU", 7)], "dpo",
          lambda r: [r["dpo"]["shape"], f"{r['dpo']['rate']:,.1f}",
                     _si(r["dpo"]["flops"], ""), f"{r['dpo_mfu']:.1%}"])
    table(f"KV-cache decode (sampling.generate, params {args.decode_params}): bytes = weights + "
          "KV cache up to the current length, per step",
          [("B x (P+N)", 14), ("new tokens/s", 13), ("bytes/step", 12), ("bytes/s", 12),
           ("/ bandwidth", 12)], "decode",
          lambda r: [r["decode"]["shape"], f"{r['decode']['rate']:,.0f}",
                     _si(r["decode"]["bytes_per_step"], "B"),
                     _si(r["decode"]["bandwidth"], "B/s"), f"{r['decode_bw']:.1%}"])
    failed = [f"{r['size']} {key}" for r in results for key in ("train", "dpo", "decode")
              if isinstance(r[key], str) and r[key] != "out of memory"]
    if failed:   # a bug, not a size that does not fit: the tracebacks are on stderr
        raise SystemExit(f"failed (not out of memory): {', '.join(failed)}")
    return results


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
    device = parser.add_argument_group("device mode (--device)")
    device.add_argument("--device", action="store_true",
                        help="bf16 training MFU, DPO pairs/s and decode bandwidth per model size "
                             "(see the module docstring)")
    device.add_argument("--sizes", default="125m,350m,1b",
                        help=f"comma-separated, from {list(DEVICE_SIZES)}")
    for flag, help_text in (("batch", "training rows"), ("seq-len", "training/DPO tokens per row"),
                            ("dpo-pairs", "DPO pairs (2x rows)"),
                            ("decode-batch", "decode rows"), ("prompt-len", "decode prompt"),
                            ("new-tokens", "decode new tokens (>= 2)")):
        key = flag.replace("-", "_")
        device.add_argument(f"--{flag}", type=int, default=None,
                            help=f"{help_text}; default {DEVICE_DEFAULTS[key]} "
                                 f"(tiny: {TINY_DEFAULTS[key]})")
    device.add_argument("--decode-params", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the weights decode reads (float32: as the trainers hold "
                             "them for rollouts)")
    device.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a ModelConfig field of every size (repeatable), e.g. "
                             "--set attention=dot_product --set remat=dots")
    args = parser.parse_args(argv)

    if not args.xla_defaults:
        # Read when the backend starts, which has not happened yet (jax is imported, not used).
        experiment.use_fast_cpu_flags()
    if args.device:
        return device_mode(args)
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
