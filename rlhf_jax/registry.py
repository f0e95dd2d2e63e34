"""Names -> functions: the one list of valid loss, estimator and controller names.

An ablation is a config string. `get(kind, "ipo(tau=0.05)")` finds the function registered as
"ipo" under the kind "pref_loss" and returns it with `tau=0.05` bound (a `functools.partial`).
Only the arguments a function declares where it is registered may be bound, with literal
values (numbers, strings, booleans, None, tuples) inside the declared type and range:

    @registry.register("pref_loss", args={"tau": schema.Float(gt=0, doc="IPO's margin 1/(2 tau)")})
    def ipo(*, policy_chosen_logps, ..., tau=0.1): ...

anything else fails at config load with the list of what is registered or accepted, or the
range the value is outside of (`ppo_clip(clip_eps=0)` is refused when the config is read, not
when the loss is first traced).

Kinds and the calling convention of their functions:

  reward_loss   (*, chosen_rewards, rejected_rewards, ...) or (*, rewards) -> (loss, metrics)
  pref_loss     (*, policy_chosen_logps, policy_rejected_logps, [ref_*_logps], [*_lengths], ...)
                -> (loss, metrics)
  unpaired_loss (*, policy_logps, ref_logps, desirable, [kl_policy_logps, kl_ref_logps,
                kl_weights], ...) -> (loss, metrics)   one completion per row (KTO)
  policy_loss   (*, logps, advantages, mask, [old_logps], ...) -> (loss, metrics)
  advantage     (*, rewards, mask, [values], [group_size], ...) -> (advantages, returns)  [B, T]
  kl_estimator  (*, logps, ref_logps) -> per-token estimate
  kl_controller (state, *, kl, n_steps, ...) -> state
  loss_agg      (per_token, mask) -> (sum, denominator)
  reward        (*, [seq, seq_mask, prompt_mask, completion, completion_mask, reward_model,
                tables, texts], ...) -> scores [N]   (rlhf_jax/rewards.py)
  adapter       (*, ...) -> {ModelConfig field: value}: parameter-efficient adapters (LoRA),
                the `lora` key of every stage (rlhf_jax/model.py)

Within a kind the functions take different subsets of the inputs a trainer has (SimPO needs no
reference log-probs, GAE needs values, GRPO a group size). `call(fn, **available)` passes each
function exactly the inputs it declares, and `accepts(fn, name)` lets a trainer skip computing
an input nobody asks for (e.g. the reference forward pass for a reference-free loss).
"""

import ast
import functools
import importlib
import inspect
from typing import Any, Callable

from rlhf_jax.errors import ConfigError

KINDS = ("reward_loss", "pref_loss", "unpaired_loss", "policy_loss", "advantage", "kl_estimator",
         "kl_controller", "loss_agg", "reward", "data_source", "adapter")

# Modules whose import registers functions; loaded on the first lookup so that the registry
# itself imports nothing and can be imported from any of them.
_PROVIDERS = ("rlhf_jax.aggregation", "rlhf_jax.kl", "rlhf_jax.losses", "rlhf_jax.advantages",
              "rlhf_jax.rewards", "rlhf_jax.data.sources", "rlhf_jax.model")

_REGISTRY: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}
# kind -> name -> {argument: schema.Field}: the arguments a config string may set.
_ARGS: dict[str, dict[str, dict]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str | None = None, fn: Callable | None = None, *,
             args: dict | None = None):
    """Registers `fn` under `kind` as `name` (default: its __name__). Usable as a decorator.

    `args` maps each argument a config string may set to its `schema.Field` (type, range,
    meaning); every other parameter is an input the trainer passes. A name may be registered
    once per kind; registering it again is an error, so two modules can never silently
    disagree about what a config string means.
    """
    _check_kind(kind)
    args = dict(args or {})

    def _add(f):
        key = name or f.__name__
        if key in _REGISTRY[kind] and _REGISTRY[kind][key] is not f:
            raise ValueError(f"{kind} {key!r} is already registered")
        params = inspect.signature(f).parameters
        undeclared = [a for a in args if a not in params]
        if undeclared:
            raise TypeError(f"{kind} {key!r}: args {undeclared} are not parameters of it")
        _REGISTRY[kind][key] = f
        _ARGS[kind][key] = args
        return f

    return _add(fn) if fn is not None else _add


def names(kind: str) -> list[str]:
    """The registered names of `kind`, sorted."""
    _check_kind(kind)
    _load_providers()
    return sorted(_REGISTRY[kind])


