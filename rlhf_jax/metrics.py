"""Metric writers: one JSON line per step, TensorBoard event files, and a progress bar.

Metrics arrive as flat dicts of scalars (jax or numpy scalars, Python numbers) keyed by
namespaced names ("ppo/clipfrac", "gold/reward"). `MetricsWriter.write` pulls them to the host
once per call, so a trainer calls it once per logged step, never inside a jitted loop.
Non-finite values are written as they are (JSON `NaN`/`Infinity`): a run that diverged must
show it, not hide it.
"""

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flat dict of scalar arrays -> dict of Python floats, with one device-to-host transfer."""
    values = jax.device_get(dict(metrics))
    out = {}
    for key, value in values.items():
        arr = np.asarray(value)
        if arr.size != 1:
            raise ValueError(f"metric {key!r} has shape {arr.shape}; metrics must be scalars")
        out[key] = float(arr.reshape(()))
    return out


class MetricsWriter:
    """Appends `{"step": s, **metrics}` lines to `directory/metrics.jsonl`, and TensorBoard events.

    Appending (not truncating) keeps the history of a resumed stage in one file; lines from
    steps after the restored checkpoint are superseded by the resumed run's lines for the same
    steps (`read_metrics` keeps the last line per step).

    In a multi-host run every process computes the metrics (they are global arrays) but only
    process 0 writes them: one file, no two processes creating the same event directory.
    """

    def __init__(self, directory, *, tensorboard: bool = True):
        self.directory = Path(directory)
        self.path = self.directory / METRICS_FILE
        self._file = self._tb = None
        if jax.process_index() != 0:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # writes event files without TensorFlow
            self._tb = SummaryWriter(str(self.directory / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        values = to_host(metrics)
        if self._file is not None:
            record = {"step": int(step), "time": time.time(), **values}
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, int(step))
        return values

    def close(self):
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TokenRate:
    """Tokens per second between log steps: `add` the real tokens of each host batch (no
    device sync), then `rate()` after the step's metrics came to the host, which also resets
    the count. The first interval includes compilation."""

    def __init__(self):
        self.tokens, self.since = 0, time.perf_counter()

    def add(self, mask) -> None:
        self.tokens += int(np.asarray(mask).sum())

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.since, 1e-9)
        self.tokens, self.since = 0, now
        return rate


def read_metrics(path) -> list[dict[str, float]]:
    """Reads a metrics.jsonl file (or the directory holding one), one dict per step, by step.

    Lines of the same step are merged (a step may log training and evaluation metrics
    separately); when a key repeats for a step (a stage resumed from a checkpoint older than its
    last logged step), the last line written wins.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from e
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             initial: int = 0, disable: bool | None = None):
    """A tqdm progress bar with ETA; `bar.set_postfix(format_postfix(metrics))` shows metrics.

    Disabled automatically when stderr is not a terminal (CI logs), unless disable=False.
    """
    return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True,
                disable=disable, leave=True)


def format_postfix(values: Mapping[str, float], keys: Iterable[str] | None = None) -> dict:
    """Short strings for a progress-bar postfix: the chosen keys, 4 significant digits."""
    keys = values.keys() if keys is None else [k for k in keys if k in values]
    return {k: (f"{values[k]:.4g}" if math.isfinite(values[k]) else str(values[k]))
            for k in keys}


def stage_summary(stage_dir, keys: Iterable[str], *, title: str) -> str:
    """What a finished stage prints: each key's first and last logged value, then its files.

        ppo: finished at step 20 in runs/x/ppo
          eval/gold/reward     0.571 -> 2.21   (steps 5 -> 20)
          ...
          checkpoints: runs/x/ppo/checkpoints
          metrics:     runs/x/ppo/metrics.jsonl (TensorBoard events beside it)

    A key the stage never logged is left out, so one list serves a stage's variants.
    """
    from rlhf_jax.checkpoint import CHECKPOINTS   # here: metrics alone needs no Orbax
    stage_dir = Path(stage_dir)
    rows = read_metrics(stage_dir) if (stage_dir / METRICS_FILE).exists() else []
    last_step = rows[-1]["step"] if rows else 0
    lines = [f"{title}: finished at step {last_step} in {stage_dir}"]
    width = max([len(k) for k in keys] + [0])
    for key in keys:
        seen = [(r["step"], r[key]) for r in rows if key in r]
        if not seen:
            continue
        (s0, v0), (s1, v1) = seen[0], seen[-1]
        change = f"{v1:.4g}" if s0 == s1 else f"{v0:.4g} -> {v1:.4g}   (steps {s0} -> {s1})"
        lines.append(f"  {key:<{width}}  {change}")
    lines.append(f"  checkpoints: {stage_dir / CHECKPOINTS}")
    lines.append(f"  metrics:     {stage_dir / METRICS_FILE} (TensorBoard events beside it)")
    return "\n".join(lines)


def print_summary(stage_dir, keys: Iterable[str], *, title: str) -> None:
    """Prints `stage_summary` once: from process 0 of a multi-host run, which wrote the file."""
    if jax.process_index() == 0:
        print(stage_summary(stage_dir, keys, title=title))
