"""Data: tokenizers, the synthetic gold-reward testbed, TFDS builders and batching.

    from rlhf_jax.data import synthetic, tokenizer, builders, batching, records

- `tokenizer`: SentencePiece training / loading (`train_sentencepiece`, `Tokenizer`) and the chat
  format with assistant-only loss masks (`Tokenizer.encode_chat`).
- `synthetic`: the embedded testbed (`Testbed`): a review language, its jittable gold reward
  r*(x, y), Bradley–Terry pairs and Plackett–Luce rankings. See docs/testbed.md.
- `arithmetic`: the testbed's checkable task (sums with their answers, for verifier rewards).
- `sources`: the registered data sources (`data.source`): synthetic, arithmetic, tfds.
- `builders`: TFDS builders written as array_record and read TF-free (`prepare`,
  `SyntheticTestbed`, `ArithmeticTask`, `HhRlhfPairs`, `TldrComparisons`, `ImdbPrompts`).
  See docs/data.md.
- `batching`: fixed-shape Grain batches with a JSON-able iterator state (`make_iterator`).
- `records`: `DataError` and the bad-record and bad-file policy.

Submodules load on first use, so importing the package does not import TFDS or JAX.
"""

import importlib

_SUBMODULES = ("arithmetic", "batching", "builders", "records", "sources", "synthetic",
               "tokenizer")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"rlhf_jax.data.{name}")
    raise AttributeError(f"module 'rlhf_jax.data' has no attribute {name!r}")


def __dir__():
    return sorted((*globals(), *_SUBMODULES))
