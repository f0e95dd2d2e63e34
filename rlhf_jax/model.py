"""Decoder-only transformer (Flax NNX) with a scalar reward head and a per-token value head.

The modules are ordinary `flax.nnx` modules, but the rest of the codebase uses them functionally:
`nnx.split(model)` gives a static `graphdef` and a `params` state (a pytree of arrays), and the
pure functions below (`apply`, `apply_reward`, `apply_value`, `decode_step`) merge them back
inside a trace. Train and sampling steps are therefore plain `jax.jit` functions of pytrees, so
they can be sharded (see `sharding.py`), donated and checkpointed as ordinary state.

Every parameter carries a `logical_axes` metadata tuple (names from `LOGICAL_AXES`), e.g. the
query projection kernel [D, H, K] has `("embed", "heads", "kv")`. `sharding.py` maps these names
to mesh axes through a rules table; the model never mentions a mesh.

Parameter paths are regular, so `hf.py` maps them to and from Hugging Face checkpoints by name:

    embed/embedding                     [V, D]      (vocab, embed)
    pos_embed/embedding                 [L, D]      (None, embed)       position == "learned"
    layers_{i}/attn_norm/scale (/bias)  [D]         (norm,)
    layers_{i}/attn/{q,k,v}_proj/kernel [D, H|Hkv, K]
    layers_{i}/attn/o_proj/kernel       [H, K, D]
    layers_{i}/attn/{q,k}_norm/scale    [K]         (norm,)             qk_norm only
    layers_{i}/attn_post_norm/scale     [D]                             post_norms only
    layers_{i}/mlp_norm/scale (/bias)   [D]
    layers_{i}/mlp/{gate,up}_proj/kernel [D, F]     (embed, mlp)        gate only for gated MLPs
    layers_{i}/mlp/down_proj/kernel     [F, D]      (mlp, embed)
    layers_{i}/mlp_post_norm/scale      [D]                             post_norms only
    final_norm/scale (/bias)            [D]
    lm_head/kernel                      [D, V]      (embed, vocab)      untied embeddings only
    .../{q,k,v,o,gate,up,down}_proj/lora_a  [*in, r]  (in axes, lora)   LoRA (lora_targets) only
    .../{q,k,v,o,gate,up,down}_proj/lora_b  [r, *out] (lora, out axes)

Axis letters: B batch, T tokens (queries), S key/cache length, D model width, V vocab, H query
heads, G kv heads (grouped-query attention), K head dim, F feed-forward width, L max length.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import registry, schema, sharding
from rlhf_jax.aggregation import last_token_index
from rlhf_jax.errors import ConfigError
from rlhf_jax.losses import token_entropy

# The logical axis vocabulary. `sharding.DEFAULT_RULES` maps each to a mesh axis or None.
LOGICAL_AXES = ("vocab", "embed", "mlp", "heads", "kv_heads", "kv", "norm", "pos", "lora")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# The family options of ModelConfig (the config schema reads them from here).
NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")
ACTIVATIONS = ("swiglu", "geglu", "gelu")
GATED = ("swiglu", "geglu")
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full", "sliding")
# Runtime options: how the model computes, not what (no parameter, no exported field depends on
# them). "dots" saves the outputs of matmuls without batch dimensions (the q/k/v/o and MLP
# projections) and recomputes the rest, attention scores included.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
ATTENTIONS = ("einsum", "dot_product", "cudnn")
RUNTIME_FIELDS = ("remat", "logits_chunk", "attention")
# LoRA (Hu et al. 2021): the projections a `lora_targets` name puts adapters on ("mlp" = all of
# the MLP's), and the names of the adapter parameters of a DenseGeneral.
LORA_TARGETS = {"q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",), "gate": ("gate",),
                "up": ("up",), "down": ("down",), "mlp": ("gate", "up", "down")}
ADAPTER_KEYS = ("lora_a", "lora_b")
# Parameters trained beside the adapters of a LoRA model: the reward and value heads.
HEAD_KEYS = ("head",)


def _dtype(name_or_dtype):
    if isinstance(name_or_dtype, str):
        return _DTYPES[name_or_dtype]
    return name_or_dtype


# ----------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the decoder-only transformer.

    One model with declared options covers the families `hf.py` reads (which options each
    family sets is the table `hf.FAMILIES`; docs/model.md lists them):

    - GPT-2: layernorm, learned positions, gelu, tied embeddings, biases everywhere.
    - Llama 2/3: rmsnorm, rope (3.1+: rope_type="llama3"), swiglu, grouped-query attention.
    - Qwen2/2.5: as Llama plus q/k/v biases (qkv_bias). Qwen3: q/k RMSNorm (qk_norm) and an
      explicit head_dim.
    - Gemma 2/3: geglu, RMSNorm scaled by (1 + w) (norm_offset=1), embeddings scaled by
      sqrt(d_model), norms after attention and MLP too (post_norms), attention and final logit
      soft-capping, queries scaled by query_pre_attn_scalar**-0.5, sliding-window layers
      (layer_types, sliding_window) with their own rope base (rope_local_theta, Gemma 3).

    The last fields (RUNTIME_FIELDS) say how to compute, for memory, not what: `remat`
    (rematerialise each block in the backward pass: REMAT_POLICIES), `logits_chunk` (score
    log-probs and entropies over chunks of positions: `target_logprobs`) and `attention`
    (`Attention._fused`). No parameter depends on them and `hf.py` never exports them; a
    checkpoint's meta written before they existed rebuilds with their defaults, which are
    today's computation. docs/model.md, "Memory options", gives their costs.
    """

    vocab_size: int = 64
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2          # grouped-query attention: each kv head serves n_heads/n_kv_heads
    d_ff: int = 64
    max_len: int = 128
    norm: str = "rmsnorm"        # "rmsnorm" | "layernorm"
    position: str = "rope"       # "rope" | "learned"
    activation: str = "swiglu"   # "swiglu" | "geglu" | "gelu" (gelu: tanh form, as GPT-2)
    tie_embeddings: bool = False
    use_bias: bool = False       # biases on every projection and the MLP (GPT-2)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"       # compute dtype; "bfloat16" on accelerators (params stay fp32)
    # --- family options (defaults: off, i.e. the model above is unchanged) -------------------
    head_dim: int = 0            # K; 0 = d_model // n_heads (Gemma, Qwen3 set it explicitly)
    qkv_bias: bool = False       # biases on q/k/v only (Qwen2)
    qk_norm: bool = False        # RMSNorm of each query/key head before rope (Qwen3, Gemma 3)
    norm_offset: float = 0.0     # norm scale is (norm_offset + w): 1.0 for Gemma
    embed_scale: bool = False    # multiply token embeddings by sqrt(d_model) (Gemma)
    post_norms: bool = False     # also normalise the attention and MLP outputs (Gemma 2/3)
    attn_softcap: float = 0.0    # scores -> cap * tanh(scores / cap); 0 = off (Gemma 2)
    final_softcap: float = 0.0   # the same on the output logits (Gemma 2)
    query_pre_attn_scalar: float = 0.0   # queries scaled by this**-0.5; 0 = head_size**-0.5
    layer_types: tuple = ()      # per layer "full" | "sliding"; () = all full
    sliding_window: int = 0      # a sliding layer's query sees the last sliding_window keys
    rope_local_theta: float = 0.0        # rope base of sliding layers (Gemma 3); 0 = rope_theta
    rope_type: str = "default"   # "default" | "linear" | "llama3" (frequency scaling)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0    # llama3 scaling only
    rope_high_freq_factor: float = 4.0   # llama3 scaling only
    rope_original_max_len: int = 8192    # llama3 scaling only
    family: str = ""             # the Hugging Face family this config came from ("" = none)
    # --- runtime options (RUNTIME_FIELDS; defaults: today's path, bitwise) ------------------
    remat: str = "none"          # rematerialise each block: "none" | "full" | "dots"
    logits_chunk: int = 0        # log-probs/entropy over chunks of this many positions; 0 = off
    attention: str = "einsum"    # "einsum" | "dot_product" (jax.nn.dot_product_attention) | "cudnn"
    # --- LoRA adapters (a stage's `lora` spec sets them; 0 = none: the plain model) ----------
    lora_rank: int = 0           # r of the low-rank factors A [*in, r], B [r, *out]
    lora_alpha: float = 0.0      # the update A @ B is scaled by lora_alpha / lora_rank
    lora_targets: tuple = ()     # LORA_TARGETS names: "q", "k", "v", "o", "mlp", "gate", ...

    def __post_init__(self):
        # JSON (checkpoint meta) turns tuples into lists; a frozen config must stay hashable.
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        small = [f"{f}={getattr(self, f)}" for f in ("d_model", "n_layers", "n_heads",
                                                      "n_kv_heads", "d_ff", "max_len")
                 if getattr(self, f) < 1]
        if small:
            raise ConfigError(f"invalid model config: {', '.join(small)}; sizes must be >= 1")
        problems = []
        if not self.head_dim and self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
                            " (or set head_dim)")
        if self.head_dim < 0:
            problems.append(f"head_dim={self.head_dim} must be >= 0 (0 = d_model // n_heads)")
        if self.n_heads % self.n_kv_heads:
            problems.append(
                f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        for field, choices in (("norm", NORMS), ("position", POSITIONS),
                               ("activation", ACTIVATIONS), ("rope_type", ROPE_TYPES),
                               ("remat", tuple(REMAT_POLICIES)), ("attention", ATTENTIONS)):
            if getattr(self, field) not in choices:
                problems.append(f"{field}={getattr(self, field)!r}; choose one of "
                                f"{list(choices)}")
        if self.position == "rope" and self.head_size % 2:
            problems.append(f"rope needs an even head dim, got {self.head_size}")
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in _DTYPES:
                problems.append(f"{field}={getattr(self, field)!r}; choose one of {list(_DTYPES)}")
        if self.layer_types:
            if len(self.layer_types) != self.n_layers:
                problems.append(f"layer_types has {len(self.layer_types)} entries for "
                                f"n_layers={self.n_layers}")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                problems.append(f"layer_types {bad}; each must be one of {list(LAYER_TYPES)}")
            if "sliding" in self.layer_types and self.sliding_window < 1:
                problems.append("sliding layers need sliding_window >= 1")
        for field in ("attn_softcap", "final_softcap", "query_pre_attn_scalar",
                      "rope_local_theta", "sliding_window", "logits_chunk"):
            if getattr(self, field) < 0:
                problems.append(f"{field}={getattr(self, field)} must be >= 0 (0 = off)")
        if self.rope_factor <= 0:
            problems.append(f"rope_factor={self.rope_factor} must be > 0")
        if self.rope_type == "llama3" and not (
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            problems.append("llama3 rope scaling needs 0 < rope_low_freq_factor < "
                            "rope_high_freq_factor")
        problems += self._lora_problems()
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    def _lora_problems(self) -> list:
        if self.lora_rank < 0:
            return [f"lora_rank={self.lora_rank} must be >= 1 (0 = no adapters)"]
        if not self.lora_rank:
            return [] if not self.lora_targets else ["lora_targets need lora_rank >= 1"]
        bad = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if bad or not self.lora_targets:
            return [f"lora targets {bad or '()'}; choose from {list(LORA_TARGETS)}"]
        if self.activation not in GATED and "gate" in self.lora_targets:
            return [f"lora target 'gate': activation={self.activation!r} has no gate_proj "
                    "(use 'up', 'down' or 'mlp')"]
        return [] if self.lora_alpha > 0 else [f"lora_alpha={self.lora_alpha} must be > 0"]

    def without_adapters(self) -> "ModelConfig":
        """This config with no LoRA adapters (the base model, or a merged one)."""
        return self.replace(lora_rank=0, lora_alpha=0.0, lora_targets=())

    @property
    def lora_projections(self) -> frozenset:
        """The projections with adapters ("q", "k", "v", "o", "gate", "up", "down"; those the
        model has), empty without LoRA."""
        if not self.lora_rank:
            return frozenset()
        names = {p for t in self.lora_targets for p in LORA_TARGETS[t]}
        return frozenset(names if self.activation in GATED else names - {"gate"})

    @property
    def head_size(self) -> int:
        """K, the width of one attention head: head_dim, or d_model // n_heads when it is 0."""
        return self.head_dim or self.d_model // self.n_heads

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends through a sliding window."""
        return bool(self.layer_types) and self.layer_types[layer] == "sliding"

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# The runtime fields' defaults: the plain computation (what a config without them ran).
RUNTIME_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                    if f.name in RUNTIME_FIELDS}


PRESETS = {
    # Unit tests: tiny and fast on 2 CPU cores.
    "tiny": ModelConfig(),
    "tiny_gpt2": ModelConfig(norm="layernorm", position="learned", activation="gelu",
                             tie_embeddings=True, use_bias=True, n_kv_heads=4),
    # Benchmark sizes (tools/bench.py).
    "small": ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
                         d_ff=1024, max_len=256),
    "medium": ModelConfig(vocab_size=4096, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
                          d_ff=2048, max_len=256),
    # Shapes of public checkpoints, for converters.
    "gpt2": ModelConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                        d_ff=3072, max_len=1024, norm="layernorm", position="learned",
                        activation="gelu", tie_embeddings=True, use_bias=True),
    "llama_1b": ModelConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32,
                            n_kv_heads=8, d_ff=8192, max_len=8192, rope_theta=500000.0,
                            tie_embeddings=True, dtype="bfloat16"),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset `ModelConfig` by name (see `PRESETS`), with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def _param(rngs: nnx.Rngs, shape, axes, *, std: float, dtype) -> nnx.Param:
    """A parameter drawn from N(0, std^2) (zeros when std == 0) tagged with logical axes."""
    if std == 0.0:
        value = jnp.zeros(shape, dtype)
    else:
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


def init_adapter(name: str, key, shape, dtype):
    """A LoRA factor: lora_a [*in, r] ~ N(0, 1/fan_in) (PEFT's default draws a uniform of
    about that scale, std 1/sqrt(3 fan_in)), lora_b [r, *out] = 0 (so the adapted model
    starts as the base model)."""
    if name == "lora_b":
        return jnp.zeros(shape, dtype)
    return jax.random.normal(key, shape, dtype) / math.sqrt(math.prod(shape[:-1]))


class DenseGeneral(nnx.Module):
    """y = einsum(x, kernel) (+ bias): a projection whose kernel keeps its head structure.

    `in_axes` and `out_axes` are the logical names of the contracted and produced kernel axes,
    e.g. ("embed",) -> ("heads", "kv") for a query projection of kernel shape [D, H, K].

    With `lora` (this projection's LORA_TARGETS name, when cfg.lora_projections holds it) it
    also has LoRA factors (Hu et al. 2021) lora_a [*in, r] and lora_b [r, *out] (`init_adapter`)
    and computes y + (x @ A) @ B * alpha / r: the zero B makes the adapted model start as the
    base model, and zeroing the factors again gives the base back (`adapters_off`).
    """

    def __init__(self, in_shape, out_shape, in_axes, out_axes, *, use_bias, std, cfg, rngs,
                 lora: str = ""):
        self.n_in = len(in_shape)
        self.dtype = _dtype(cfg.dtype)
        pdt = _dtype(cfg.param_dtype)
        self.kernel = _param(rngs, (*in_shape, *out_shape), (*in_axes, *out_axes), std=std,
                             dtype=pdt)
        self.bias = (nnx.Param(jnp.zeros(out_shape, pdt), logical_axes=tuple(out_axes))
                     if use_bias else None)
        self.lora_scale = 0.0
        if lora and lora in cfg.lora_projections:
            r = cfg.lora_rank
            self.lora_scale = float(cfg.lora_alpha) / r
            self.lora_a = nnx.Param(init_adapter("lora_a", rngs.params(), (*in_shape, r), pdt),
                                    logical_axes=(*in_axes, "lora"))
            self.lora_b = nnx.Param(init_adapter("lora_b", None, (r, *out_shape), pdt),
                                    logical_axes=("lora", *out_axes))

    def __call__(self, x):
        """x: [..., *in_shape] -> [..., *out_shape] in the compute dtype."""
        kernel = self.kernel[...].astype(self.dtype)
        n_batch = x.ndim - self.n_in
        contract = (tuple(range(n_batch, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
        if self.lora_scale:
            a = self.lora_a[...].astype(self.dtype)
            b = self.lora_b[...].astype(self.dtype)
            h = jax.lax.dot_general(x.astype(self.dtype), a, (contract, ((), ())))  # [..., r]
            low = jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())))
            y = y + low * jnp.asarray(self.lora_scale, self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Norm(nnx.Module):
    """RMSNorm (Zhang & Sennrich 2019) or LayerNorm (Ba et al. 2016), computed in float32.

    The scale is (norm_offset + w): Gemma stores w around 0 and multiplies by (1 + w). It is
    initialised so that the effective scale starts at 1 either way. `dim` defaults to D; the
    q/k norms (qk_norm) normalise each head over K and are always RMSNorms.
    """

    def __init__(self, cfg: ModelConfig, *, dim: int | None = None, kind: str | None = None):
        pdt = _dtype(cfg.param_dtype)
        dim = cfg.d_model if dim is None else dim
        self.kind = cfg.norm if kind is None else kind
        self.eps = cfg.norm_eps
        self.offset = float(cfg.norm_offset)
        self.dtype = _dtype(cfg.dtype)
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - self.offset, pdt), logical_axes=("norm",))
        self.bias = (nnx.Param(jnp.zeros((dim,), pdt), logical_axes=("norm",))
                     if self.kind == "layernorm" else None)

    def __call__(self, x):
        """Normalise over the last axis (D); returns the compute dtype."""
        # Statistics in float32: bf16 mean/variance over D loses several bits.
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        y = y * (scale + self.offset if self.offset else scale)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def rope_frequencies(k: int, theta: float, *, rope_type: str = "default", factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     original_max_len: int = 8192):
    """Inverse frequencies [K/2] float32 of rotary embeddings, with optional scaling.

    default: theta**(-2i/K) (Su et al. 2021). linear: all divided by `factor` (position
    interpolation, Chen et al. 2023). llama3 (Llama 3.1 and later): wavelengths longer than
    original_max_len / low_freq_factor are divided by `factor`, shorter than
    original_max_len / high_freq_factor kept, and the band between interpolated smoothly.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        wavelen = 2 * math.pi / inv_freq
        smooth = (original_max_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor)
        long_ = wavelen > original_max_len / low_freq_factor
        short = wavelen < original_max_len / high_freq_factor
        scaled = jnp.where(long_, inv_freq / factor, inv_freq)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        return jnp.where(long_ | short, scaled, blended)
    return inv_freq


def layer_rope(cfg: ModelConfig, layer: int) -> dict:
    """The `rope_frequencies` arguments of one layer: Gemma 3's sliding layers use their own
    base and no scaling (rope_local_theta); every other layer uses rope_theta and the
    configured scaling. A dict of Python numbers, static in the model's graph."""
    if cfg.rope_local_theta and cfg.is_sliding(layer):
        return dict(k=cfg.head_size, theta=cfg.rope_local_theta)
    return dict(k=cfg.head_size, theta=cfg.rope_theta, rope_type=cfg.rope_type,
                factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_len=cfg.rope_original_max_len)


def rope(x_btnk, positions_bt, theta: float = 10000.0, *, inv_freq=None):
    """Rotary position embedding (Su et al. 2021, eq. 34), rotate-half layout as in Llama.

    x: [B, T, N, K] (N any number of heads), positions: [B, T] int. Rotation in float32.
    `inv_freq` [K/2] (from `rope_frequencies`) overrides the plain frequencies of `theta`.
    """
    k = x_btnk.shape[-1]
    if inv_freq is None:
        inv_freq = rope_frequencies(k, theta)                                       # [K/2]
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq                 # [B, T, K/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = x_btnk.astype(jnp.float32)
    x1, x2 = x32[..., : k // 2], x32[..., k // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnk.dtype)


class Attention(nnx.Module):
    """Multi-head causal self-attention with grouped-query heads (Ainslie et al. 2023)."""

    def __init__(self, cfg: ModelConfig, *, layer: int = 0, rngs: nnx.Rngs):
        d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        std = cfg.init_std
        # Residual-branch output projections are scaled by 1/sqrt(2 n_layers) (GPT-2, sec. 2.3).
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        kw = dict(cfg=cfg, rngs=rngs)
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        self.q_proj = DenseGeneral((d,), (h, k), ("embed",), ("heads", "kv"), std=std,
                                   use_bias=qkv_bias, lora="q", **kw)
        self.k_proj = DenseGeneral((d,), (g, k), ("embed",), ("kv_heads", "kv"), std=std,
                                   use_bias=qkv_bias, lora="k", **kw)
        self.v_proj = DenseGeneral((d,), (g, k), ("embed",), ("kv_heads", "kv"), std=std,
                                   use_bias=qkv_bias, lora="v", **kw)
        self.o_proj = DenseGeneral((h, k), (d,), ("heads", "kv"), ("embed",), std=out_std,
                                   use_bias=cfg.use_bias, lora="o", **kw)
        self.q_norm = Norm(cfg, dim=k, kind="rmsnorm") if cfg.qk_norm else None
        self.k_norm = Norm(cfg, dim=k, kind="rmsnorm") if cfg.qk_norm else None
        self.n_heads, self.n_kv_heads, self.head_dim = h, g, k
        self.position = cfg.position
        # Static per-layer constants (hashable, part of the graphdef): the rope arguments and
        # the query scale (Gemma: query_pre_attn_scalar**-0.5 instead of K**-0.5).
        self.rope_args = tuple(sorted(layer_rope(cfg, layer).items()))
        self.query_scale = (cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar
                            else 1.0 / math.sqrt(k))
        self.softcap = float(cfg.attn_softcap)
        self.dtype = _dtype(cfg.dtype)
        # cfg.attention, and the sliding window of this layer (0: full), for the
        # jax.nn.dot_product_attention path.
        self.attention = cfg.attention
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else 0

    def __call__(self, x_btd, positions_bt, allowed_bts, cache=None, cache_index=None):
        """x: [B, T, D]; allowed: [B, T, S] bool (True where query t may attend key s).

        Without a cache S == T. With a cache (dict k, v: [B, G, S, K]) the new keys/values are
        written at [cache_index, cache_index + T) and attention runs over the whole cache.
        Returns (y [B, T, D], updated cache or None).

        cfg.attention "dot_product"/"cudnn" route the cache-free forward (training, scoring)
        through `jax.nn.dot_product_attention` (`_fused`). With a cache (prefill and decode,
        whose cache is heads-major [B, G, S, K] while that function reads [B, S, G, K]) and with
        attention soft-capping (Gemma 2), which it cannot express, the einsum path below runs.
        """
        q = self.q_proj(x_btd)                     # [B, T, H, K]
        k = self.k_proj(x_btd)                     # [B, T, G, K]
        v = self.v_proj(x_btd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.position == "rope":
            inv_freq = rope_frequencies(**dict(self.rope_args))
            q = rope(q, positions_bt, inv_freq=inv_freq)
            k = rope(k, positions_bt, inv_freq=inv_freq)
        if cache is None and self.attention != "einsum" and not self.softcap:
            return self.o_proj(self._fused(q, k, v, allowed_bts)), None
        # Heads-major [B, G, T, K] layout: the cache is stored the way the attention matmuls
        # read it, so a decode step writes one slot instead of transposing the whole cache.
        k = jnp.swapaxes(k, 1, 2)
        v = jnp.swapaxes(v, 1, 2)
        if cache is not None:
            idx = (0, 0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), idx)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), idx)
            cache = {"k": k, "v": v}
        b, t = q.shape[:2]
        groups = self.n_heads // self.n_kv_heads
        # Group query heads by the kv head they share: [B, G, R, T, K], R = H / G.
        q = q.reshape(b, t, self.n_kv_heads, groups, self.head_dim).transpose(0, 2, 3, 1, 4)
        q = q * jnp.asarray(self.query_scale, q.dtype)
        scores = jnp.einsum("bgrtk,bgsk->bgrts", q, k.astype(q.dtype),
                            preferred_element_type=jnp.float32)
        if self.softcap:
            scores = self.softcap * jnp.tanh(scores / self.softcap)     # Gemma 2
        # A finite fill (not -inf) keeps fully masked rows (left-pad queries) NaN-free; their
        # outputs are garbage but masked everywhere downstream.
        scores = jnp.where(allowed_bts[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bgrts,bgsk->btgrk", probs, v.astype(self.dtype))
        out = out.reshape(b, t, self.n_heads, self.head_dim)
        return self.o_proj(out), cache

    def _fused(self, q_bthk, k_btgk, v_btgk, allowed_btt):
        """Causal self-attention through `jax.nn.dot_product_attention` -> [B, T, H, K].

        The queries are scaled here, in the compute dtype, exactly as the einsum path scales
        them (the function is told scale=1), and the [B, T, T] mask is the einsum path's, so
        its XLA implementation computes the same numbers. Query head h uses kv head
        h // (H / G) in both. "dot_product" picks cuDNN's fused (flash) kernel on a GPU with a
        16-bit compute dtype when cuDNN accepts the shapes, XLA otherwise; "cudnn" insists on
        it. For cuDNN the mask is also stated as causal plus the layer's window, which lets the
        kernel skip the tiles they exclude (the dense mask still applies: padding).
        """
        q = q_bthk * jnp.asarray(self.query_scale, q_bthk.dtype)
        kw = dict(mask=allowed_btt[:, None], scale=1.0)
        cudnn_kw = dict(kw, implementation="cudnn", is_causal=True,
                        local_window_size=(self.window - 1, 0) if self.window else None)
        if self.attention == "cudnn":
            return jax.nn.dot_product_attention(q, k_btgk, v_btgk, **cudnn_kw)
        if jax.default_backend() in ("gpu", "cuda") and self.dtype in (jnp.bfloat16,
                                                                          jnp.float16):
            try:
                return jax.nn.dot_product_attention(q, k_btgk, v_btgk, **cudnn_kw)
            except (ValueError, NotImplementedError, RuntimeError):
                pass   # shapes, dtype or cuDNN version it does not support: the XLA path
        return jax.nn.dot_product_attention(q, k_btgk, v_btgk, implementation="xla", **kw)


class MLP(nnx.Module):
    """SwiGLU or GeGLU (Shazeer 2020; GeGLU with the tanh GELU, as Gemma) or a plain GELU MLP
    (Hendrycks & Gimpel 2016, tanh form as GPT-2)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        kw = dict(use_bias=cfg.use_bias, cfg=cfg, rngs=rngs)
        self.activation = cfg.activation
        self.gate_proj = (DenseGeneral((d,), (f,), ("embed",), ("mlp",), std=cfg.init_std,
                                       lora="gate", **kw)
                          if cfg.activation in GATED else None)
        self.up_proj = DenseGeneral((d,), (f,), ("embed",), ("mlp",), std=cfg.init_std,
                                    lora="up", **kw)
        self.down_proj = DenseGeneral((f,), (d,), ("mlp",), ("embed",), std=out_std,
                                      lora="down", **kw)

    def __call__(self, x_btd):
        """[B, T, D] -> [B, T, D]."""
        if self.activation == "swiglu":
            h = jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd)
        elif self.activation == "geglu":
            h = jax.nn.gelu(self.gate_proj(x_btd), approximate=True) * self.up_proj(x_btd)
        else:
            h = jax.nn.gelu(self.up_proj(x_btd), approximate=True)
        return self.down_proj(h)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). With post_norms
    (Gemma 2/3) each branch output is normalised too: x + norm(attn(norm(x)))."""

    def __init__(self, cfg: ModelConfig, *, layer: int = 0, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg, layer=layer, rngs=rngs)
        self.attn_post_norm = Norm(cfg) if cfg.post_norms else None
        self.mlp_norm = Norm(cfg)
        self.mlp = MLP(cfg, rngs=rngs)
        self.mlp_post_norm = Norm(cfg) if cfg.post_norms else None
        self.sliding = cfg.is_sliding(layer)

    def __call__(self, x, positions, allowed, cache=None, cache_index=None):
        """x: [B, T, D] -> (x [B, T, D], this layer's updated cache or None). `allowed` is a
        dict of masks {"full", "sliding"}; the layer takes its own."""
        mask = allowed["sliding" if self.sliding else "full"]
        y, cache = self.attn(self.attn_norm(x), positions, mask, cache, cache_index)
        if self.attn_post_norm is not None:
            y = self.attn_post_norm(y)
        x = x + y
        y = self.mlp(self.mlp_norm(x))
        if self.mlp_post_norm is not None:
            y = self.mlp_post_norm(y)
        return x + y, cache


def _remat_block(block, policy, x, positions, allowed):
    """block(x, positions, allowed) under `jax.checkpoint` with `policy` (REMAT_POLICIES): the
    backward pass recomputes the block's activations instead of keeping them. The block is
    split into its static graph and its parameters so that the checkpointed function is pure
    (the parameters are its inputs and get their gradients). The numbers are the plain
    block's: the same operations run, only later."""
    graphdef, state = nnx.split(block)

    def run(state, x, positions, allowed):
        return nnx.merge(graphdef, state)(x, positions, allowed)[0]

    return jax.checkpoint(run, policy=policy)(state, x, positions, allowed)


def unembed(hidden_btd, weight, equation: str, *, softcap: float = 0.0):
    """Logits [B, T, V] float32 from hidden states and the output projection
    (`Transformer.unembedding`), soft-capped as cap * tanh(logits / cap) when softcap > 0."""
    logits = jnp.einsum(equation, hidden_btd, weight, preferred_element_type=jnp.float32)
    return softcap * jnp.tanh(logits / softcap) if softcap else logits


def segment_positions(segment_ids_bt):
    """Positions of packed rows: 0 at the first token of each segment (a run of one segment
    id), counting up within it, so each packed sequence is embedded as if it were alone.
    [B, T] int32 (padding, segment 0, counts on too; it is masked)."""
    seg = segment_ids_bt.astype(jnp.int32)
    t = seg.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), seg.shape)
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], jnp.bool_),
                              seg[:, 1:] != seg[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - first


def default_positions(mask_bt):
    """Positions for (left- or right-) padded rows: cumsum(mask) - 1, clipped at 0. [B, T] int32.

    A left-padded prompt then starts at position 0 at its first real token, so RoPE/learned
    positions match an unpadded forward pass of the same text.
    """
    return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


# Logical axes of the residual stream [B, T, D] between blocks: the batch split like the data.
ACTIVATION_AXES = ("batch", None, None)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class Transformer(nnx.Module):
    """Decoder-only language model. `lm_head=False` builds a backbone without the unembedding
    (used inside reward models and critics; with tied embeddings nothing changes)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
        self.cfg = cfg
        pdt = _dtype(cfg.param_dtype)
        self.dtype = _dtype(cfg.dtype)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=pdt, dtype=self.dtype,
                               embedding_init=jax.nn.initializers.normal(cfg.init_std),
                               rngs=rngs)
        self.embed.embedding.set_metadata(logical_axes=("vocab", "embed"))
        if cfg.position == "learned":
            self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, param_dtype=pdt,
                                       dtype=self.dtype,
                                       embedding_init=jax.nn.initializers.normal(0.01),
                                       rngs=rngs)
            self.pos_embed.embedding.set_metadata(logical_axes=("pos", "embed"))
        else:
            self.pos_embed = None
        for i in range(cfg.n_layers):
            setattr(self, f"layers_{i}", Block(cfg, layer=i, rngs=rngs))
        self.final_norm = Norm(cfg)
        if lm_head and not cfg.tie_embeddings:
            self.lm_head = DenseGeneral((cfg.d_model,), (cfg.vocab_size,), ("embed",),
                                        ("vocab",), use_bias=False, std=cfg.init_std, cfg=cfg,
                                        rngs=rngs)
        else:
            self.lm_head = None
        self.has_lm_head = lm_head

    def layers(self):
        """The transformer blocks in order (attributes `layers_0` ... `layers_{n-1}`)."""
        return [getattr(self, f"layers_{i}") for i in range(self.cfg.n_layers)]

    def hidden_states(self, tokens_bt, *, mask_bt=None, positions_bt=None, cache=None,
                      cache_index=None, kv_mask_bs=None, segment_ids_bt=None):
        """Final (normed) hidden states [B, T, D] (and the updated cache, if one is given).

        Training/prefill without a cache: attention is causal and keys where `mask_bt` is 0 are
        ignored. With a cache (list of per-layer dicts, k/v [B, G, S, K]) the T new tokens sit
        at cache slots [cache_index, cache_index + T); `kv_mask_bs` [B, S] marks which slots
        hold real tokens (including the new ones) and a query at slot i sees slots <= i.
        Sliding-window layers see only slots i - sliding_window < j <= i (in cache slots, which
        are positions up to the left padding, as in transformers).

        Packed rows (`segment_ids_bt` [B, T] int, no cache): several sequences per row, each
        with its own id 1, 2, ... and 0 on padding. A query sees only keys of its own segment
        (on top of causal and the window), so attention never crosses an example, and
        positions default to `segment_positions` (0 at each segment's first token). Padding
        (segment 0) attends within the padding, so no query row is empty; its outputs are
        masked downstream. `mask_bt` is then not needed for attention.
        """
        b, t = tokens_bt.shape
        if mask_bt is None:
            mask_bt = jnp.ones((b, t), jnp.bool_) if segment_ids_bt is None else \
                segment_ids_bt > 0
        mask_bt = mask_bt.astype(jnp.bool_)
        if segment_ids_bt is not None and cache is not None:
            raise ValueError("segment_ids_bt (packed rows) is for the cache-free forward only")
        if positions_bt is None:
            positions_bt = (default_positions(mask_bt) if segment_ids_bt is None
                            else segment_positions(segment_ids_bt))
        if cache is None:
            q_slot, kv_mask = jnp.arange(t), mask_bt                          # [T], [B, S=T]
        else:
            q_slot, kv_mask = cache_index + jnp.arange(t), kv_mask_bs.astype(jnp.bool_)
        k_slot = jnp.arange(kv_mask.shape[1])
        causal = q_slot[:, None] >= k_slot[None, :]                           # [T, S]
        if segment_ids_bt is None:
            allowed = {"full": causal[None] & kv_mask[:, None, :]}            # [B, T, S]
        else:
            same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]   # [B, T, T]
            allowed = {"full": causal[None] & same}
        if "sliding" in self.cfg.layer_types:
            window = q_slot[:, None] - k_slot[None, :] < self.cfg.sliding_window
            allowed["sliding"] = allowed["full"] & window[None]
        x = self.embed(tokens_bt)
        if self.cfg.embed_scale:
            # Gemma: embeddings times sqrt(D), the constant rounded to the compute dtype.
            x = x * jnp.asarray(math.sqrt(self.cfg.d_model), x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions_bt)
        # The residual stream stays split over the batch axes between blocks on a mesh
        # (sharding.activate); otherwise XLA follows the fsdp-sharded weights, gathers the
        # batch over fsdp and all-reduces the MLP activations. A no-op on one device.
        x = sharding.constrain(x, ACTIVATION_AXES)
        new_cache = []
        remat = cache is None and self.cfg.remat != "none"    # training: nothing to decode
        for i, layer in enumerate(self.layers()):
            if remat:
                x, c = _remat_block(layer, REMAT_POLICIES[self.cfg.remat], x, positions_bt,
                                    allowed), None
            else:
                x, c = layer(x, positions_bt, allowed, None if cache is None else cache[i],
                             cache_index)
            x = sharding.constrain(x, ACTIVATION_AXES)
            new_cache.append(c)
        x = self.final_norm(x)
        return (x, None) if cache is None else (x, new_cache)

    def unembedding(self):
        """(weight, einsum equation) of the output projection, in the compute dtype: the
        untied lm_head [D, V] or the tied embedding table [V, D]. `unembed` applies them."""
        if self.lm_head is not None:
            return self.lm_head.kernel[...].astype(self.dtype), "btd,dv->btv"
        if not self.has_lm_head and not self.cfg.tie_embeddings:
            raise ValueError("This Transformer was built with lm_head=False (a backbone)")
        return self.embed.embedding[...].astype(self.dtype), "btd,vd->btv"

    def logits(self, hidden_btd):
        """Unembedding [B, T, D] -> [B, T, V]; logits are returned in float32 (soft-capped at
        final_softcap where the family has it, Gemma 2)."""
        weight, equation = self.unembedding()
        return unembed(hidden_btd, weight, equation, softcap=self.cfg.final_softcap)

    def __call__(self, tokens_bt, *, mask_bt=None, positions_bt=None, segment_ids_bt=None):
        """Training forward: returns (logits [B, T, V] float32, hidden [B, T, D])."""
        hidden, _ = self.hidden_states(tokens_bt, mask_bt=mask_bt, positions_bt=positions_bt,
                                       segment_ids_bt=segment_ids_bt)
        return self.logits(hidden), hidden

    def init_cache(self, batch_size: int, length: int, dtype=None):
        """Zero KV cache: a list (one per layer) of {k, v: [B, G, S, K]} in the compute dtype."""
        cfg = self.cfg
        shape = (batch_size, cfg.n_kv_heads, length, cfg.head_size)
        dt = self.dtype if dtype is None else dtype
        return [{"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}
                for _ in range(cfg.n_layers)]


class RewardModel(nnx.Module):
    """r_phi(x, y): backbone + scalar head on the hidden state of the last non-pad token (the
    EOS position). Head init N(0, 1/(D + 1)) as in Stiennon et al. 2020 / Ouyang et al. 2022
    (the OpenAI lm-human-preferences reward head), bias zero."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.backbone = Transformer(cfg, rngs=rngs, lm_head=False)
        self.head = DenseGeneral((cfg.d_model,), (), ("embed",), (), use_bias=True,
                                 std=1.0 / math.sqrt(cfg.d_model + 1), cfg=cfg, rngs=rngs)

    def __call__(self, tokens_bt, *, mask_bt, positions_bt=None, segment_ids_bt=None,
                 read_at=None):
        """Rewards [B] (float32) read at the last non-pad token of each row.

        Packed rows (`segment_ids_bt`, see `Transformer.hidden_states`): `read_at` [N] gives
        the flat index row * T + t of each sequence's last token, and the rewards are [N],
        one per sequence, in that order."""
        hidden, _ = self.backbone.hidden_states(tokens_bt, mask_bt=mask_bt,
                                                positions_bt=positions_bt,
                                                segment_ids_bt=segment_ids_bt)
        if read_at is not None:
            last = hidden.reshape(-1, hidden.shape[-1])[read_at]                 # [N, D]
            return self.head(last).astype(jnp.float32)
        idx = last_token_index(mask_bt)
        last = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]   # [B, D]
        return self.head(last).astype(jnp.float32)


class ValueModel(nnx.Module):
    """PPO critic V(s_t): backbone + per-token scalar head initialised at zero, so the first
    value estimates are 0 and early advantages equal the returns (a common critic init; see
    docs/implementation_details.md)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.backbone = Transformer(cfg, rngs=rngs, lm_head=False)
        self.head = DenseGeneral((cfg.d_model,), (), ("embed",), (), use_bias=True, std=0.0,
                                 cfg=cfg, rngs=rngs)

    def __call__(self, tokens_bt, *, mask_bt, positions_bt=None):
        """Values [B, T] (float32); value at t estimates the return after token t."""
        hidden, _ = self.backbone.hidden_states(tokens_bt, mask_bt=mask_bt,
                                                positions_bt=positions_bt)
        return self.head(hidden).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Functional interface
# ----------------------------------------------------------------------------------------------


def create(cfg: ModelConfig, *, seed: int = 0, kind: str = "policy"):
    """Build a model and split it: returns (graphdef, params).

    kind: "policy" (Transformer), "reward" (RewardModel) or "value" (ValueModel).
    For sharded initialisation use `sharding.init_sharded(lambda: build(...), ...)`.
    """
    return nnx.split(build(cfg, seed=seed, kind=kind))


def build(cfg: ModelConfig, *, seed: int = 0, kind: str = "policy") -> nnx.Module:
    """Construct the NNX module of the given kind ("policy" | "reward" | "value")."""
    rngs = nnx.Rngs(params=seed)
    if kind == "policy":
        return Transformer(cfg, rngs=rngs)
    if kind == "reward":
        return RewardModel(cfg, rngs=rngs)
    if kind == "value":
        return ValueModel(cfg, rngs=rngs)
    raise ValueError(f"Unknown model kind {kind!r}; choose 'policy', 'reward' or 'value'")


def apply(graphdef, params, tokens_bt, *, mask_bt=None, positions_bt=None,
          segment_ids_bt=None):
    """Pure policy forward: (logits [B, T, V] float32, hidden [B, T, D]). Jit-friendly with
    `graphdef` static (e.g. via functools.partial or a closure). segment_ids_bt: packed rows
    (`Transformer.hidden_states`)."""
    return nnx.merge(graphdef, freeze_base(params))(tokens_bt, mask_bt=mask_bt,
                                                   positions_bt=positions_bt,
                                                   segment_ids_bt=segment_ids_bt)


def apply_reward(graphdef, params, tokens_bt, *, mask_bt, positions_bt=None,
                 segment_ids_bt=None, read_at=None):
    """Pure reward-model forward: rewards [B] float32 (packed rows: [N], one per sequence,
    read at the flat indices `read_at`; `RewardModel`)."""
    return nnx.merge(graphdef, freeze_base(params))(tokens_bt, mask_bt=mask_bt,
                                                   positions_bt=positions_bt,
                                                   segment_ids_bt=segment_ids_bt,
                                                   read_at=read_at)


def apply_value(graphdef, params, tokens_bt, *, mask_bt, positions_bt=None):
    """Pure critic forward: values [B, T] float32."""
    return nnx.merge(graphdef, freeze_base(params))(tokens_bt, mask_bt=mask_bt,
                                                   positions_bt=positions_bt)


def init_head_model_from_policy(*, head_params, policy_params):
    """Copy a policy's backbone weights into a reward model's or critic's params.

    head_params: state of a RewardModel/ValueModel (its `backbone` subtree is replaced);
    policy_params: state of a Transformer of the same ModelConfig. The policy's untied
    `lm_head` has no counterpart in the backbone and is dropped; the head keeps its own init.
    Returns new params (inputs are not modified).
    """
    policy = nnx.to_pure_dict(policy_params)
    target = nnx.to_pure_dict(head_params)
    backbone = target["backbone"]

    def copy(dst, src, path):
        out = {}
        for key, value in dst.items():
            if key not in src:
                raise ValueError(f"policy params lack {'/'.join(map(str, path + (key,)))}; "
                                 "build both models from the same ModelConfig")
            if isinstance(value, dict):
                out[key] = copy(value, src[key], path + (key,))
            else:
                if value.shape != src[key].shape:
                    raise ValueError(f"shape mismatch at {'/'.join(map(str, path + (key,)))}: "
                                     f"{value.shape} vs policy {src[key].shape}")
                out[key] = src[key]
        return out

    target["backbone"] = copy(backbone, policy, ("backbone",))
    new_params = jax.tree.map(lambda x: x, head_params)   # a structural copy to fill in
    nnx.replace_by_pure_dict(new_params, target)
    return new_params


# ----------------------------------------------------------------------------------------------
# LoRA adapters
# ----------------------------------------------------------------------------------------------


@registry.register("adapter", args={
    "rank": schema.Int(ge=1, doc="r, the rank of each adapter's factors A [in, r], B [r, out]"),
    "alpha": schema.Float(gt=0, doc="the update A @ B is scaled by alpha / rank"),
    "targets": schema.Tuple(schema.Choice(*LORA_TARGETS), min_len=1,
                            doc="projections with adapters: q, k, v, o (attention), mlp (gate, "
                                "up and down) or gate, up, down alone")})
def lora(*, rank: int = 16, alpha: float = 32.0,
         targets: tuple = ("q", "k", "v", "o", "mlp")) -> dict:
    """LoRA (Hu et al. 2021): the ModelConfig fields of low-rank adapters on the projections
    `targets` (each W [in, out] gets y += (x @ A) @ B * alpha / rank), the base weights frozen."""
    return {"lora_rank": int(rank), "lora_alpha": float(alpha), "lora_targets": tuple(targets)}


def path_names(path) -> tuple:
    """The dict keys (and sequence indices) of a pytree key path, without the `.value`
    attribute of an nnx.Variable: ("layers_0", "attn", "q_proj", "lora_a")."""
    return tuple(getattr(p, "key", getattr(p, "idx", None)) for p in path
                 if not isinstance(p, jax.tree_util.GetAttrKey))


def is_trainable(path) -> bool:
    """Whether the leaf at `path` (a pytree key path) trains in a LoRA model: an adapter
    factor, or a reward or value head. Every other parameter is the frozen base."""
    return any(n in ADAPTER_KEYS or n in HEAD_KEYS for n in path_names(path))


def has_adapters(tree) -> bool:
    """Whether the params (or any pytree holding them) contain LoRA adapter factors."""
    return any(any(n in ADAPTER_KEYS for n in path_names(path))
               for path, _ in jax.tree_util.tree_leaves_with_path(tree))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def split_trainable(params):
    """(layout, trainable leaves, frozen leaves) of a LoRA model's params (`is_trainable`), the
    leaves in tree order and nnx.Variables kept whole (with their logical axes);
    `join_trainable(layout, ...)` rebuilds the tree. `layout` is hashable (a jit static)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)
    layout = (treedef, tuple(is_trainable(p) for p, _ in paths))
    return (layout, *split_by_layout(layout, params))


