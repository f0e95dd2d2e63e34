"""Load time and peak host memory of a Hugging Face checkpoint read by `hf.load`.

    python -m tools.bench_hf_load --dir /tmp/llama1b --make        # write a random ~1.2B model
    python -m tools.bench_hf_load --dir /tmp/llama1b                # measure loading it

--make writes a random-initialised checkpoint of Llama 3.2 1B's shapes (vocab 128256, width
2048, 16 layers, 32 query / 8 kv heads, MLP 8192, tied embeddings; --dtype bfloat16 by default,
as published checkpoints are) one tensor at a time, with the same safetensors writer `hf.save`
uses. The measurement runs in a fresh process: its resident set before `hf.load` (Python, JAX),
its peak during the load (ru_maxrss), and the wall time, printed against the size of the
weights on disk. The target (issue 11): peak host memory under 1.5x the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LLAMA_1B = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
                hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192),
                hidden_act="silu", bos_token_id=128000, eos_token_id=128001)


def make(directory: Path, dtype: str, layers: int) -> None:
    import ml_dtypes
    from rlhf_jax import hf
    c = dict(LLAMA_1B, num_hidden_layers=layers, dtype=dtype)
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    h, g, k = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h * k, d),
                       p + "self_attn.k_proj.weight": (g * k, d),
                       p + "self_attn.v_proj.weight": (g * k, d),
                       p + "self_attn.o_proj.weight": (d, h * k),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f),
                       p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    rng = np.random.default_rng(0)

    def draw(shape):
        return lambda: (rng.standard_normal(shape, np.float32) * 0.02).astype(np_dtype)

    directory.mkdir(parents=True, exist_ok=True)
    hf.write_safetensors(directory, [(n, s, np_dtype, draw(s)) for n, s in shapes.items()],
                         max_shard_bytes=2 * 2**30)
    (directory / "config.json").write_text(json.dumps(c, indent=2))
    n = sum(math.prod(s) for s in shapes.values())
    print(f"wrote {n / 1e9:.2f}B parameters ({dtype}) to {directory}")


def measure(directory: Path, dtype: str | None) -> dict:
    """Runs in a fresh process: RSS before, peak RSS during, and wall time of hf.load."""
    import jax
    from rlhf_jax import hf
    jax.numpy.zeros(1).block_until_ready()           # JAX's own start-up is not the load's
    before = _rss_now()
    t0 = time.perf_counter()
    _, params, cfg, _ = hf.load(directory, tokenizer=False, dtype=dtype)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    disk = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    placed = sum(x.nbytes for x in jax.tree.leaves(params))
    return {"seconds": seconds, "rss_before": before, "peak_rss": peak, "disk_bytes": disk,
            "param_bytes": placed, "param_dtype": cfg.param_dtype}


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--make", action="store_true", help="write the random checkpoint first")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.dir, None)))
        return 0
    if args.make:
        make(args.dir, args.dtype, args.layers)
    out = subprocess.run([sys.executable, "-m", "tools.bench_hf_load", "--dir", str(args.dir),
                          "--child"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2**30
    print(f"checkpoint on disk   {r['disk_bytes'] / gib:6.2f} GiB  ({r['param_dtype']})")
    print(f"parameters placed    {r['param_bytes'] / gib:6.2f} GiB")
    print(f"RSS before load      {r['rss_before'] / gib:6.2f} GiB  (Python + JAX)")
    print(f"peak RSS during load {r['peak_rss'] / gib:6.2f} GiB  = "
          f"{r['peak_rss'] / r['disk_bytes']:.2f} x disk; "
          f"{(r['peak_rss'] - r['rss_before']) / r['disk_bytes']:.2f} x disk above the "
          "start-up")
    print(f"load time            {r['seconds']:6.1f} s  "
          f"({r['disk_bytes'] / gib / r['seconds']:.2f} GiB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
