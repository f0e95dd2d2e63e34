"""Command line of experiment modules: `--workdir DIR [--config.key=value ...]` or `--help`.

Every module under experiments/ exports `get_config(size)`, which returns an
`ml_collections.ConfigDict` for a named size ("default", "smoke", ...), `SCHEMA`, the type,
range and meaning of every field of that config (rlhf_jax/schema.py), and `main(config,
workdir)`, which does the work; it ends with

    if __name__ == "__main__":
        experiment.run(get_config, main)

`--config.size=NAME` picks the size first, then every other `--config.a.b=value` override is
applied on top, parsed as the field's type, the whole config is checked against the schema and
locked, so a typo or an impossible value fails at load, not after an hour of training.

Failing well: a `UserError` (a bad config, data file or checkpoint; rlhf_jax/errors.py) is
printed as one line, `error: <what>; <how to fix>`, and the process exits with status 2; a
non-finite loss stops the run with one line and status 1. Any other exception is a bug in
rlhf_jax and keeps its traceback. `--help` prints the module's docstring and its config: every
key with its default, type, range and meaning.

What the terminal shows: progress bars, one line per prepared dataset, each stage's summary and
the experiment's results. Library log records (absl, TFDS, Orbax, JAX) and Python warnings go
to WORKDIR/log.txt instead, where they can still be read.
"""

import ast
import difflib
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import ml_collections

from rlhf_jax import schema as schema_lib
from rlhf_jax.errors import ConfigError, UserError


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


def _parse_value(text: str, current, field=None):
    """The override text as the type of the field it replaces (its schema field's, if given)."""
    if field is not None and field.kind == "choice":
        for choice in field.choices:
            if str(choice).lower() == text.lower():
                return choice
        raise ValueError(f"must be {field.describe()}")
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
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, tuple) and not isinstance(value, tuple):
        value = (value,)        # --config.data.buckets=36 means (36,)
    return value


def _looks_literal(text: str) -> bool:
    try:
        ast.literal_eval(text)
        return True
    except (ValueError, SyntaxError):
        return False


def _is_group(node) -> bool:
    return isinstance(node, ml_collections.ConfigDict)


def _all_keys(config, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if _is_group(value):
            keys += _all_keys(value, prefix + key + ".")
    return keys


def unknown_key_message(config, dotted: str) -> str:
    """"unknown config key ...; did you mean ...?" with the closest valid keys."""
    keys = _all_keys(config)
    close = difflib.get_close_matches(dotted, keys, n=3, cutoff=0.6)
    # A near-certain match (a typo) is shown alone, not beside keys that merely share a group.
    if close and difflib.SequenceMatcher(None, dotted, close[0]).ratio() >= 0.9:
        close = close[:1]
    hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
            else "see --help for the valid keys")
    return f"unknown config key {dotted!r}; {hint}"


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str],
                    schema: dict | None = None):
    """Sets dotted keys of `config` from strings; an unknown key fails with the closest ones.

    A mapping field (mesh.rules) takes a whole dict, `--config.mesh.rules="{'embed': 'fsdp'}"`,
    or one entry, `--config.mesh.rules.embed=fsdp`."""
    for dotted, text in overrides.items():
        node = config
        keys = dotted.split(".")
        for i, key in enumerate(keys[:-1]):
            if not _is_group(node) or key not in node or not _is_group(node[key]):
                raise ConfigError(unknown_key_message(config, dotted))
            node = node[key]
            if _is_mapping(schema, ".".join(keys[:i + 1])):
                entry = ".".join(keys[i + 1:])
                node[entry] = ast.literal_eval(text) if _looks_literal(text) else text
                break
        else:
            _set_field(config, node, dotted, keys[-1], text, schema)
    return config


def _is_mapping(schema, dotted: str) -> bool:
    field = schema_lib.lookup(schema, dotted) if schema is not None else None
    return isinstance(field, schema_lib.Field) and field.kind == "mapping"


def _set_field(config, node, dotted: str, last: str, text: str, schema) -> None:
    if last not in node or (_is_group(node[last]) and not _is_mapping(schema, dotted)):
        raise ConfigError(unknown_key_message(config, dotted))
    field = schema_lib.lookup(schema, dotted) if schema is not None else None
    field = field if isinstance(field, schema_lib.Field) else None
    try:
        if field is not None and field.kind == "mapping":
            value = ast.literal_eval(text) if _looks_literal(text) else None
            if not isinstance(value, dict):
                raise ValueError("must be a mapping, e.g. \"{'embed': 'fsdp'}\"")
        else:
            value = _parse_value(text, node[last], field)
        if field is not None:
            # The schema, checked next, is the type authority: it allows what the default's
            # type alone would not (None for an optional field, 'auto' beside booleans).
            with node.ignore_type():
                setattr(node, last, value)
        else:
            setattr(node, last, value)
    except (ValueError, TypeError, SyntaxError) as e:
        why = f"must be {field.describe()}" if field is not None else str(e)
        if isinstance(e, ValueError) and field is not None and field.kind in ("choice",
                                                                             "mapping"):
            why = str(e)
        raise ConfigError(f"--config.{dotted}={text}: {why}") from None


