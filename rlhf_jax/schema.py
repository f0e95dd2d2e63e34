"""Config schemas: every config field's type, valid range and meaning, checked at load.

A schema is a nested dict that mirrors a config (an `ml_collections.ConfigDict`): each leaf is a
`Field`. `check(config, schema)` walks both together and raises a one-line `ConfigError` for the
first value of the wrong type or out of range ("optim.grad_clip=-1.0: must be a number >= 0
(global-norm gradient clipping; 0 turns it off)"). A config key without a schema entry is a bug
in rlhf_jax and raises a KeyError: the schema must cover the whole config. (A schema entry may
have no config key: stages share groups, and a stage may leave a field at the code's default.)

Registered functions (losses, estimators, controllers) declare the fields of their own
arguments the same way, where they are defined (`registry.register(..., args={...})`).

Checks across fields (a batch divisible by the minibatches, an option that excludes another)
stay in each trainer's `validate`, after this per-field check.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from rlhf_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Field:
    """One value's type and range. Build with Int, Float, Bool, Str, Choice, Spec, Tuple, Dict.

    kind: "int", "float", "bool", "str", "choice" (one of `choices`), "tuple", "spec" (a
      registry string) or "mapping".
    ge/gt/le/lt: bounds on numbers (and on each item of a tuple of numbers).
    choices: the allowed values of a "choice" (compared with their type: True is not 1).
    registry_kind: for "spec", the registry kind the string names a function of.
    item: for "tuple", the Field of each item; min_len / max_len: its fewest / most items.
    optional: None is allowed (the field's "not set").
    rule: a further check of a value of the right type: returns why it does not fit, or None.
    doc: what the field means, shown in errors and --help.
    """
    kind: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    registry_kind: str | None = None
    item: "Field | None" = None
    min_len: int = 0
    max_len: int | None = None
    optional: bool = False
    nonempty: bool = False
    rule: Callable[[Any], str | None] | None = None
    doc: str = ""

    # --- describing ---------------------------------------------------------------------------
    def describe(self) -> str:
        """The type and range in words: "an int >= 1", "a number in [0, 1)", ..."""
        if self.kind == "spec":
            from rlhf_jax import registry
            text = (f"the name of a registered {self.registry_kind}, or 'name(arg=value)': "
                    + ", ".join(registry.names(self.registry_kind)))
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "str":
            text = "a non-empty string" if self.nonempty else "a string"
        elif self.kind == "tuple":
            text = f"a tuple of {self.item.describe().removeprefix('a ').removeprefix('an ')}"
            if self.min_len and self.min_len == self.max_len:
                text += f" ({self.min_len} items)"
            elif self.min_len:
                text += f" (at least {self.min_len})"
        elif self.kind == "mapping":
            text = "a mapping"
        elif self.kind == "bool":
            text = "true or false"
        else:
            text = ("an int" if self.kind == "int" else "a number") + self._bounds()
        return text + (" or None" if self.optional else "")

    def _bounds(self) -> str:
        lo = (self.ge, "[") if self.ge is not None else (self.gt, "(")
        hi = (self.le, "]") if self.le is not None else (self.lt, ")")
        if lo[0] is not None and hi[0] is not None:
            return f" in {lo[1]}{_num(lo[0])}, {_num(hi[0])}{hi[1]}"
        if lo[0] is not None:
            return f" {'>=' if lo[1] == '[' else '>'} {_num(lo[0])}"
        if hi[0] is not None:
            return f" {'<=' if hi[1] == ']' else '<'} {_num(hi[0])}"
        return ""

    # --- checking -----------------------------------------------------------------------------
    def problem(self, value) -> str | None:
        """Why `value` does not fit, or None when it does."""
        why = self._type_problem(value)
        if why is None and value is not None and self.rule is not None:
            why = self.rule(value)
        return why

    def _type_problem(self, value) -> str | None:
        if value is None:
            return None if self.optional else "must be set"
        if self.kind == "bool":
            return None if isinstance(value, bool) else "must be true or false"
        if self.kind in ("int", "float"):
            # bool is an int in Python, but `steps=True` is a mistake, not the number 1.
            ok_types = (int,) if self.kind == "int" else (int, float)
            if isinstance(value, bool) or not isinstance(value, ok_types):
                return f"must be {self.describe()}"
            if not math.isfinite(value):
                return f"must be a finite number ({self.describe().removeprefix('a ')})"
            if ((self.ge is not None and value < self.ge) or (self.gt is not None
                                                               and value <= self.gt)
                    or (self.le is not None and value > self.le)
                    or (self.lt is not None and value >= self.lt)):
                return f"must be {self.describe()}"
            return None
        if self.kind == "choice":
            ok = any(type(value) is type(c) and value == c for c in self.choices)
            return None if ok else f"must be {self.describe()}"
        if self.kind == "str":
            if not isinstance(value, str):
                return f"must be {self.describe()}"
            if self.nonempty and not value:
                return "must not be empty"
            return None
        if self.kind == "spec":
            from rlhf_jax import registry
            if not isinstance(value, str):
                return f"must be {self.describe()}"
            try:
                registry.validate(self.registry_kind, value)
            except ValueError as e:
                return str(e)
            return None
        if self.kind == "tuple":
            if not isinstance(value, (tuple, list)):
                return f"must be {self.describe()}"
            if len(value) < self.min_len or (self.max_len is not None
                                              and len(value) > self.max_len):
                return f"must be {self.describe()}"
            for i, v in enumerate(value):
                why = self.item.problem(v)
                if why:
                    return f"item {i} ({v!r}) {why}"
            return None
        if self.kind == "mapping":
            return None if isinstance(value, Mapping) or hasattr(value, "items") else \
                "must be a mapping"
        raise AssertionError(f"unknown field kind {self.kind!r}")


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def Int(*, ge=None, gt=None, le=None, lt=None, optional=False, doc="") -> Field:
    return Field("int", ge=ge, gt=gt, le=le, lt=lt, optional=optional, doc=doc)


def Float(*, ge=None, gt=None, le=None, lt=None, optional=False, doc="") -> Field:
    return Field("float", ge=ge, gt=gt, le=le, lt=lt, optional=optional, doc=doc)


def Bool(*, doc="") -> Field:
    return Field("bool", doc=doc)


def Str(*, nonempty=False, optional=False, doc="") -> Field:
    return Field("str", nonempty=nonempty, optional=optional, doc=doc)


def Choice(*choices, doc="") -> Field:
    return Field("choice", choices=tuple(choices), doc=doc)


def Spec(registry_kind: str, *, doc="") -> Field:
    return Field("spec", registry_kind=registry_kind, doc=doc)


def Tuple(item: Field, *, min_len=0, max_len=None, rule=None, doc="") -> Field:
    return Field("tuple", item=item, min_len=min_len, max_len=max_len, rule=rule, doc=doc)


def Dict(*, doc="") -> Field:
    return Field("mapping", doc=doc)


# ---------------------------------------------------------------------------------------------
# Whole configs
# ---------------------------------------------------------------------------------------------

def check_value(key: str, value, field: Field) -> None:
    """Raises a one-line ConfigError when `value` (at dotted `key`) does not fit `field`."""
    why = field.problem(value)
    if why:
        hint = f" ({field.doc})" if field.doc else ""
        raise ConfigError(f"{key}={value!r}: {why}{hint}")


def _items(node) -> dict:
    if hasattr(node, "items"):
        return dict(node.items())
    raise TypeError(f"expected a config dict, got {type(node).__name__}")


def _is_group(node) -> bool:
    return isinstance(node, Mapping) and not isinstance(node, Field)


def check(config, schema: dict, prefix: str = "") -> None:
    """Checks every field of `config` against `schema` (see the module docstring)."""
    values = _items(config)
    for key, value in values.items():
        dotted = prefix + key
        if key not in schema:
            raise KeyError(f"config field {dotted!r} has no schema entry; declare its type and "
                           "range beside the config's defaults")
        field = schema[key]
        if _is_group(field):
            check(value, field, dotted + ".")
        else:
            check_value(dotted, value, field)


def lookup(schema: dict, dotted: str) -> Field | dict | None:
    """The Field (or group) at `dotted`, or None."""
    node: Any = schema
    for key in dotted.split("."):
        if not _is_group(node) or key not in node:
            return None
        node = node[key]
    return node


def describe(config, schema: dict, prefix: str = "") -> list[tuple[str, Any, Field, str]]:
    """(dotted key, value, Field, meaning) for every field of `config`."""
    rows = []
    for key, value in _items(config).items():
        field = schema.get(key)
        if _is_group(field):
            rows += describe(value, field, prefix + key + ".")
        elif field is not None:
            rows.append((prefix + key, value, field, field.doc))
    return rows
