"""Schema pieces the stages share: seed, model, mesh, optimizer, data and loop settings.

Each trainer builds its `SCHEMA` (see rlhf_jax/schema.py) from these beside its
`default_config()`, so a field's type, range and meaning are written once, next to where the
stage gives it a default.
"""

from rlhf_jax.model import (_DTYPES, ACTIVATIONS, ATTENTIONS, NORMS, POSITIONS, REMAT_POLICIES,
                            RUNTIME_DEFAULTS)
from rlhf_jax.schema import Bool, Choice, Dict, Field, Float, Int, Spec, Str, Tuple

# Choices the trainers branch on, named once here and read by trainers/common.py.
SCHEDULES = ("cosine", "constant")
STATE_DTYPES = ("param", "float32")

SIZE = Str(nonempty=True, doc="the experiment's size preset, e.g. 'default' or 'smoke'")
SEED = Int(ge=0, doc="training seed: initialisation, data order, sampling")

def _mesh_shape_problem(shape) -> str | None:
    if 0 in shape:
        return "has a 0; every axis needs at least one device (or -1: the rest)"
    if tuple(shape).count(-1) > 1:
        return "has more than one -1; at most one axis takes the remaining devices"
    return None


MESH = {
    "shape": Tuple(Int(ge=-1), min_len=3, max_len=3, rule=_mesh_shape_problem,
                   doc="(data, fsdp, tensor) device counts; one -1 takes the remaining devices"),
    "rules": Dict(doc="logical axis name -> mesh axes, overriding sharding.DEFAULT_RULES"),
    "distributed": Choice(False, True, "auto",
                          doc="multi-host: jax.distributed.initialize from the config or "
                              "JAX_* variables (true), or auto-detected ('auto')"),
}

OPTIM = {
    "lr": Float(gt=0, doc="peak learning rate"),
    "warmup_steps": Int(ge=0, doc="linear warm-up steps from 0 to lr"),
    "weight_decay": Float(ge=0, doc="AdamW decoupled weight decay"),
    "grad_clip": Float(ge=0, doc="global-norm gradient clipping; 0 turns it off"),
    "b1": Float(ge=0, lt=1, doc="Adam first-moment decay"),
    "b2": Float(ge=0, lt=1, doc="Adam second-moment decay"),
    "schedule": Choice(*SCHEDULES, doc="learning-rate decay after warm-up"),
    "end_lr_frac": Float(ge=0, le=1, doc="final learning rate of the cosine decay, as a "
                                         "fraction of lr"),
    "state_dtype": Choice(*STATE_DTYPES, doc="Adam's moments in the parameters' dtype "
                                             "('param') or in float32 (with bfloat16 "
                                             "parameters: the update is computed in float32 "
                                             "and rounded once into the parameters)"),
}

MODEL = {
    "vocab_size": Int(ge=0, doc="0 follows the tokenizer"),
    "d_model": Int(ge=1, doc="model width"),
    "n_layers": Int(ge=1, doc="transformer blocks"),
    "n_heads": Int(ge=1, doc="attention heads; must divide d_model"),
    "n_kv_heads": Int(ge=1, doc="key/value heads (grouped-query attention); must divide n_heads"),
    "d_ff": Int(ge=1, doc="hidden width of the MLP"),
    "max_len": Int(ge=2, doc="longest sequence (prompt + completion) in tokens"),
    "norm": Choice(*NORMS),
    "position": Choice(*POSITIONS),
    "activation": Choice(*ACTIVATIONS),
    "tie_embeddings": Bool(doc="share the input embedding and the output projection"),
    "use_bias": Bool(doc="biases on the projections (GPT-2 style)"),
    "norm_eps": Float(gt=0),
    "rope_theta": Float(gt=0),
    "init_std": Float(gt=0),
    "param_dtype": Choice(*_DTYPES),
    "dtype": Choice(*_DTYPES, doc="compute dtype"),
    # Runtime options (memory, not architecture; docs/model.md "Memory options").
    "remat": Choice(*REMAT_POLICIES, doc="rematerialise each block in the backward pass: "
                                         "'none', 'full' (keep only block inputs) or 'dots' "
                                         "(keep the projections' outputs)"),
    "logits_chunk": Int(ge=0, doc="log-probs and entropy over chunks of this many positions, "
                                  "never holding the [B, T, V] logits; 0 = off"),
    "attention": Choice(*ATTENTIONS, doc="'einsum', or jax.nn.dot_product_attention: "
                                         "'dot_product' (cuDNN on GPU where it can, else XLA) "
                                         "or 'cudnn' (required)"),
}
# The runtime options alone: the `model` group of a stage that loads its model from a
# checkpoint (the architecture comes with it; how to compute is the stage's choice).
RUNTIME_MODEL = {**{k: MODEL[k] for k in ("remat", "logits_chunk", "attention")},
                 "param_dtype": Choice("", *_DTYPES, doc="store the loaded parameters in this "
                                                         "dtype; '' keeps the checkpoint's")}
