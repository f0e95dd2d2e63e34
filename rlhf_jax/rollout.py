"""The one sample-and-score path: prompts in, a scored rollout out.

Every consumer calls `sample_and_score` (or, with completions it already has, `score`): the
RL trainer's rollouts, the evaluator (and so best-of-n and the quickstart's report), the reward
model's normalisation samples. A rollout is a dict of arrays on the mesh, N = prompts x samples:

  prompt [N, P], prompt_mask           left-padded prompts (as given)
  completion [N, L], completion_mask   sampled tokens, mask 1 up to and including the stop id
  seq [N, P+L], seq_mask               prompt and completion joined (int32 mask)
  sample_logps [N, L]                  the sampler's log-probs (temperature-scaled, full vocab)
  logps [N, L]                         the policy's log-probs: recomputed by a training-layout
                                       forward (recompute=True), else the sampler's
  ref_logps [N, L]                     the reference's (with_ref=True)
  kl, kl_k3 [N]                        sequence KL to the reference, k1 and k3 estimators
  values [N, L]                        a critic's V(s_t) (with a value model)
  eos [N], length [N]                  ended on a stop id; completion tokens
  reward/<name> [N]                    each term of the reward expression, and
  reward [N]                           their weighted sum (`rewards.combine`)

Token rewards are computed inside the scoring jit; rewards that read text (registered with
host=True) run on the host once per rollout, on the decoded completions, and their wall time is
returned as `time/reward_host_s`.

Shapes: P prompt length, L = max_new_tokens.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import kl as kl_lib
from rlhf_jax import model, registry, rewards as rewards_lib, sampling, sharding


def join(prompt_tokens, prompt_mask, completion, completion_mask):
    """[prompt | completion] sequences and masks: ([N, P+L], [N, P+L] int32)."""
    seq = jnp.concatenate([prompt_tokens, completion], axis=1)
    seq_mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(jnp.int32)
    return seq, seq_mask


def completion_logps(graphdef, params, seq, seq_mask, completion, completion_mask, *,
                     temperature: float = 1.0):
    """log pi(y_t | x, y_<t) of each completion token. seq = [prompt (P, left-padded), completion
    (L)]; logits at position P - 1 + j predict completion token j. Returns [N, L] (0 off-mask).
    Chunked over positions when the model's cfg.logits_chunk > 0 (`model.target_logprobs`)."""
    return model.target_logprobs(graphdef, params, seq, completion, completion_mask,
                                 mask_bt=seq_mask, temperature=temperature)[0]


