"""Export a finished stage as a Hugging Face checkpoint that `transformers` loads.

    python -m tools.export_hf --stage runs/dpo_hh/dpo --out /models/qwen-dpo
    python -m tools.export_hf --stage runs/quickstart/rm --out /models/rm --drop_reward_bias

A policy stage (SFT, DPO family, PPO/GRPO/RLOO) becomes a *ForCausalLM checkpoint, loadable
with `AutoModelForCausalLM.from_pretrained(out)`; a reward-model stage a
*ForSequenceClassification one with a single label (`AutoModelForSequenceClassification`).
The directory holds config.json, model.safetensors (or shards and an index),
generation_config.json and the tokenizer files. The family is the one the stage started from
(`init_from=hf:DIR`), or for a model trained here from scratch the one whose options it
matches (GPT-2 or Llama). The latest checkpoint of the stage is read, after its checksums.

--dtype bfloat16 writes bf16 weights (default: the stage's own, float32).
--drop_reward_bias: the reward stage folds its normalisation into the head's bias, which the
transformers classifier cannot hold; with this flag the bias is left out and every exported
reward shifts by minus it (preferences between responses are unchanged). Without it such an
export is refused.

A bad argument, a missing or damaged stage prints one line `error: ...` and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from rlhf_jax import checkpoint, hf
from rlhf_jax.errors import ConfigError, UserError


def export(stage: str, out: str, *, dtype: str | None = None, drop_reward_bias: bool = False,
           max_shard_bytes: int = 5 * 2**30):
    """Writes the latest checkpoint of `stage` to `out`; returns (out, kind)."""
    from rlhf_jax.trainers import common
    if not checkpoint.stage_has_checkpoint(stage):
        raise ConfigError(f"--stage {stage!r} holds no complete checkpoint; point it at a "
                          "stage directory such as WORKDIR/dpo")
    with checkpoint.Checkpointer(stage) as ckpt:
        kind = ckpt.restore_meta().get("model_kind", "policy")
    if kind not in hf.KINDS:
        raise ConfigError(f"--stage {stage!r} holds a {kind} model; only policies and reward "
                          "models have a transformers class to export to")
    _, params, model_cfg, tok, _ = common.load_stage(stage, kind=kind, key="--stage")
    if kind == "reward" and tok.pad_id == tok.eos_id:
        # transformers' classifiers score the last token that is not pad_token_id: with pad ==
        # eos they read the token before a trailing EOS, where this reward model reads the EOS.
        print(f"warning: the tokenizer's pad and eos are one id ({tok.eos_id}); transformers "
              "will score responses one token before their EOS. Score text without a trailing "
              "EOS there, or give the tokenizer its own pad token", file=sys.stderr)
    hf.save(out, params, model_cfg, tok, kind=kind, dtype=dtype,
            max_shard_bytes=max_shard_bytes, drop_head_bias=drop_reward_bias)
    return out, kind


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", required=True, help="a finished stage directory")
    parser.add_argument("--out", required=True, help="the Hugging Face directory to write")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--drop_reward_bias", action="store_true")
    parser.add_argument("--max_shard_gb", type=float, default=5.0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out, kind = export(args.stage, args.out, dtype=args.dtype,
                           drop_reward_bias=args.drop_reward_bias,
                           max_shard_bytes=int(args.max_shard_gb * 2**30))
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:        # --out is a file, or not writable
        print(f"error: --out {args.out!r}: {e.strerror or e}; choose a writable directory",
              file=sys.stderr)
        return 2
    print(f"exported {kind} {args.stage} -> {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