def split_by_layout(layout, tree):
    """(trainable, frozen) leaves of a tree shaped like the params `layout` came from."""
    leaves = jax.tree.leaves(tree, is_leaf=_is_variable)
    return ([x for x, t in zip(leaves, layout[1]) if t],
            [x for x, t in zip(leaves, layout[1]) if not t])


def join_trainable(layout, train, frozen):
    """The tree `split_trainable` took apart."""
    train, frozen = iter(train), iter(frozen)
    return jax.tree.unflatten(layout[0], [next(train) if t else next(frozen)
                                          for t in layout[1]])


def freeze_base(params):
    """The params with the base weights of a LoRA model behind stop_gradient, so that a
    gradient reaches only the adapters and heads (`is_trainable`) and no weight gradient of the
    base is computed; `params` itself (nothing changes) for a model without adapters."""
    if not has_adapters(params):
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if is_trainable(path) else jax.lax.stop_gradient(x), params)


def adapters_off(params):
    """The frozen base model of a LoRA model: its adapter factors zeroed (small new arrays), so
    each adapted projection computes exactly its base y = x @ W. The other leaves are the same
    arrays (no copy): the reference of DPO and RL is this view of the policy's own params."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if path_names(path)[-1] in ADAPTER_KEYS else x,
        params)


def trainable_part(tree) -> dict:
    """The leaves of a LoRA model's params that train (`is_trainable`), as a nested dict of
    arrays keyed like `nnx.to_pure_dict`: what a LoRA stage checkpoints."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not is_trainable(path):
            continue
        keys = [str(n) for n in path_names(path)]
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return out


