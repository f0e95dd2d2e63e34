"""Jitted autoregressive generation with a KV cache, temperature / top-k / top-p, EOS handling.

The model is passed functionally as `model = (graphdef, params)` — the pair returned by
`nnx.split(transformer)` or `model.create(cfg)`. `graphdef` is static (hashable) and `params` is
a pytree, so `generate` compiles once per (graphdef, shapes, sampling options).

Conventions:
- Prompts are LEFT-padded to a fixed length P (`prompt_mask` 1 on real tokens). Positions are
  cumsum(mask) - 1, so padding does not shift RoPE/learned positions.
- Sampled log-probs are log softmax(logits / temperature) of the FULL vocabulary, evaluated at
  the sampled token, i.e. before top-k/top-p truncation. This is exactly what a trainer
  recomputes with `model.token_logprobs(logits, tokens, mask, temperature=temperature)`, so
  PPO's old/new ratio starts at 1. With temperature == 0 (greedy) the log-probs are those of
  the untempered (temperature 1) distribution.
- `eos_id` is one id or a tuple of stop ids (an instruct model stops at its end-of-turn token
  as well as at EOS; `Tokenizer.stop_ids`).
- After a row emits `eos_id` (the EOS itself is kept, mask 1), every later token is `pad_id`
  with mask 0 and log-prob 0. The loop stops early once every row has finished.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.model import default_positions


def stop_ids(eos_id) -> tuple[int, ...]:
    """`eos_id` (one id or several) as a tuple of ints, hashable for jit's static arguments."""
    ids = tuple(int(i) for i in np.atleast_1d(eos_id))
    if not ids:
        raise ValueError("eos_id names no stop id")
    return ids


def is_stop(tokens, eos_id):
    """Elementwise: whether each token is one of the stop ids (`eos_id`: an id or several)."""
    ids = stop_ids(eos_id)
    out = tokens == ids[0]
    for i in ids[1:]:
        out = out | (tokens == i)
    return out