def parse(spec: str) -> tuple[str, dict[str, Any]]:
    """Splits "name(arg=value, ...)" into ("name", {"arg": value, ...})."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"expected a name or 'name(arg=value, ...)', got {spec!r}")
    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError as e:
        raise ConfigError(f"cannot parse {spec!r}: write a name or 'name(arg=value, ...)'") from e
    if isinstance(node, ast.Name):
        return node.id, {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ConfigError(f"cannot parse {spec!r}: write a name or 'name(arg=value, ...)'")
    if node.args:
        raise ConfigError(f"{spec!r}: arguments must be given by keyword, e.g. 'ipo(tau=0.05)'")
    kwargs = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ConfigError(f"{spec!r}: '**' is not allowed; name each argument")
        if kw.arg in kwargs:
            raise ConfigError(f"{spec!r}: {kw.arg!r} is given twice")
        try:
            value = ast.literal_eval(kw.value)
        except ValueError:
            value = None
            ok = False
        else:
            ok = _is_scalar_literal(value)
        if not ok:
            raise ConfigError(f"{spec!r}: the value of {kw.arg!r} must be a literal "
                             "(number, string, bool, None, or a tuple of those)")
        kwargs[kw.arg] = value
    return node.func.id, kwargs


def _is_scalar_literal(value) -> bool:
    if isinstance(value, tuple):
        return all(_is_scalar_literal(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def get(kind: str, spec: str | Callable) -> Callable:
    """Returns the function registered under `kind` for `spec`, with its arguments bound.

    `spec` is "name" or "name(arg=value, ...)"; a callable is returned unchanged, so code that
    takes a loss can be handed either a config string or a function.
    """
    if callable(spec):
        return spec
    return _get_cached(kind, spec)


@functools.cache
def _get_cached(kind: str, spec: str) -> Callable:
    # Cached so the same spec always yields the same object: a partial used as a static
    # argument of jax.jit then hashes equal and does not trigger a recompile.
    _check_kind(kind)
    _load_providers()
    name, kwargs = parse(spec)
    table = _REGISTRY[kind]
    if name not in table:
        raise ConfigError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(table))}")
    fn = table[name]
    declared = _ARGS[kind][name]
    unknown = sorted(set(kwargs) - set(declared))
    if unknown:
        raise ConfigError(f"{kind} {name!r} has no argument {', '.join(map(repr, unknown))} "
                          f"that a config can set; it accepts: "
                          f"{', '.join(declared) or '(none)'}")
    for arg, value in kwargs.items():
        why = declared[arg].problem(value)
        if why:
            hint = f" ({declared[arg].doc})" if declared[arg].doc else ""
            raise ConfigError(f"{kind} {name}: {arg}={value!r} {why}{hint}")
    return functools.partial(fn, **kwargs) if kwargs else fn


def arguments(kind: str, name: str) -> dict:
    """{argument: schema.Field} of what a config string may set on the function `name`."""
    _check_kind(kind)
    _load_providers()
    return dict(_ARGS[kind][name])


def validate(kind: str, spec: str | Callable) -> None:
    """Raises the same error `get` would; for checking configs at load time."""
    get(kind, spec)


def accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` (or the function under a partial) takes a keyword argument `name`."""
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def call(fn: Callable, **available):
    """Calls `fn` with the subset of `available` it declares as parameters.

    Arguments already bound by a partial win over `available`, so a config string such as
    "grpo(scale=False)" is not overridden by what a caller passes. A required parameter
    missing from `available` raises a TypeError naming it.
    """
    params = inspect.signature(fn).parameters
    bound = fn.keywords if isinstance(fn, functools.partial) else {}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        chosen = {k: v for k, v in available.items() if k not in bound}
    else:
        chosen = {k: v for k, v in available.items() if k in params and k not in bound}
    missing = [n for n, p in params.items()
               if p.default is p.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
               and n not in chosen and n not in bound]
    if missing:
        raise TypeError(f"{_name(fn)} needs {', '.join(missing)}, which the caller did not "
                        f"provide (it provided: {', '.join(sorted(available))})")
    return fn(**chosen)


def _name(fn: Callable) -> str:
    return getattr(getattr(fn, "func", fn), "__name__", repr(fn))


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")


@functools.cache
def _load_providers() -> None:
    for module in _PROVIDERS:
        importlib.import_module(module)