def with_trainable_part(tree, part: dict):
    """`tree` with its trainable leaves replaced by those of `part` (`trainable_part`'s
    layout); the frozen leaves are the same arrays."""
    def one(path, leaf):
        if not is_trainable(path):
            return leaf
        node = part
        for k in map(str, path_names(path)):
            node = node[k]
        return node

    return jax.tree_util.tree_map_with_path(one, tree)


def merge_adapters(params, cfg: ModelConfig):
    """Plain parameters of a LoRA model: each adapted kernel W + A @ B * lora_alpha / lora_rank,
    the factors dropped. Returns (params as a nested dict of arrays, the ModelConfig without
    adapters); `nnx.replace_by_pure_dict` puts them into the state of that config's model."""
    scale = cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0

    def merge(node):
        if not isinstance(node, dict):
            return node
        if "lora_a" in node:
            a, b = node["lora_a"], node["lora_b"]
            delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
            kernel = node["kernel"]
            rest = {k: v for k, v in node.items() if k not in ADAPTER_KEYS}
            return {**rest, "kernel": (kernel.astype(jnp.float32) + delta * scale
                                       ).astype(kernel.dtype)}
        return {k: merge(v) for k, v in node.items()}

    plain = cfg.without_adapters()
    return merge(nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params), plain