def filter_logits(logits_bv, *, top_k: int = 0, top_p: float = 1.0):
    """Push logits outside the top-k / nucleus (top-p, Holtzman et al. 2020) set to the most
    negative float32, so they get probability 0 (a finite value keeps the arithmetic NaN-free).

    logits: [B, V] float32 (already temperature-scaled). top_k=0 and top_p=1.0 disable each
    filter. The nucleus is the smallest set of most likely tokens whose mass reaches top_p (the
    most likely token is always kept). Ties at the threshold are kept.
    """
    neg = jnp.finfo(logits_bv.dtype).min
    if top_k and top_k < logits_bv.shape[-1]:
        kth = jax.lax.top_k(logits_bv, top_k)[0][..., -1:]
        logits_bv = jnp.where(logits_bv < kth, neg, logits_bv)
    if top_p < 1.0:
        sorted_desc = -jnp.sort(-logits_bv, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep a sorted token while the mass of strictly better tokens is below top_p.
        keep = mass_before < top_p
        n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
        logits_bv = jnp.where(logits_bv < threshold, neg, logits_bv)
    return logits_bv


def _argmax(x_bv):
    """First index of the maximum along the last axis, [B, V] -> [B] int32.

    Written as two plain reductions (max, then min index where equal) because a variadic
    (value, index) argmax reduce is not vectorised by XLA:CPU and was 10% of a decode step.
    """
    v = x_bv.shape[-1]
    best = jnp.max(x_bv, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x_bv.shape, x_bv.ndim - 1)
    return jnp.min(jnp.where(x_bv == best, iota, v), axis=-1)


def _sample(logits_bv, key, *, temperature, top_k, top_p):
    """One sampling step: (token [B] int32, log-prob [B] of the token under the full
    temperature-scaled distribution)."""
    z = logits_bv.astype(jnp.float32)
    if temperature == 0.0:
        token = _argmax(z)
    else:
        z = z / temperature
        # Gumbel-max: argmax(logits + Gumbel noise) is a sample from softmax(logits).
        gumbel = jax.random.gumbel(key, z.shape, jnp.float32)
        token = _argmax(filter_logits(z, top_k=top_k, top_p=top_p) + gumbel)
    logp = jnp.take_along_axis(z, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(z, axis=-1)
    return token, logp


def _record(carry, step, token, logp, *, eos_id, pad_id):
    """Write the sampled token of `step` into the output buffers, honouring finished rows."""
    done = carry["done"]
    token = jnp.where(done, pad_id, token)
    logp = jnp.where(done, 0.0, logp)
    emitted = ~done
    carry = dict(carry)
    carry["tokens"] = jax.lax.dynamic_update_slice(carry["tokens"], token[:, None], (0, step))
    carry["logprobs"] = jax.lax.dynamic_update_slice(carry["logprobs"], logp[:, None], (0, step))
    carry["mask"] = jax.lax.dynamic_update_slice(carry["mask"], emitted[:, None], (0, step))
    carry["done"] = done | is_stop(token, eos_id)
    return carry, token, emitted


def _decode(state: dict, rng, *, batch: int, max_new_tokens: int, next_logits, advance,
            temperature, top_k, top_p, eos_id, pad_id):
    """The sampling loop both generators share, as one `while_loop` that stops early when every
    row has finished.

    state: the model side of the loop carry. next_logits(c): the logits [B, V] of the token
    sampled at step c["step"]. advance(c, token, emitted, step): the updated model-side entries
    after `token` [B] was recorded (emitted [B]: the rows that were still running).
    """
    carry = dict(
        state, step=jnp.int32(0), rng=rng,
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
        mask=jnp.zeros((batch, max_new_tokens), jnp.bool_),
        done=jnp.zeros((batch,), jnp.bool_),
    )

    def cond(c):
        return (c["step"] < max_new_tokens) & ~jnp.all(c["done"])

    def body(c):
        rng, key = jax.random.split(c["rng"])
        step = c["step"]
        token, logp = _sample(next_logits(c), key, temperature=temperature, top_k=top_k,
                              top_p=top_p)
        c, token, emitted = _record(c, step, token, logp, eos_id=eos_id, pad_id=pad_id)
        c.update(advance(c, token, emitted, step), rng=rng, step=step + 1)
        return c

    carry = jax.lax.while_loop(cond, body, carry)
    return carry["tokens"], carry["mask"], carry["logprobs"]


_STATIC = ("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_cached(graphdef, params, prompt_bp, prompt_mask_bp, rng, *, max_new_tokens,
                     temperature, top_k, top_p, eos_id, pad_id):
    model = nnx.merge(graphdef, params)
    b, p = prompt_bp.shape
    s = p + max_new_tokens
    prompt_mask_bp = prompt_mask_bp.astype(jnp.bool_)
    kv_mask = jnp.concatenate([prompt_mask_bp, jnp.zeros((b, max_new_tokens), jnp.bool_)], 1)
    cache = model.init_cache(b, s)

    # Prefill: the whole prompt in one pass, filling cache slots [0, P).
    hidden, cache = model.hidden_states(prompt_bp, positions_bt=default_positions(prompt_mask_bp),
                                        cache=cache, cache_index=0, kv_mask_bs=kv_mask)
    state = dict(cache=cache, kv_mask=kv_mask, logits=model.logits(hidden[:, -1:])[:, 0],
                 position=jnp.sum(prompt_mask_bp, axis=-1).astype(jnp.int32))

    def advance(c, token, emitted, step):
        slot = p + step
        kv_mask = jax.lax.dynamic_update_slice(c["kv_mask"], emitted[:, None], (0, slot))
        # One-token decode step: writes cache slot P + step and yields the next logits.
        hidden, cache = model.hidden_states(token[:, None], positions_bt=c["position"][:, None],
                                            cache=c["cache"], cache_index=slot,
                                            kv_mask_bs=kv_mask)
        return dict(cache=cache, kv_mask=kv_mask, logits=model.logits(hidden)[:, 0],
                    position=c["position"] + emitted.astype(jnp.int32))

    return _decode(state, rng, batch=b, max_new_tokens=max_new_tokens,
                   next_logits=lambda c: c["logits"], advance=advance, temperature=temperature,
                   top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_uncached(graphdef, params, prompt_bp, prompt_mask_bp, rng, *, max_new_tokens,
                       temperature, top_k, top_p, eos_id, pad_id):
    model = nnx.merge(graphdef, params)
    b, p = prompt_bp.shape
    state = dict(seq=jnp.concatenate([prompt_bp.astype(jnp.int32),
                                      jnp.full((b, max_new_tokens), pad_id, jnp.int32)], 1),
                 seq_mask=jnp.concatenate([prompt_mask_bp.astype(jnp.bool_),
                                           jnp.zeros((b, max_new_tokens), jnp.bool_)], 1))

    def next_logits(c):
        # The whole fixed-length buffer is re-run every step (the reference the cache beats).
        hidden, _ = model.hidden_states(c["seq"], mask_bt=c["seq_mask"])
        last = jax.lax.dynamic_slice_in_dim(hidden, p + c["step"] - 1, 1, axis=1)
        return model.logits(last)[:, 0]

    def advance(c, token, emitted, step):
        at = (0, p + step)
        return dict(seq=jax.lax.dynamic_update_slice(c["seq"], token[:, None], at),
                    seq_mask=jax.lax.dynamic_update_slice(c["seq_mask"], emitted[:, None], at))

    return _decode(state, rng, batch=b, max_new_tokens=max_new_tokens, next_logits=next_logits,
                   advance=advance, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=eos_id, pad_id=pad_id)


def generate(model, prompt_tokens, prompt_mask, rng, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id,
             pad_id: int, use_cache: bool = True):
    """Sample completions for left-padded prompts in one compiled loop.

    model: (graphdef, params) of a `model.Transformer`. prompt_tokens, prompt_mask: [B, P]
    (left-padded; every row needs at least one real token). rng: a PRNG key.
    temperature: 0 means greedy. top_k=0 / top_p=1.0 disable the filters.
    use_cache=False runs the uncached reference (full forward every step; for tests/benchmarks).

    Returns (tokens [B, N] int32, mask [B, N] bool, logprobs [B, N] float32), N =
    max_new_tokens. mask is 1 up to and including the first EOS; tokens after it are pad_id
    with mask 0 and log-prob 0. logprobs are log softmax(logits / temperature)[token] over the
    full vocabulary (before top-k/top-p), matching `token_logprobs(..., temperature)`.
    """
    graphdef, params = model
    prompt_tokens = jnp.asarray(prompt_tokens)
    prompt_mask = jnp.asarray(prompt_mask)
    if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
        raise ValueError(f"prompt_tokens {prompt_tokens.shape} and prompt_mask "
                         f"{prompt_mask.shape} must both be [B, P]")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, "
                         f"top_p={top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = getattr(nnx.merge(graphdef, params), "cfg", None)
    if cfg is not None and prompt_tokens.shape[1] + max_new_tokens > cfg.max_len:
        raise ValueError(f"prompt length {prompt_tokens.shape[1]} + max_new_tokens "
                         f"{max_new_tokens} exceeds max_len={cfg.max_len}; shorten the prompt "
                         "bucket or raise ModelConfig.max_len")
    fn = _generate_cached if use_cache else _generate_uncached
    return fn(graphdef, params, prompt_tokens, prompt_mask, rng,
              max_new_tokens=int(max_new_tokens), temperature=float(temperature),
              top_k=int(top_k), top_p=float(top_p), eos_id=stop_ids(eos_id),
              pad_id=int(pad_id))


def generate_uncached(model, prompt_tokens, prompt_mask, rng, **kwargs):
    """`generate` without a KV cache: re-runs the full forward pass over the fixed-length
    [B, P + N] buffer at every step. Same arguments and outputs; a reference for tests and the
    benchmark's cache speed-up."""
    return generate(model, prompt_tokens, prompt_mask, rng, use_cache=False, **kwargs)
