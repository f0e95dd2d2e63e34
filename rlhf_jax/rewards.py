"""Reward sources as a registry kind ("reward"), and reward expressions that combine them.

A trainer's reward is a config string: one source, or a weighted sum of several,

    reward = "model"                                     # a reward model r_phi (stage or HF)
    reward = "gold"                                      # the testbed's known r*
    reward = "model + 0.1*length_penalty(target=20)"     # shaped: each term logged on its own
    reward = "gold - 0.5*overlong(max_len=48, cache=8)"  # DAPO's soft overlong punishment

`parse(expr)` turns it into `Term`s (coefficient, name, bound function); each name is looked
up in the registry under the kind "reward", with its arguments checked against the ranges it
declares, so a typo or an out-of-range argument fails when the config is read.

A reward function is keyword-only and takes, of what a rollout has, what it needs (the rollout
calls it through `registry.call`), returning scores [N] float32:

  seq [N, P+L], seq_mask        the prompt (left-padded) and completion, joined
  prompt_mask [N, P]            1 on real prompt tokens
  completion [N, L], completion_mask [N, L]    1 up to and including the stop token
  reward_model                  (graphdef, params) of a reward model, for "model"
  tables                        the testbed's gold tables, for "gold"
  texts                         the decoded completions (a list of N str), for text rewards
  fields                        {name: [N] str}: fields of each row's prompt record (a
                                verifier's answer), as `record_fields(terms)` asks for them

Token rewards run inside the rollout's jit. A function registered with `host=True` reads the
decoded text instead: it runs on the host, once per rollout, on numpy/str inputs, and the
rollout reports its cost as time/reward_host_s.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from typing import Callable

import jax.numpy as jnp
import numpy as np

from rlhf_jax import model, registry, schema
from rlhf_jax.data import synthetic
from rlhf_jax.errors import ConfigError

# Reward functions that read decoded text and run on the host (not traced).
_HOST: set[str] = set()


def register(name: str, *, args: dict | None = None, host: bool = False):
    """Registers a reward function under the kind "reward" (a decorator)."""
    def add(fn):
        registry.register("reward", name, fn, args=args or {})
        if host:
            _HOST.add(name)
        return fn
    return add


def _lengths(completion_mask):
    return jnp.sum(completion_mask.astype(jnp.float32), axis=1)


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


@register("model")
def reward_model(*, seq, seq_mask, reward_model):
    """r_phi(x, y): a reward model's score at the last real token of [prompt | completion]
    (a reward stage, or a *ForSequenceClassification checkpoint). [N]."""
    graphdef, params = reward_model
    return model.apply_reward(graphdef, params, seq, mask_bt=seq_mask)


@register("gold")
def gold(*, seq, prompt_mask, completion_mask, tables):
    """The testbed's gold reward r*(x, y) of the completion tokens (the prompt is context;
    docs/testbed.md). Reads the testbed's own token ids. [N]."""
    scored = jnp.concatenate([jnp.zeros_like(prompt_mask), completion_mask], axis=1)
    return synthetic.gold_reward_from_tables(tables, seq, scored.astype(jnp.int32))


@register("length_penalty", args={
    "target": schema.Int(ge=1, doc="the completion length (tokens) that is not penalised")})
def length_penalty(*, completion_mask, target=32):
    """-|L - target| / target for a completion of L tokens (the stop token included): a
    two-sided pull toward a target length, 0 at the target, -1 at 0 or 2 x target. [N]."""
    return -jnp.abs(_lengths(completion_mask) - target) / target


@register("overlong", args={
    "max_len": schema.Int(ge=1, doc="L_max: completions longer than this get -1"),
    "cache": schema.Int(ge=0, doc="L_cache: the soft band below max_len")})