def _scaled(logits_btv, temperature):
    z = logits_btv.astype(jnp.float32)
    return z if temperature == 1.0 else z / temperature   # static: no [B, T, V] pass at 1.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _selective_logprobs(logits_btv, tokens_bt, temperature):
    z = _scaled(logits_btv, temperature)
    chosen = jnp.take_along_axis(z, tokens_bt[..., None], axis=-1)[..., 0]
    return chosen - jax.nn.logsumexp(z, axis=-1)


def _selective_logprobs_fwd(logits_btv, tokens_bt, temperature):
    z = _scaled(logits_btv, temperature)
    chosen = jnp.take_along_axis(z, tokens_bt[..., None], axis=-1)[..., 0]
    lse = jax.nn.logsumexp(z, axis=-1)
    # Residuals: the caller's logits (alive anyway), not an fp32/softmax copy of them.
    return chosen - lse, (logits_btv, tokens_bt, lse)


def _selective_logprobs_bwd(temperature, residuals, g_bt):
    logits_btv, tokens_bt, lse = residuals
    z = _scaled(logits_btv, temperature)
    # d/dz [z_y - logsumexp(z)] = onehot(y) - softmax(z). Written as one elementwise
    # expression (iota == y) so XLA fuses it; autodiff of the gather would scatter-add instead.
    onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) == tokens_bt[..., None]
    dz = g_bt[..., None] * (onehot.astype(jnp.float32) - jnp.exp(z - lse[..., None]))
    return _scaled(dz, temperature).astype(logits_btv.dtype), None