# Their defaults: the path a stage computed before the options existed.
RUNTIME_MODEL_DEFAULTS = {**RUNTIME_DEFAULTS, "param_dtype": ""}


def data(**extra) -> dict:
    """The data group: where records come from, the testbed's size, and how they are batched."""
    return {
        "source": Spec("data_source", doc="where records come from: a built-in testbed "
                                          "('synthetic', 'arithmetic(digits=2)') or a "
                                          "prepared TFDS dataset ('tfds': data.name under "
                                          "data.data_dir)"),
        "name": Str(doc="the TFDS dataset name when source='tfds'"),
        "data_dir": Str(doc="where datasets are prepared or read; '' = WORKDIR/data"),
        "format": Choice("plain", "chat", doc="plain text, or prompts as conversations in the "
                                              "model's chat template (instruct models; "
                                              "docs/data.md)"),
        "n_train": Int(ge=1, doc="testbed training records"),
        "n_test": Int(ge=1, doc="testbed held-out records (evaluation reads them)"),
        "seed": Int(ge=0, doc="testbed data seed (kept fixed across training seeds)"),
        "buckets": Tuple(Int(ge=2), min_len=1, doc="padded sequence lengths a batch can take"),
        "max_prompt_len": Int(ge=1, doc="prompts are cut to their last max_prompt_len tokens"),
        "packing": Bool(doc="pack several training sequences per row of max(buckets) tokens, "
                            "attention and positions kept within each (SFT, reward model, "
                            "paired preference losses; docs/data.md)"),
        **extra,
    }


BATCH_SIZE = Int(ge=1, doc="sequences (or pairs) per step")
MICRO_BATCHES = Int(ge=1, doc="gradient accumulation: the batch runs as this many micro-batches "
                              "(it must divide the batch) and one update equals the whole "
                              "batch's; 1 = off")
TAU = Float(gt=0, doc="Bradley-Terry temperature of the testbed's preference labels")
FLIP_RATE = Float(ge=0, le=1, doc="fraction of testbed labels flipped at random")
# The preference stage's records, and pairs read as unpaired rows (for KTO; docs/data.md).
PREF_DATA_KIND = Choice("pairs", "unpaired", doc="pairs {prompt, chosen, rejected} or unpaired "
                                                 "rows {prompt, completion, desirable}")
SPLIT_PAIRS = Bool(doc="read each pair as two unpaired rows: its chosen completion desirable, "
                       "its rejected one undesirable (for an unpaired loss such as kto)")


def loop(*, steps_min: int = 1, eval_every: bool = False) -> dict:
    """steps, logging, checkpoint cadence and evaluation batches."""
    out = {
        "steps": Int(ge=steps_min, doc="optimizer steps (iterations for RL)"
                     + ("; 0 derives them from epochs" if steps_min == 0 else "")),
        "log_every": Int(ge=1, doc="steps between metric rows"),
        "save_every": Int(ge=1, doc="steps between checkpoints"),
        "keep": Int(ge=1, doc="checkpoints kept"),
    }
    if eval_every:
        out["eval_every"] = Int(ge=0, doc="iterations between evaluations; 0 turns them off")
    return out


def _lora_problem(spec: str) -> str | None:
    if spec == "":
        return None
    from rlhf_jax import registry
    try:
        registry.validate("adapter", spec)
    except ValueError as e:
        return str(e)
    return None


# The same key in every stage: one override means the same everywhere (docs/model.md, "LoRA").
LORA = Field("str", rule=_lora_problem,
             doc="LoRA adapters, e.g. \"lora(rank=16, alpha=32, targets=('q', 'k', 'v', 'o', "
                 "'mlp'))\": only the adapters (and a reward or value head) train, the frozen "
                 "base is the reference; '' = off")
