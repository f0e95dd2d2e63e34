"""Hugging Face checkpoints in and out: config.json, safetensors weights, tokenizer files.

    graphdef, params, model_cfg, tokenizer = hf.load(directory, kind="policy")   # or "reward"
    hf.save(out_dir, params, model_cfg, tokenizer, kind="policy")

A checkpoint directory is what `save_pretrained` writes: `config.json`, one `model.safetensors`
or several shards with `model.safetensors.index.json`, the tokenizer files and, optionally,
`generation_config.json`. Nothing is downloaded: the user brings the directory.

Families. One model (`model.py`) with declared options; `FAMILIES` below is the one table that
says which options each Hugging Face `model_type` sets and how its config.json fields map onto
`ModelConfig`. Supported: gpt2, llama (Llama 2 and 3.x, with the llama3 rope scaling), qwen2
(Qwen 2 / 2.5), qwen3, gemma2, gemma3_text (Gemma 3 text models). docs/model.md lists what was
checked against `transformers` and to what tolerance.

Loading goes straight onto the mesh: the safetensors header is parsed, and each tensor is read
from disk on its own (no memory map of the whole file), converted to our layout, cast to the
requested dtype and placed with its logical-axis sharding before the next one is read; the
model is never built on one device first. Peak host memory is the placed parameters plus about
two copies of the largest tensor (measured in docs/model.md).

Layouts. torch `Linear` weights are [out, in]; our kernels are [in..., out...] with the head
structure kept ([D, H, K] for a query projection), so a weight is transposed and reshaped.
GPT-2's `Conv1D` weights are already [in, out], and its fused `c_attn` holds q, k and v.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from rlhf_jax import model as model_lib
from rlhf_jax import sharding
from rlhf_jax.data import tokenizer_files
from rlhf_jax.errors import CheckpointError, ConfigError

PREFIX = "hf:"
CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
KINDS = ("policy", "reward")


def is_hf_dir(path) -> bool:
    """True for "hf:DIR", or a plain directory that holds a config.json (a Hugging Face
    checkpoint rather than a stage directory)."""
    path = str(path)
    if not path:
        return False        # "" is the current directory to Path, not "no checkpoint"
    return path.startswith(PREFIX) or (Path(path) / CONFIG).is_file()


def strip_prefix(path) -> Path:
    """The directory of "hf:DIR" (or DIR itself)."""
    path = str(path)
    return Path(path[len(PREFIX):] if path.startswith(PREFIX) else path)


# ----------------------------------------------------------------------------------------------
# safetensors: a JSON header (name -> dtype, shape, byte range) followed by raw little-endian
# data. Read and written here directly so that one tensor at a time is in memory, and bf16 is
# a numpy dtype (ml_dtypes) rather than a torch one.
# ----------------------------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64),
              "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I8": np.dtype(np.int8),
              "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple
    start: int           # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorInfo]:
    def bad(reason):
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason}); re-save the "
                              "checkpoint with save_pretrained")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                bad("shorter than its 8-byte header size")
            n = int.from_bytes(raw, "little")
            if n <= 0 or 8 + n > size:
                bad(f"header size {n} does not fit the file's {size} bytes")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        bad("its header is not JSON")
    if not isinstance(header, dict):
        bad(f"its header is a JSON {type(header).__name__}, not an object")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[entry["dtype"]]
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError):
            bad(f"tensor {name!r} has an unsupported or malformed entry {entry!r}")
        if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
            bad(f"tensor {name!r} has a byte range that does not match its shape or the file "
                "(truncated?)")
        out[name] = TensorInfo(path, dtype, shape, 8 + n + begin, end - begin)
    return out


def _read_tensor(info: TensorInfo) -> np.ndarray:
    with open(info.file, "rb") as f:
        f.seek(info.start)
        data = np.fromfile(f, dtype=info.dtype, count=math.prod(info.shape))
    if data.size != math.prod(info.shape):
        raise CheckpointError(f"{info.file}: truncated while reading a tensor of shape "
                              f"{info.shape}; re-save the checkpoint")
    return data.reshape(info.shape)


def read_index(directory: Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo over every safetensors file of a checkpoint (one file or shards)."""
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            if not all(isinstance(f, str) and f for f in files):
                raise TypeError("weight_map values must be file names")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{directory / INDEX}: not a readable safetensors index "
                                  f"({type(e).__name__}: {e})") from None
    elif (directory / SINGLE).is_file():
        files = [SINGLE]
    else:
        found = sorted(p.name for p in directory.glob("*.safetensors"))
        if not found:
            raise CheckpointError(f"{directory}: no {SINGLE} or {INDEX} (only safetensors "
                                  "weights are read; convert .bin weights with save_pretrained"
                                  "(..., safe_serialization=True))")
        files = found
    out = {}
    for name in files:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: missing (listed in {INDEX}); copy the "
                                  "whole checkpoint directory")
        out.update(_read_header(directory / name))
    return out