_selective_logprobs.defvjp(_selective_logprobs_fwd, _selective_logprobs_bwd)


def token_logprobs(logits_btv, tokens_bt, mask_bt=None, *, temperature: float = 1.0):
    """log softmax(logits / temperature)[token], per token, in float32. Shapes: [B, T, V],
    [B, T] -> [B, T].

    Alignment: this function does NOT shift. `logits[:, t]` is scored against `tokens[:, t]`.
    A causal LM's logits at position t predict token t + 1, so for a sequence `seq` the caller
    passes `token_logprobs(logits[:, :-1], seq[:, 1:], mask[:, 1:])`. (Shifting the [B, T]
    tokens instead, `targets = concat(seq[:, 1:], pad)` with the last mask column 0, avoids
    slicing and, in the backward pass, re-padding the [B, T, V] logits.)

    Selective log-softmax: the chosen logit is gathered and logsumexp subtracted, so no
    [B, T, V] log-softmax is materialised; the custom gradient onehot - softmax is one fused
    elementwise pass (no scatter) and keeps only the logits and a [B, T] logsumexp as
    residuals. Differentiable in `logits` only. Masked positions return 0.
    """
    logp = _selective_logprobs(logits_btv, tokens_bt.astype(jnp.int32), float(temperature))
    if mask_bt is not None:
        logp = jnp.where(mask_bt.astype(jnp.bool_), logp, 0.0)
    return logp


