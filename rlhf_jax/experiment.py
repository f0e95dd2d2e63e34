"""Command line of experiment modules: `--workdir DIR [--config.key=value ...]`.

Every module under experiments/ ends with

    if __name__ == "__main__":
        experiment.run(get_config, main)

where `get_config(size)` returns an `ml_collections.ConfigDict` for a named size ("default",
"smoke", ...) and `main(config, workdir)` does the work. `--config.size=NAME` picks the size
first, then every other `--config.a.b=value` override is applied on top, type-checked against
the existing field, and the config is locked, so a typo fails at load with the valid keys
instead of being silently ignored.
"""

import ast
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import ml_collections


# XLA:CPU (this JAX version) fuses elementwise backward ops (SiLU', the logits gradient) into
# the operands of its YNNPACK matmuls in transposed layout, which makes small-model training
# steps ~15-30% slower; this flag keeps YNNPACK to the matmuls themselves (tools/bench.py,
# docs/model.md). It is read only by the CPU compiler.
CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot"


def use_fast_cpu_flags() -> None:
    """Adds CPU_XLA_FLAG to XLA_FLAGS unless an xla_cpu_experimental_ynn flag is already set.

    Takes effect only before JAX starts its backend (the first array or compile), which is why
    `run` calls it first thing. Set XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=default
    (or any value) to keep a choice of your own."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + CPU_XLA_FLAG).strip()


def _parse_value(text: str, current):
    """The override text as the type of the field it replaces."""
    if isinstance(current, str) or current is None and not _looks_literal(text):
        return text
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"cannot read {text!r} as a {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def _looks_literal(text: str) -> bool:
    try:
        ast.literal_eval(text)
        return True
    except (ValueError, SyntaxError):
        return False


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]):
    """Sets dotted keys of `config` from strings; unknown keys fail with the valid ones."""
    for dotted, text in overrides.items():
        node, *parents = config, []
        keys = dotted.split(".")
        for key in keys[:-1]:
            if key not in node:
                raise ValueError(f"unknown config key {dotted!r}: {'.'.join(parents + [key])!r} "
                                 f"is not one of {sorted(node.keys())}")
            node = node[key]
            parents.append(key)
        last = keys[-1]
        if last not in node:
            raise ValueError(f"unknown config key {dotted!r}; valid keys here: "
                             f"{sorted(node.keys())}")
        try:
            value = _parse_value(text, node[last])
            setattr(node, last, value)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--config.{dotted}={text}: {e}") from None
    return config


def parse_args(argv: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """argv -> (workdir, {dotted key: value text}). Accepts `--k=v` and `--k v`."""
    workdir, overrides = None, {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; use --workdir DIR and "
                             "--config.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"{arg} needs a value")
            value, i = args[i + 1], i + 1
        if key == "workdir":
            workdir = value
        elif key.startswith("config."):
            overrides[key[len("config."):]] = value
        else:
            raise ValueError(f"unknown flag --{key}; use --workdir DIR and --config.key=value")
        i += 1
    return workdir, overrides


def load_config(get_config: Callable[..., ml_collections.ConfigDict],
                overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """get_config(size) with the overrides applied, then locked."""
    overrides = dict(overrides)
    size = overrides.pop("size", None)
    config = get_config(size) if size is not None else get_config()
    apply_overrides(config, overrides)
    config.lock()
    return config


def run(get_config, main, argv: Sequence[str] | None = None):
    """Parses the command line, loads and validates the config, and calls main(config, workdir)."""
    argv = sys.argv[1:] if argv is None else argv
    use_fast_cpu_flags()
    try:
        workdir, overrides = parse_args(argv)
        if workdir is None:
            raise ValueError("--workdir DIR is required: the directory the run writes into")
        config = load_config(get_config, overrides)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return main(config, Path(workdir))