def write_safetensors(directory: Path, tensors: list[tuple[str, tuple, np.dtype, Callable]], *,
                      max_shard_bytes: int = 5 * 2**30, write: bool = True) -> list[str]:
    """Writes tensors (name, shape, dtype, get() -> array) into one file or several shards
    plus an index; `get` is called once per tensor, when it is written. Returns the files.

    write=False calls every `get` in the same order and writes nothing: the other processes
    of a multi-host run, whose `get` takes part in a collective gather."""
    if not write:
        for *_, get in tensors:
            get()
        return []
    shards, current, size = [], [], 0
    for t in tensors:
        nbytes = math.prod(t[1]) * np.dtype(t[2]).itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    shards.append(current)
    names = ([SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, _ in shard:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            header[name] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        total += offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = directory / (fname + ".tmp")
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shape, dtype, get in shard:
                arr = np.ascontiguousarray(get(), dtype=dtype)
                if arr.shape != tuple(shape):
                    raise ValueError(f"{name}: shape {arr.shape}, expected {tuple(shape)}")
                f.write(arr.tobytes())
        os.replace(tmp, directory / fname)
    if len(names) > 1:
        (directory / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


# ----------------------------------------------------------------------------------------------
# Families: which ModelConfig options each model_type sets, and how config.json maps onto it
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    causal_lm: str               # architecture class of the policy
    classifier: str              # architecture class of a reward model (num_labels=1)
    names: str                   # tensor naming: "gpt2" or "llama"
    options: dict                # ModelConfig fields fixed by the family
    defaults: dict               # config.json values assumed when a key is absent


_LLAMA = dict(norm="rmsnorm", position="rope", activation="swiglu", use_bias=False)
_GEMMA = dict(norm="rmsnorm", position="rope", activation="geglu", use_bias=False,
              norm_offset=1.0, embed_scale=True, post_norms=True)

FAMILIES = {
    "gpt2": Family("GPT2LMHeadModel", "GPT2ForSequenceClassification", "gpt2",
                   dict(norm="layernorm", position="learned", activation="gelu", use_bias=True,
                        tie_embeddings=True),
                   dict(layer_norm_epsilon=1e-5, n_positions=1024)),
    "llama": Family("LlamaForCausalLM", "LlamaForSequenceClassification", "llama", _LLAMA,
                    dict(rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0)),
    "qwen2": Family("Qwen2ForCausalLM", "Qwen2ForSequenceClassification", "llama",
                    dict(_LLAMA, qkv_bias=True),
                    dict(rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0)),
    "qwen3": Family("Qwen3ForCausalLM", "Qwen3ForSequenceClassification", "llama",
                    dict(_LLAMA, qk_norm=True),
                    dict(rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
                         head_dim=128)),
    "gemma2": Family("Gemma2ForCausalLM", "Gemma2ForSequenceClassification", "llama",
                     dict(_GEMMA, tie_embeddings=True),
                     dict(rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0,
                          head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                          attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3_text": Family("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification", "llama",
                          dict(_GEMMA, qk_norm=True, tie_embeddings=True),
                          dict(rms_norm_eps=1e-6, tie_word_embeddings=True, head_dim=256,
                               query_pre_attn_scalar=256, sliding_window=4096)),
}


def _unsupported(path, what: str):
    raise ConfigError(f"{path}: {what}; supported families: {', '.join(FAMILIES)} "
                      "(docs/model.md)")


def _rope_fields(c: dict, path, layer_type: str = "full_attention") -> dict:
    """Rope base and scaling from config.json: `rope_parameters` (transformers 5; per layer
    type for Gemma 3) or the older top-level `rope_theta` and `rope_scaling`."""
    params = c.get("rope_parameters") or {}
    if layer_type in params:                     # per layer type (Gemma 3)
        params = params[layer_type] or {}
    params = dict(params)
    for key, value in (c.get("rope_scaling") or {}).items():
        params.setdefault(key, value)
    theta = params.get("rope_theta", c.get("rope_theta"))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    out = {"rope_theta": float(theta)} if theta is not None else {}
    if rope_type == "default":
        return out
    if rope_type == "linear":
        return {**out, "rope_type": "linear", "rope_factor": float(params["factor"])}
    if rope_type == "llama3":
        return {**out, "rope_type": "llama3", "rope_factor": float(params["factor"]),
                "rope_low_freq_factor": float(params["low_freq_factor"]),
                "rope_high_freq_factor": float(params["high_freq_factor"]),
                "rope_original_max_len": int(params.get("original_max_position_embeddings")
                                             or c["max_position_embeddings"])}
    _unsupported(path, f"rope scaling {rope_type!r} is not supported (default, linear and "
                       "llama3 are)")


def checkpoint_dtype(c: dict) -> str:
    """The dtype a checkpoint was saved in, from its config.json ("float32" when unsaid)."""
    return str(c.get("dtype") or c.get("torch_dtype") or "float32")


def model_config_from_hf(c: dict, *, path="config.json", dtype: str | None = None,
                         compute_dtype: str | None = None) -> model_lib.ModelConfig:
    """The ModelConfig of a Hugging Face config.json (as a dict). dtype: of the parameters
    (default: the checkpoint's); compute_dtype: of the activations (default: dtype)."""
    model_type = c.get("model_type")
    if model_type == "gemma3":
        _unsupported(path, "model_type 'gemma3' is the multimodal model; load a text-only "
                           "checkpoint (model_type 'gemma3_text', e.g. Gemma 3 1B)")
    if model_type not in FAMILIES:
        _unsupported(path, f"model_type {model_type!r} is not supported")
    fam = FAMILIES[model_type]
    # Defaults fill only absent keys: an explicit null (Gemma 2 soft-caps turned off) stays.
    c = {**fam.defaults, **c}
    dtype = dtype or checkpoint_dtype(c)
    compute_dtype = compute_dtype or dtype
    for d in (dtype, compute_dtype):
        if d not in model_lib._DTYPES:
            raise ConfigError(f"{path}: dtype {d!r} is not supported; ask for float32 or "
                              "bfloat16")
    try:
        if fam.names == "gpt2":
            if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                _unsupported(path, f"activation_function {c['activation_function']!r}")
            for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
                if c.get(key):
                    _unsupported(path, f"{key}=true is not supported")
            if c.get("scale_attn_weights") is False:
                _unsupported(path, "scale_attn_weights=false is not supported")
            d = int(c["n_embd"])
            fields = dict(vocab_size=int(c["vocab_size"]), d_model=d, n_layers=int(c["n_layer"]),
                          n_heads=int(c["n_head"]), n_kv_heads=int(c["n_head"]),
                          d_ff=int(c.get("n_inner") or 4 * d), max_len=int(c["n_positions"]),
                          norm_eps=float(c["layer_norm_epsilon"]))
        else:
            act = c.get("hidden_activation") or c.get("hidden_act")
            want = "gelu_pytorch_tanh" if fam.options["activation"] == "geglu" else "silu"
            if act not in (want, None) and not (want == "gelu_pytorch_tanh" and act == "gelu_new"):
                _unsupported(path, f"activation {act!r} for {model_type} (expected {want})")
            if c.get("mlp_bias"):
                _unsupported(path, "mlp_bias=true is not supported")
            if c.get("attention_bias") and not fam.options.get("qkv_bias"):
                _unsupported(path, "attention_bias=true is not supported for this family")
            if model_type in ("qwen2", "qwen3") and c.get("use_sliding_window"):
                _unsupported(path, f"{model_type} use_sliding_window=true is not supported")
            if c.get("use_bidirectional_attention"):
                _unsupported(path, "use_bidirectional_attention=true (an encoder) is not "
                                   "supported")
            heads = int(c["num_attention_heads"])
            fields = dict(vocab_size=int(c["vocab_size"]), d_model=int(c["hidden_size"]),
                          n_layers=int(c["num_hidden_layers"]), n_heads=heads,
                          n_kv_heads=int(c.get("num_key_value_heads") or heads),
                          d_ff=int(c["intermediate_size"]),
                          max_len=int(c["max_position_embeddings"]),
                          norm_eps=float(c["rms_norm_eps"]),
                          head_dim=int(c.get("head_dim") or 0),
                          tie_embeddings=bool(c["tie_word_embeddings"]))
            fields.update(_rope_fields(c, path))
            if model_type.startswith("gemma"):
                n = fields["n_layers"]
                # Older configs give the pattern instead of the list: Gemma 2 alternates
                # (layer 0 sliding), Gemma 3 has every sixth layer full.
                # (transformers' Gemma 2 always alternates, whatever the file says.)
                pattern = (int(c.get("sliding_window_pattern") or 6)
                           if model_type == "gemma3_text" else 2)
                types = c.get("layer_types") or [
                    "sliding_attention" if (i + 1) % pattern else "full_attention"
                    for i in range(n)]
                fields.update(
                    layer_types=tuple("sliding" if t == "sliding_attention" else "full"
                                      for t in types),
                    sliding_window=int(c["sliding_window"]),
                    query_pre_attn_scalar=float(c["query_pre_attn_scalar"]),
                    # transformers' Gemma 3 attention ignores attn_logit_softcapping.
                    attn_softcap=(0.0 if model_type == "gemma3_text"
                                  else float(c.get("attn_logit_softcapping") or 0.0)),
                    final_softcap=float(c.get("final_logit_softcapping") or 0.0))
                if model_type == "gemma3_text":
                    # Sliding layers: their own entry of rope_parameters (transformers 5), or
                    # rope_local_base_freq (older configs, whose top-level rope_scaling is
                    # the full layers' alone).
                    per_type = c.get("rope_parameters") or {}
                    local = (_rope_fields({"rope_parameters": per_type}, path,
                                          "sliding_attention")
                             if "sliding_attention" in per_type else
                             {"rope_theta": c.get("rope_local_base_freq", 10000.0)})
                    if local.get("rope_type", "default") != "default":
                        _unsupported(path, "scaled rope on Gemma 3 sliding layers")
                    fields["rope_local_theta"] = float(local.get("rope_theta") or 10000.0)
                    fields.setdefault("rope_theta", 1_000_000.0)
                bad = set(types) - {"sliding_attention", "full_attention"}
                if bad:
                    _unsupported(path, f"layer types {sorted(bad)}")
        fields.update(fam.options)
        return model_lib.ModelConfig(**fields, family=model_type, param_dtype=dtype,
                                     dtype=compute_dtype)
    except KeyError as e:
        raise ConfigError(f"{path}: missing the field {e.args[0]!r} that a {model_type} config "
                          "has; is the file complete?") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"{path}: a field has an unexpected value ({e})") from None


# ModelConfig fields that only some families set (the rest are sizes, dtypes and rope).
_FAMILY_OPTIONS = ("use_bias", "qkv_bias", "qk_norm", "norm_offset", "embed_scale", "post_norms",
                   "attn_softcap", "final_softcap", "query_pre_attn_scalar", "layer_types",
                   "sliding_window", "rope_local_theta")


def family_of(cfg: model_lib.ModelConfig) -> str:
    """The Hugging Face family a ModelConfig exports as: its own, or for a model trained here
    the one whose options it matches (GPT-2 or Llama)."""
    if cfg.family:
        return cfg.family
    base = model_lib.ModelConfig()
    for name in ("gpt2", "llama", "qwen2"):
        # The family's options, and every other family option at its default (off).
        want = {**{k: getattr(base, k) for k in _FAMILY_OPTIONS}, **FAMILIES[name].options}
        if all(getattr(cfg, k) == v for k, v in want.items() if k != "tie_embeddings") and (
                name != "gpt2" or (cfg.tie_embeddings and cfg.n_kv_heads == cfg.n_heads
                                   and cfg.head_size * cfg.n_heads == cfg.d_model)):
            return name
    raise ConfigError("this model's options match no Hugging Face family (gpt2, llama, qwen2, "
                      "qwen3, gemma2, gemma3_text); it cannot be exported")


def _number(x: float):
    """An integral float as an int: transformers' strict configs type some of these as int."""
    return int(x) if float(x).is_integer() else float(x)


def hf_config(cfg: model_lib.ModelConfig, tok, *, kind: str = "policy",
              dtype: str = "float32") -> dict:
    """config.json for a ModelConfig (the inverse of model_config_from_hf)."""
    name = family_of(cfg)
    fam = FAMILIES[name]
    special = {"bos_token_id": getattr(tok, "bos_id", None), "pad_token_id": tok.pad_id,
               "eos_token_id": tok.eos_id}
    if name == "gpt2":
        out = dict(n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                   n_inner=cfg.d_ff, n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
                   activation_function="gelu_new", vocab_size=cfg.vocab_size,
                   tie_word_embeddings=True)
    else:
        out = dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                   num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                   intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_len,
                   rms_norm_eps=cfg.norm_eps, vocab_size=cfg.vocab_size,
                   tie_word_embeddings=cfg.tie_embeddings, attention_bias=bool(cfg.qkv_bias), mlp_bias=False)
        if cfg.head_dim:
            out["head_dim"] = cfg.head_dim
        rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
        if cfg.rope_type != "default":
            rope["factor"] = cfg.rope_factor
        if cfg.rope_type == "llama3":
            rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                        high_freq_factor=cfg.rope_high_freq_factor,
                        original_max_position_embeddings=cfg.rope_original_max_len)
        out["rope_parameters"] = rope
        if fam.options.get("activation") == "geglu":
            out["hidden_activation"] = "gelu_pytorch_tanh"
        else:
            out["hidden_act"] = "silu"
        if name.startswith("gemma"):
            out.update(layer_types=[("sliding_attention" if cfg.is_sliding(i)
                                     else "full_attention") for i in range(cfg.n_layers)],
                       sliding_window=cfg.sliding_window,
                       query_pre_attn_scalar=_number(cfg.query_pre_attn_scalar),
                       attn_logit_softcapping=(cfg.attn_softcap or None) if name == "gemma2"
                       else None,
                       final_logit_softcapping=cfg.final_softcap or None)
            if name == "gemma3_text":
                out["rope_parameters"] = {
                    "full_attention": rope,
                    "sliding_attention": {"rope_type": "default",
                                          "rope_theta": cfg.rope_local_theta or cfg.rope_theta}}
        if name == "qwen2":
            out["use_sliding_window"] = False
    if name != "gpt2":
        # The older spellings too, for readers of transformers 4 configs (vLLM, converters).
        full = out["rope_parameters"].get("full_attention", out["rope_parameters"])
        out["rope_theta"] = full["rope_theta"]
        if full["rope_type"] != "default":
            out["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
        if name == "gemma3_text":
            out["rope_local_base_freq"] = cfg.rope_local_theta or cfg.rope_theta
    out.update(model_type=name, dtype=dtype, torch_dtype=dtype,
               architectures=[fam.classifier if kind == "reward" else fam.causal_lm], **special)
    if kind == "reward":
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return out


# ----------------------------------------------------------------------------------------------
# Tensor names: our parameter paths <-> Hugging Face tensor names
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Group:
    """One Hugging Face tensor and the parameters of ours it holds (several for GPT-2's fused
    c_attn). from_hf(array, shapes) -> our arrays; to_hf(our arrays) -> array."""
    hf_name: str
    paths: tuple
    from_hf: Callable
    to_hf: Callable


def _linear(n_in: int):
    """torch Linear [out, in] <-> our kernel [*in (n_in axes), *out]."""
    return (lambda w, shapes: [w.T.reshape(shapes[0])],
            lambda ks: ks[0].reshape(math.prod(ks[0].shape[:n_in]), -1).T)


def _same():
    """A tensor whose layout is ours up to a reshape (embeddings, norms, biases, Conv1D)."""
    return (lambda w, shapes: [w.reshape(shapes[0])],
            lambda ks: ks[0])


def _vector():
    """A bias or norm scale: flat [N] there, possibly [H, K] here."""
    return (lambda w, shapes: [w.reshape(shapes[0])],
            lambda ks: ks[0].reshape(-1))


def _conv1d(n_in: int):
    """GPT-2 Conv1D [in, out] <-> our kernel [*in, *out]."""
    return (lambda w, shapes: [w.reshape(shapes[0])],
            lambda ks: ks[0].reshape(math.prod(ks[0].shape[:n_in]), -1))


def _fused(n_in: int):
    """GPT-2's c_attn: q, k and v side by side along the output axis (bias or [in, 3 out])."""
    def from_hf(w, shapes):
        parts = np.split(w, 3, axis=-1)
        return [p.reshape(s) for p, s in zip(parts, shapes)]

    def to_hf(ks):
        flat = [k.reshape(math.prod(k.shape[:n_in]), -1) if n_in else k.reshape(-1) for k in ks]
        return np.concatenate(flat, axis=-1)
    return from_hf, to_hf


def _groups(cfg: model_lib.ModelConfig, kind: str, base: str) -> list[Group]:
    """Every tensor of a checkpoint of `cfg` in its family's naming. `base` is the backbone
    prefix ("model." / "transformer." or "" for a bare base model)."""
    fam = FAMILIES[family_of(cfg)]
    ours = ("backbone",) if kind == "reward" else ()
    out = []

    def add(hf, paths, fns):
        out.append(Group(hf, tuple(ours + p for p in paths), *fns))

    if fam.names == "gpt2":
        add(base + "wte.weight", [("embed", "embedding")], _same())
        add(base + "wpe.weight", [("pos_embed", "embedding")], _same())
        for i in range(cfg.n_layers):
            h, me = f"{base}h.{i}.", (f"layers_{i}",)
            qkv = [me + ("attn", f"{x}_proj") for x in "qkv"]
            add(h + "attn.c_attn.weight", [p + ("kernel",) for p in qkv], _fused(1))
            add(h + "attn.c_attn.bias", [p + ("bias",) for p in qkv], _fused(0))
            add(h + "attn.c_proj.weight", [me + ("attn", "o_proj", "kernel")], _conv1d(2))
            add(h + "attn.c_proj.bias", [me + ("attn", "o_proj", "bias")], _same())
            add(h + "mlp.c_fc.weight", [me + ("mlp", "up_proj", "kernel")], _conv1d(1))
            add(h + "mlp.c_fc.bias", [me + ("mlp", "up_proj", "bias")], _same())
            add(h + "mlp.c_proj.weight", [me + ("mlp", "down_proj", "kernel")], _conv1d(1))
            add(h + "mlp.c_proj.bias", [me + ("mlp", "down_proj", "bias")], _same())
            for norm, ln in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                add(h + f"{ln}.weight", [me + (norm, "scale")], _same())
                add(h + f"{ln}.bias", [me + (norm, "bias")], _same())
        add(base + "ln_f.weight", [("final_norm", "scale")], _same())
        add(base + "ln_f.bias", [("final_norm", "bias")], _same())
    else:
        add(base + "embed_tokens.weight", [("embed", "embedding")], _same())
        for i in range(cfg.n_layers):
            h, me = f"{base}layers.{i}.", (f"layers_{i}",)
            for x in "qkvo":
                add(h + f"self_attn.{x}_proj.weight", [me + ("attn", f"{x}_proj", "kernel")],
                    _linear(2 if x == "o" else 1))
            if cfg.qkv_bias:
                for x in "qkv":
                    add(h + f"self_attn.{x}_proj.bias", [me + ("attn", f"{x}_proj", "bias")],
                        _vector())
            if cfg.qk_norm:
                for x in "qk":
                    add(h + f"self_attn.{x}_norm.weight", [me + ("attn", f"{x}_norm", "scale")],
                        _same())
            for x in ("gate", "up", "down"):
                add(h + f"mlp.{x}_proj.weight", [me + ("mlp", f"{x}_proj", "kernel")],
                    _linear(1))
            add(h + "input_layernorm.weight", [me + ("attn_norm", "scale")], _same())
            if cfg.post_norms:        # Gemma 2/3: four norms per block
                add(h + "post_attention_layernorm.weight", [me + ("attn_post_norm", "scale")],
                    _same())
                add(h + "pre_feedforward_layernorm.weight", [me + ("mlp_norm", "scale")],
                    _same())
                add(h + "post_feedforward_layernorm.weight", [me + ("mlp_post_norm", "scale")],
                    _same())
            else:
                add(h + "post_attention_layernorm.weight", [me + ("mlp_norm", "scale")], _same())
        add(base + "norm.weight", [("final_norm", "scale")], _same())
    if kind == "policy" and not cfg.tie_embeddings:
        out.append(Group("lm_head.weight", (("lm_head", "kernel"),), *_linear(1)))
    if kind == "reward":
        out.append(Group("score.weight", (("head", "kernel"),), *_linear(1)))
    return out


def _base_prefix(cfg, names) -> str:
    """The backbone prefix a checkpoint uses: "model." (or "transformer." for GPT-2) when the
    weights come from a *ForCausalLM / *ForSequenceClassification class, "" for a base model."""
    prefix = "transformer." if FAMILIES[family_of(cfg)].names == "gpt2" else "model."
    return prefix if any(n.startswith(prefix) for n in names) else ""


# ----------------------------------------------------------------------------------------------
# load / save
# ----------------------------------------------------------------------------------------------


def source_record(directory) -> dict:
    """What a stage records of a Hugging Face checkpoint it starts from (as
    `common.source_record` does for a stage): the path and a fingerprint of config.json and
    the safetensors headers and sizes, cheap to compute and different for other weights."""
    directory = strip_prefix(directory)
    h = hashlib.sha256(b"hf-checkpoint-v1")
    h.update((directory / CONFIG).read_bytes())
    for info in sorted({i.file for i in read_index(directory).values()}):
        with open(info, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(n))
        h.update(str(info.stat().st_size).encode())
    return {"path": str(directory.absolute()), "step": 0, "params": "hf:" + h.hexdigest()[:32]}


def read_config(directory) -> dict:
    """config.json of a checkpoint directory, as a dict (a clear error when absent or broken)."""
    directory = strip_prefix(directory)
    path = directory / CONFIG
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such checkpoint directory")
    if not path.is_file():
        raise ConfigError(f"{path}: missing; a Hugging Face checkpoint directory holds "
                          "config.json, the safetensors weights and the tokenizer files")
    try:
        c = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(c, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return c


def has_score_head(directory) -> bool:
    """Whether a checkpoint holds a sequence-classification (reward) head."""
    return "score.weight" in read_index(strip_prefix(directory))


def load(directory, *, kind: str = "policy", dtype: str | None = None, mesh=None, rules=None,
         seed: int = 0, tokenizer: bool = True, compute_dtype: str | None = None):
    """Loads a Hugging Face checkpoint as (graphdef, params, model_cfg, tokenizer).

    kind="policy": a *ForCausalLM checkpoint (or a base model with tied embeddings).
    kind="reward": a *ForSequenceClassification checkpoint with one label (its `score` head),
      or a causal LM whose backbone gets a fresh scalar head (initialised from `seed`).
    dtype: parameter dtype, "float32" or "bfloat16"; None keeps the checkpoint's own.
      compute_dtype: of the activations (default: dtype); the trainers load float32 master
      weights and compute in the checkpoint's dtype.
    mesh / rules: where the parameters go (default: every local device on the data axis,
      replicated); each tensor is placed with its logical-axis sharding as
      it is read.
    """
    if kind not in KINDS:
        raise ConfigError(f"hf.load: kind={kind!r}; choose one of {list(KINDS)}")
    directory = strip_prefix(directory)
    c = read_config(directory)
    cfg = model_config_from_hf(c, path=directory / CONFIG, dtype=dtype,
                               compute_dtype=compute_dtype)
    index = read_index(directory)
    tok = None
    if tokenizer:
        tok = tokenizer_files.load_pretrained(directory)
        # The tokenizer's own vocabulary and every id it writes must have an embedding row;
        # added tokens beyond the table (Gemma 3's image tokens) are allowed.
        too_big = sorted(i for i in tok.special_ids() if i >= cfg.vocab_size)
        if tok.core_vocab_size > cfg.vocab_size or too_big:
            what = (f"special ids {too_big}" if too_big else f"{tok.core_vocab_size} tokens")
            raise ConfigError(f"{directory}: the tokenizer has {what} but the model's "
                              f"vocab_size is {cfg.vocab_size} ({CONFIG}); the tokenizer files "
                              "do not belong to this model")
    if kind == "policy" and "score.weight" in index:
        raise CheckpointError(f"{directory}: a sequence-classification (reward) checkpoint "
                              "(it has score.weight), not a language model; load it with "
                              "kind='reward'")
    if kind == "reward" and "score.weight" in index:
        labels = c.get("id2label") or {"0": "LABEL_0"}
        n_labels = int(c.get("num_labels") or len(labels))
        if n_labels != 1:
            raise ConfigError(f"{directory / CONFIG}: a classifier with {n_labels} labels; a "
                              "reward model has one (num_labels=1)")
    mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
    rules = rules if rules is not None else sharding.DEFAULT_RULES
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: model_lib.build(cfg, seed=seed, kind=kind)))
    shardings = sharding.param_shardings(abstract, mesh, rules)
    leaves = {_key(path): (a, s) for (path, a), s in zip(
        jax.tree_util.tree_leaves_with_path(abstract),
        jax.tree_util.tree_leaves(shardings))}
    groups = _groups(cfg, kind, _base_prefix(cfg, index))
    values = {}
    for g in groups:
        if g.hf_name not in index:
            if g.hf_name == "score.weight":
                continue                 # a causal LM as a reward model: a fresh head below
            hint = (" (a *ForSequenceClassification checkpoint has no lm_head; load it with "
                    "kind='reward')" if g.hf_name == "lm_head.weight" else "")
            raise CheckpointError(f"{directory}: tensor {g.hf_name!r} is missing from the "
                                  f"safetensors files{hint}")
        info = index[g.hf_name]
        shapes = [leaves[p][0].shape for p in g.paths]
        raw = _read_tensor(info)
        try:
            arrays = g.from_hf(raw, shapes)
        except ValueError:
            raise CheckpointError(f"{info.file}: tensor {g.hf_name!r} has shape {info.shape}, "
                                  f"which does not fit {CONFIG} (expected parts of shape "
                                  f"{shapes}); the weights and config.json do not match"
                                  ) from None
        for p, arr in zip(g.paths, arrays):
            abstract_leaf, sh = leaves[p]
            arr = np.asarray(arr).astype(abstract_leaf.dtype, copy=False)
            values[p] = jax.make_array_from_callback(arr.shape, sh, lambda i, a=arr: a[i])
        del raw, arrays
    missing = [p for p in leaves if p not in values]
    if missing:
        if any(p[-2:-1] != ("head",) for p in missing):
            raise CheckpointError(f"{directory}: no tensor for {['/'.join(p) for p in missing]}")
        # A causal LM as a reward model: a fresh scalar head, N(0, 1/(D + 1)) and bias 0 as
        # model.RewardModel draws it (Stiennon et al. 2020).
        d = cfg.d_model
        fresh = {"kernel": np.asarray(jax.random.normal(jax.random.key(seed), (d,)))
                 / math.sqrt(d + 1), "bias": np.zeros((), np.float32)}
        for p in missing:
            values[p] = jax.device_put(fresh[p[-1]].astype(leaves[p][0].dtype), leaves[p][1])
    params = jax.tree_util.tree_map_with_path(
        lambda path, _: values[_key(path)], abstract)
    return graphdef, params, cfg, tok


def save(directory, params, model_cfg: model_lib.ModelConfig, tokenizer, *, kind: str = "policy",
         dtype: str | None = None, max_shard_bytes: int = 5 * 2**30,
         drop_head_bias: bool = False, write_tokenizer: bool = True) -> Path:
    """Writes a checkpoint that transformers' AutoModelForCausalLM (kind="policy") or
    AutoModelForSequenceClassification (kind="reward") loads: config.json, safetensors
    weights (sharded above max_shard_bytes, with an index), generation_config.json and the
    tokenizer files (write_tokenizer=False: only its special ids, in config.json).
    dtype: of the written weights (default: the parameters' own).

    A reward head's bias has no place in the transformers classifier (its `score` layer has
    none). A non-zero bias (the reward stage folds its normalisation into it) is refused
    unless drop_head_bias=True: the exported rewards are then shifted by minus that bias.
    """
    if kind not in KINDS:
        raise ConfigError(f"hf.save: kind={kind!r}; choose one of {list(KINDS)}")
    directory = strip_prefix(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {_key(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    if kind == "reward":
        bias = float(np.asarray(_host(flat[("head", "bias")])))
        if bias != 0.0 and not drop_head_bias:
            raise ConfigError(f"hf.save: the reward head has bias {bias:g}, which a "
                              "transformers classifier cannot hold (its score layer has no "
                              "bias); pass drop_head_bias=True (tools.export_hf "
                              "--drop_reward_bias) to write it without: every reward shifts by "
                              f"{-bias:g}, which Bradley-Terry preferences do not see")
    first = next(iter(flat.values()))
    dtype = dtype or str(np.dtype(first.dtype).name)
    np_dtype = np.dtype(model_lib._DTYPES[dtype])
    groups = _groups(model_cfg, kind, "transformer." if FAMILIES[family_of(model_cfg)].names
                     == "gpt2" else "model.")
    entries = []
    for g in groups:
        # The written shape, from zero-strided stand-ins (no memory) put through the layout.
        shape = np.shape(g.to_hf([np.broadcast_to(np.float32(0), flat[p].shape)
                                  for p in g.paths]))
        entries.append((g.hf_name, tuple(shape), np_dtype,
                        lambda g=g: g.to_hf([_host(flat[p]) for p in g.paths])))
    writer = jax.process_index() == 0
    if writer:
        for stale in (INDEX, SINGLE, *(p.name for p in directory.glob("model-*.safetensors"))):
            (directory / stale).unlink(missing_ok=True)     # a previous export's weights
    # Every process gathers each tensor (a collective on a multi-host mesh); process 0 writes.
    write_safetensors(directory, entries, max_shard_bytes=max_shard_bytes, write=writer)
    if writer:
        config = hf_config(model_cfg, tokenizer, kind=kind, dtype=dtype)
        (directory / CONFIG).write_text(json.dumps(config, indent=2))
        if kind == "policy":
            stop = list(getattr(tokenizer, "stop_ids", ()) or [tokenizer.eos_id])
            gen = {"bos_token_id": getattr(tokenizer, "bos_id", None),
                   "eos_token_id": stop if len(stop) > 1 else stop[0],
                   "pad_token_id": tokenizer.pad_id}
            (directory / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if write_tokenizer:
            tokenizer_files.save_pretrained(tokenizer, directory)
    return directory


def _key(path) -> tuple:
    """A parameter's path as a tuple of names, e.g. ("layers_0", "attn", "q_proj", "kernel")."""
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _host(x) -> np.ndarray:
    """A parameter as one host array (gathered from every process on a multi-host mesh)."""
    if isinstance(x, nnx.Variable):
        x = x[...]
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