def parse_args(argv: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """argv -> (workdir, {dotted key: value text}). Accepts `--k=v` and `--k v`."""
    workdir, overrides = None, {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --workdir DIR and "
                              "--config.key=value (--help lists the keys)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value, e.g. {arg}=VALUE")
            value, i = args[i + 1], i + 1
        if key == "workdir":
            workdir = value
        elif key.startswith("config."):
            overrides[key[len("config."):]] = value
        else:
            raise ConfigError(f"unknown flag --{key}; use --workdir DIR and --config.key=value "
                              "(--help lists the keys)")
        i += 1
    return workdir, overrides


def module_schema(get_config: Callable) -> dict:
    """The SCHEMA of the experiment module that defines `get_config`."""
    module = sys.modules[get_config.__module__]
    if not hasattr(module, "SCHEMA"):
        raise AttributeError(f"{module.__name__} defines get_config but no SCHEMA; every "
                             "experiment module declares the schema of its config")
    return module.SCHEMA


def load_config(get_config: Callable[..., ml_collections.ConfigDict],
                overrides: dict[str, str], schema: dict | None = None
                ) -> ml_collections.ConfigDict:
    """get_config(size) with the overrides applied, checked against the schema, then locked.

    `schema` defaults to the SCHEMA of get_config's module."""
    schema = module_schema(get_config) if schema is None else schema
    overrides = dict(overrides)
    size = overrides.pop("size", None)
    config = get_config(size) if size is not None else get_config()
    apply_overrides(config, overrides, schema)
    schema_lib.check(config, schema)
    config.lock()
    return config


def help_text(get_config: Callable, schema: dict | None = None, doc: str | None = None) -> str:
    """The module's docstring, then every config key: default, type and range, meaning."""
    schema = module_schema(get_config) if schema is None else schema
    doc = sys.modules[get_config.__module__].__doc__ if doc is None else doc
    from rlhf_jax import registry
    rows = schema_lib.describe(get_config(), schema)
    width = min(max(len(k) for k, *_ in rows), 34)
    lines = [(doc or "").strip(), "",
             "Flags: --workdir DIR (required), --config.KEY=VALUE (any key below), --help.", "",
             "Config (key = default: type and range; meaning):"]
    kinds = []
    for key, default, field, meaning in rows:
        default = default.to_dict() if _is_group(default) else default
        lines.append(f"  {key:<{width}} = {default!r}: {field.describe()}"
                     + (f"; {meaning}" if meaning else ""))
        if field.kind == "spec" and field.registry_kind not in kinds:
            kinds.append(field.registry_kind)
    if kinds:
        lines += ["", "Registered functions (a config string is 'name' or "
                  "'name(arg=value, ...)'; these are the arguments it may set):"]
    for kind in kinds:
        for name in registry.names(kind):
            args = ", ".join(f"{a}: {f.describe()}" for a, f in
                             registry.arguments(kind, name).items())
            lines.append(f"  {kind:<13} {name}" + (f"({args})" if args else ""))
    return "\n".join(lines)


def run(get_config, main, argv: Sequence[str] | None = None):
    """Parses the command line, loads and validates the config, and calls main(config, workdir).

    A UserError, from the command line or from `main`, exits with status 2 and one line."""
    from rlhf_jax.trainers.common import NonFiniteError
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text(get_config))
        return None
    use_fast_cpu_flags()
    try:
        workdir, overrides = parse_args(argv)
        if workdir is None:
            raise ConfigError("--workdir DIR is required: the directory the run writes into")
        config = load_config(get_config, overrides)
        log_to_file(Path(workdir))
        return main(config, Path(workdir))
    except UserError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None


LOG_FILE = "log.txt"


def log_to_file(workdir: Path) -> Path:
    """Sends Python logging (absl, TFDS, Orbax, JAX all use it) and warnings to WORKDIR/log.txt.

    The root logger's handlers (absl's stderr handler among them) are replaced by one that
    appends to the file, so a re-run or a second process adds to it rather than erasing it."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOG_FILE
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, logging.FileHandler) and old.baseFilename.endswith(LOG_FILE):
            old.close()     # ours, from an earlier run in this process
    root.addHandler(handler)
    # Warnings and errors only: at INFO, Orbax alone writes ~50 lines per checkpoint.
    root.setLevel(logging.WARNING)
    # Off then on: a no-op call would leave out a warnings.showwarning that something else
    # (pytest, another tool) has put back since an earlier call.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    # Errors Python can only report, not raise (e.g. Orbax's abandoned reads of a damaged
    # checkpoint, garbage-collected after the damage was handled): to the log, not the screen.
    sys.unraisablehook = _log_unraisable
    return path


def _log_unraisable(unraisable) -> None:
    logging.getLogger("rlhf_jax.unraisable").warning(
        "%s: %r", unraisable.err_msg or "Exception ignored in", unraisable.object,
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