def entropy(logits_btv, mask_bt=None, *, temperature: float = 1.0):
    """Per-token entropy of softmax(logits / temperature) in float32: [B, T, V] -> [B, T].

    The arithmetic is `losses.token_entropy` (finite for -inf logits). Masked positions give 0.
    """
    z = logits_btv.astype(jnp.float32)
    if temperature != 1.0:
        z = z / temperature
    ent = token_entropy(z)
    if mask_bt is not None:
        ent = jnp.where(mask_bt.astype(jnp.bool_), ent, 0.0)
    return ent


def target_logprobs(graphdef, params, tokens_bt, targets_bl, target_mask_bl, *, mask_bt=None,
                    positions_bt=None, temperature: float = 1.0, with_entropy: bool = False,
                    segment_ids_bt=None):
    """Log-probs (and entropies) of the policy's next-token distributions at the last L
    positions before the end: the one scoring path of the trainers and rollouts.

    tokens [B, T] (mask_bt: which are real); targets [B, L], L < T, are scored by the logits
    at positions T-1-L .. T-2, i.e. they are the tokens that follow, as in
    `token_logprobs(logits[:, T-1-L:-1], targets, target_mask)`: targets = tokens[:, 1:]
    scores a whole sequence, targets = the completion scores [prompt | completion].
    Returns (logps [B, L], entropy [B, L] or None), float32, 0 where target_mask is 0, of
    softmax(logits / temperature).

    With cfg.logits_chunk = c > 0 the trunk runs to the hidden states [B, T, D] and the
    unembedding, log-softmax and entropy run over chunks of c positions, each under
    `jax.checkpoint` inside a `lax.scan`: the forward keeps one [B, c, V] block at a time and
    the backward recomputes each chunk's logits, so the [B, T, V] float32 logits are never
    held (at V = 128k-262k they dominate training memory). Same values and gradients as the
    unchunked path up to float rounding. With 0 this is exactly `apply` + `token_logprobs`
    (+ `entropy`). segment_ids_bt: packed rows (`Transformer.hidden_states`); a target that
    starts the next segment must be masked by the caller (the packer's loss_mask is 0 there).
    """
    net = nnx.merge(graphdef, freeze_base(params))
    t, n = tokens_bt.shape[1], targets_bl.shape[1]
    start = t - 1 - n
    if start < 0:
        raise ValueError(f"{n} targets need at least {n + 1} tokens, got {t}")
    chunk = net.cfg.logits_chunk
    if not chunk:
        logits, _ = net(tokens_bt, mask_bt=mask_bt, positions_bt=positions_bt,
                        segment_ids_bt=segment_ids_bt)
        logits = logits[:, start:-1]
        logps = token_logprobs(logits, targets_bl, target_mask_bl, temperature=temperature)
        ent = entropy(logits, target_mask_bl, temperature=temperature) if with_entropy else None
        return logps, ent
    hidden, _ = net.hidden_states(tokens_bt, mask_bt=mask_bt, positions_bt=positions_bt,
                                  segment_ids_bt=segment_ids_bt)
    weight, equation = net.unembedding()
    return chunked_logprobs(hidden[:, start:-1], weight, equation, targets_bl, target_mask_bl,
                            chunk=chunk, softcap=net.cfg.final_softcap,
                            temperature=temperature, with_entropy=with_entropy)