@functools.lru_cache(maxsize=32)
def _scorer(graphdef, ref: bool, recompute: bool, value_graphdef, reward_graphdef,
            device_terms: tuple, temperature: float, stop_ids: tuple, chunks: int = 1):
    """One compiled scoring function per (models, options), shared by every consumer in the
    process. Inputs that change per call (parameters, gold tables) are arguments. chunks > 1
    scores the rows in that many sequential chunks (`lax.map`): every output is per row, so
    the result is the same, with the forward passes' activations of N / chunks rows alive."""

    def rows(params, prompt, prompt_mask, completion, completion_mask, sample_logps):
        completion_mask = completion_mask.astype(jnp.int32)
        seq, seq_mask = join(prompt, prompt_mask, completion, completion_mask)
        out = {"seq": seq, "seq_mask": seq_mask,
               "length": jnp.sum(completion_mask, axis=1),
               "eos": jnp.any(sampling.is_stop(completion, stop_ids) & (completion_mask > 0),
                              axis=1)}
        logps = sample_logps
        if recompute:
            logps = completion_logps(graphdef, params["policy"], seq, seq_mask, completion,
                                     completion_mask, temperature=temperature)
        out["logps"] = logps
        if ref:
            ref_logps = completion_logps(graphdef, params["ref"], seq, seq_mask, completion,
                                         completion_mask, temperature=temperature)
            out["ref_logps"] = ref_logps
            for name, kind in (("kl", "k1"), ("kl_k3", "k3")):
                out[name] = jnp.sum(kl_lib.estimate(logps=logps, ref_logps=ref_logps,
                                                    kind=kind, mask=completion_mask), axis=1)
        available = dict(seq=seq, seq_mask=seq_mask, prompt_mask=prompt_mask,
                         completion=completion, completion_mask=completion_mask,
                         tables=params.get("tables"))
        if reward_graphdef is not None:
            available["reward_model"] = (reward_graphdef, params["reward"])
        for term in device_terms:
            out[f"reward/{term.name}"] = registry.call(term.fn, **available)
        if value_graphdef is not None:
            values = model.apply_value(value_graphdef, params["value"], seq, mask_bt=seq_mask)
            p = prompt.shape[1]
            out["values"] = values[:, p - 1:-1] * completion_mask
        return out

    if chunks == 1:
        return jax.jit(rows)

    @jax.jit
    def score(params, *arrays):
        split = [x.reshape((chunks, x.shape[0] // chunks) + x.shape[1:]) for x in arrays]
        out = jax.lax.map(lambda a: rows(params, *a), split)
        return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)

    return score


def score(*, graphdef, terms, params: dict, prompt, prompt_mask, completion, completion_mask,
          sample_logps, temperature: float, stop_ids, tokenizer=None, recompute: bool = False,
          value_graphdef=None, reward_graphdef=None, monitor=(), fields=None,
          chunks: int = 1) -> dict:
    """Scores completions already sampled (see the module docstring for the keys).

    terms: the reward expression's `rewards.Term`s (from `rewards.parse`); monitor: further
    terms computed and returned as reward/<name> but not added to the reward (the testbed's
    gold reward beside a reward model's, for the metrics). params: "policy"
    (needed with recompute), "ref" (the reference: KL and ref_logps), "value" (with
    value_graphdef), "reward" (the reward model's params, with reward_graphdef; used by the
    "model" term), "tables" (the testbed's gold tables; the "gold" term). tokenizer decodes the
    completions for host (text) rewards; fields: {name: [N] str} of each row's prompt record,
    for the rewards that read them (`rewards.record_fields`). chunks: score the rows in this
    many sequential chunks (it must divide N), for memory; the same numbers.
    """
    everything = tuple(terms) + tuple(t for t in monitor if t.name not in
                                      {u.name for u in terms})
    device_terms = tuple(t for t in everything if not t.host)
    fn = _scorer(graphdef, "ref" in params, recompute, value_graphdef, reward_graphdef,
                 device_terms, float(temperature), sampling.stop_ids(stop_ids), int(chunks))
    out = fn(params, prompt, prompt_mask, completion, completion_mask, sample_logps)
    out.update(prompt=prompt, prompt_mask=prompt_mask, completion=completion,
               completion_mask=out["seq_mask"][:, prompt.shape[1]:], sample_logps=sample_logps)
    host_terms = [t for t in everything if t.host]
    if host_terms:
        if tokenizer is None:
            raise ValueError("a text reward needs the tokenizer to decode completions")
        # Timed from when the completions are on the host: the wait for the device is not
        # the reward's cost.
        tokens, mask = sharding.device_get((completion, out["completion_mask"]))
        t0 = time.perf_counter()
        texts = tokenizer.decode_batch(np.where(mask > 0, tokens, tokenizer.pad_id))
        for t in host_terms:
            out[f"reward/{t.name}"] = jnp.asarray(
                registry.call(t.fn, texts=texts, fields=fields or {}), jnp.float32)
        out["time/reward_host_s"] = time.perf_counter() - t0
    if terms:
        out["reward"] = rewards_lib.total(terms, out)
    return out


def sample_and_score(*, graphdef, terms, params: dict, prompt, prompt_mask, rng,
                     max_new_tokens: int, temperature: float, stop_ids, pad_id: int,
                     tokenizer=None, recompute: bool = False, value_graphdef=None,
                     reward_graphdef=None, monitor=(), fields=None, chunks: int = 1) -> dict:
    """Samples max_new_tokens from params["policy"] for each (left-padded) prompt row, then
    `score`s the completions. One call per rollout; rows are samples (repeat a prompt's row
    for several samples of it)."""
    completion, completion_mask, sample_logps = sampling.generate(
        (graphdef, params["policy"]), prompt, prompt_mask, rng,
        max_new_tokens=max_new_tokens, temperature=temperature, eos_id=stop_ids, pad_id=pad_id)
    return score(graphdef=graphdef, terms=terms, params=params, prompt=prompt,
                 prompt_mask=prompt_mask, completion=completion,
                 completion_mask=completion_mask, sample_logps=sample_logps,
                 temperature=temperature, stop_ids=stop_ids, tokenizer=tokenizer,
                 recompute=recompute, value_graphdef=value_graphdef,
                 reward_graphdef=reward_graphdef, monitor=monitor, fields=fields,
                 chunks=chunks)
