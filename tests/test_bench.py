"""tools/bench.py's device mode at the tiny size on the CPU: every ratio it prints is a
fraction of a peak measured in the same run, and a size that runs out of memory is reported
in its row."""

import math
import os
import re

from tools import bench


def test_device_mode_tiny_prints_finite_ratios(capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))   # restored afterwards
    [row] = bench.main(["--device", "--sizes", "tiny", "--repeats", "3"])
    out = capsys.readouterr().out
    assert f"backend {bench.jax.default_backend()}" in out and "jax " in out
    printed = [float(x) / 100 for x in re.findall(r"([-\d.e+]+|nan|inf)%", out)]
    assert len(printed) == 3, out            # MFU, DPO MFU, decode / bandwidth
    for ratio in printed + [row["mfu"], row["dpo_mfu"], row["decode_bw"]]:
        assert math.isfinite(ratio) and 0 < ratio <= 1.5, out
    # The decode bound: float32 weights (the untied embedding table only as the rows gathered)
    # + bf16 K and V of every layer up to the current length, averaged over the timed steps.
    cfg, w = bench.DEVICE_SIZES["tiny"], bench.TINY_DEFAULTS
    b, p, n = w["decode_batch"], w["prompt_len"], w["new_tokens"]
    weights = 4 * (row["params"] - cfg.vocab_size * cfg.d_model + b * cfg.d_model)
    per_slot = 2 * cfg.n_layers * b * cfg.n_kv_heads * cfg.head_size * 2
    assert row["decode"]["bytes_per_step"] == weights + per_slot * (p + 1 + n / 2)


def test_device_mode_reports_out_of_memory_in_its_row(capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))

    def oom(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 TiB")

    monkeypatch.setattr(bench, "_train_step", oom)
    monkeypatch.setattr(bench, "_dpo_step", oom)
    monkeypatch.setattr(bench.sampling, "generate", oom)
    [row] = bench.main(["--device", "--sizes", "tiny", "--repeats", "1"])
    out = capsys.readouterr().out
    assert row["train"] == row["dpo"] == row["decode"] == "out of memory"
    assert out.count("tiny ") >= 3 and out.count("out of memory") == 3, out