def chunked_logprobs(hidden_bld, weight, equation: str, targets_bl, target_mask_bl, *,
                     chunk: int, softcap: float = 0.0, temperature: float = 1.0,
                     with_entropy: bool = False):
    """`token_logprobs` (and `entropy`) of unembed(hidden) over chunks of `chunk` positions,
    without materialising the [B, L, V] logits (see `target_logprobs`). hidden [B, L, D] is
    aligned with targets [B, L]; L need not divide by `chunk` (the last chunk is padded with
    masked positions). Returns (logps [B, L], entropy [B, L] or None)."""
    b, n = targets_bl.shape
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    mask_bl = jnp.ones((b, n), jnp.bool_) if target_mask_bl is None else \
        target_mask_bl.astype(jnp.bool_)
    if pad:
        hidden_bld = jnp.pad(hidden_bld, ((0, 0), (0, pad), (0, 0)))
        targets_bl = jnp.pad(targets_bl, ((0, 0), (0, pad)))
        mask_bl = jnp.pad(mask_bl, ((0, 0), (0, pad)))

    def split(x):   # [B, n_chunks * chunk, ...] -> [n_chunks, B, chunk, ...]
        return jnp.swapaxes(x.reshape(b, n_chunks, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint   # the backward pass recomputes this chunk's logits: only [B, c, D] kept
    def one(weight, h_bcd, y_bc, m_bc):
        logits = unembed(h_bcd, weight, equation, softcap=softcap)
        logps = token_logprobs(logits, y_bc, m_bc, temperature=temperature)
        ent = entropy(logits, m_bc, temperature=temperature) if with_entropy else None
        return logps, ent

    def body(carry, xs):
        return carry, one(weight, *xs)

    _, (logps, ent) = jax.lax.scan(body, None, (split(hidden_bld), split(targets_bl),
                                                split(mask_bl)))

    def join(x):    # [n_chunks, B, chunk] -> [B, L]
        return jnp.swapaxes(x, 0, 1).reshape(b, n_chunks * chunk)[:, :n]

    return join(logps), (join(ent) if with_entropy else None)


def count_params(params, *, exclude_embeddings: bool = False) -> int:
    """Number of parameters; with exclude_embeddings the token/position tables are skipped."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [getattr(p, "key", getattr(p, "name", "")) for p in path]
        if exclude_embeddings and any(n in ("embed", "pos_embed") for n in names):
            continue
        total += math.prod(leaf.shape)
    return total


def param_logical_axes(params) -> Any:
    """The `logical_axes` metadata of every parameter, as a pytree of tuples (for inspection)."""
    return jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