def overlong(*, completion_mask, max_len=512, cache=128):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), in tokens: 0 for L <=
    max_len - cache, (max_len - cache - L) / cache in the band, -1 beyond max_len. [N].

    A completion the sampler cut at rollout.max_new_tokens has L = max_new_tokens; set max_len
    to it so truncation itself costs -1 (combine with `missing_eos_penalty` or not)."""
    length = _lengths(completion_mask)
    start = max_len - cache
    band = (start - length) / max(cache, 1)
    return jnp.where(length <= start, 0.0, jnp.where(length > max_len, -1.0, band))


@register("regex", host=True, args={
    "pattern": schema.Str(nonempty=True, doc="a Python regular expression"),
    "full": schema.Bool(doc="match the whole completion, not a part of it")})
def regex(*, texts, pattern=".", full=False):
    """1.0 where the decoded completion matches `pattern` (re.search; re.fullmatch with
    full=True), else 0.0: a format check. Runs on the host. [N] float32."""
    rx = re.compile(pattern)
    test = rx.fullmatch if full else rx.search
    return np.asarray([1.0 if test(t) else 0.0 for t in texts], np.float32)


@register("exact_match", host=True, args={
    "field": schema.Str(nonempty=True, doc="the prompt record's field holding the answer"),
    "pattern": schema.Str(doc="a regular expression whose last match in the completion (its "
                              "group 1, if it has groups) is the answer; '' = the whole "
                              "completion")})
def exact_match(*, texts, fields, field="answer", pattern=""):
    """1.0 where the completion's answer equals the prompt record's `field`, else 0.0: a
    verifier (RL with verifiable rewards). Runs on the host. [N] float32.

    The answer is the whole completion, or with `pattern` its last match (group 1 if the
    pattern has groups: "####\\s*(-?[0-9,]+)" reads a GSM8K-style final line). Whitespace is
    removed from both sides before comparing, so "6 2" matches "62"; no match scores 0.
    """
    rx = re.compile(pattern) if pattern else None
    out = np.zeros(len(texts), np.float32)
    for i, (text, want) in enumerate(zip(texts, fields[field])):
        if rx is not None:
            found = list(rx.finditer(text))
            if not found:
                continue
            text = found[-1].group(1 if rx.groups else 0)
        out[i] = float("".join(text.split()) == "".join(str(want).split()))
    return out


def record_fields(terms) -> tuple[str, ...]:
    """The prompt-record fields the terms read (exact_match's `field`), for the batches to
    carry: a term reads fields when it takes `fields`, and names them by its `field` argument."""
    out = []
    for t in terms:
        if registry.accepts(t.fn, "fields"):
            bound = getattr(t.fn, "keywords", {})
            name = bound.get("field", inspect.signature(t.fn).parameters["field"].default)
            if name not in out:
                out.append(name)
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Expressions
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Term:
    """One weighted term of a reward expression."""
    coef: float
    name: str                    # the registered name, also the metric name reward/<name>
    fn: Callable                 # the registered function, arguments bound
    host: bool                   # reads decoded text on the host


def _split(expr: str) -> list[tuple[float, str]]:
    """'a + 0.1*b(x=1) - c' -> [(1, 'a'), (0.1, 'b(x=1)'), (-1, 'c')]: + and - outside
    parentheses separate terms (not the sign of an exponent, 2.5e-1); a term may start with a
    number and '*'."""
    parts, depth, start, sign = [], 0, 0, 1.0
    text = expr.strip()
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch in "+-" and depth == 0 and not re.search(r"(^|[^\w.])[\d.]+[eE]$",
                                                            text[start:i].strip()):
            parts.append((sign, text[start:i].strip()))
            sign, start = (1.0 if ch == "+" else -1.0), i + 1
    parts.append((sign, text[start:].strip()))
    if parts[0] == (1.0, ""):        # a leading sign: "-0.5*overlong"
        parts = parts[1:]
    out = []
    for sign, part in parts:
        coef, _, spec = part.rpartition("*") if "*" in part.split("(")[0] else ("", "", part)
        try:
            value = float(ast.literal_eval(coef.strip())) if coef else 1.0
        except (ValueError, SyntaxError):
            raise ConfigError(f"reward {expr!r}: {coef.strip()!r} is not a number; write terms "
                              "as 'name', 'name(arg=value)' or 'coef*name(...)', joined by "
                              "+ or -") from None
        out.append((sign * value, spec.strip()))
    return out


def parse(expr: str) -> tuple[Term, ...]:
    """A reward expression -> its terms. Raises a ConfigError naming what is wrong."""
    if not isinstance(expr, str) or not expr.strip():
        raise ConfigError(f"reward: expected a reward expression such as 'model' or "
                          f"'model + 0.1*length_penalty(target=20)', got {expr!r}")
    terms = []
    for coef, spec in _split(expr):
        if not spec:
            raise ConfigError(f"reward {expr!r}: an empty term; write 'name' or "
                              "'coef*name(arg=value)' between the + and - signs")
        name, _ = registry.parse(spec)
        fn = registry.get("reward", spec)
        terms.append(Term(coef, name, fn, name in _HOST))
    names = [t.name for t in terms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"reward {expr!r}: {dup} appear more than once; combine them into "
                          "one term")
    return tuple(terms)


def names(expr: str) -> set[str]:
    """The reward sources an expression uses, e.g. {"model", "length_penalty"}."""
    return {t.name for t in parse(expr)}


def combine(terms, scores: dict) -> jnp.ndarray:
    """sum_i coef_i * scores[name_i], in the order of the expression. A single term with
    coefficient 1 is returned as it is (bit for bit)."""
    total = None
    for t in terms:
        s = scores[t.name] if t.coef == 1.0 else t.coef * scores[t.name]
        total = s if total is None else total + s
    return total


def total(terms, rollout: dict) -> jnp.ndarray:
    """The weighted sum of the terms' scores in a scored rollout (its reward/<name> keys)."""
    return combine(terms, {t.name: rollout[f"reward/{t.name}"] for t in terms})


def _expression_problem(value) -> str | None:
    try:
        parse(value)
    except ConfigError as e:
        return str(e)
    return None


def Expression(*, doc: str = "") -> schema.Field:
    """A config field holding a reward expression, checked with `parse` when read."""
    return schema.Field("str", nonempty=True, rule=_expression_problem, doc=doc or (
        "a reward expression: 'model', 'gold', or a weighted sum such as "
        "'model + 0.1*length_penalty(target=20)' (sources: rlhf_jax/rewards.py)"))
