"""A checkable testbed task: adding two small numbers, with the answer in a dataset field.

RL with verifiable rewards needs prompts whose answer a program can check (Lambert, "RLHF",
ch. 14: reinforcement learning with verifiable rewards). This task is the smallest one that
still has something to learn: a prompt is two numbers of up to `digits` digits written digit by
digit, a completion is their sum,

    prompt      "4 7 + 1 5 ="          answer "62"
    completion  "6 2"                  (then eos)

and a completion is right when its digits, spaces removed, equal the record's `answer` (the
`exact_match` reward of rlhf_jax/rewards.py).

Demonstrations can be noisy, as human ones are: with `noise` > 0, that fraction of the SFT
completions (training split only; the answer field stays right) carries a slip, the last digit
written twice ("6 2 2") or left out ("6"). A model fine-tuned on them makes the same slips at
about that rate on any prompt, and a verifier reward can teach it to stop: the RL signal is
then not limited by how much arithmetic a tiny model can pick up from a few hundred rewarded
samples (on clean data a small model's RL gains on held-out sums stay within noise).

The task has its own word-level vocabulary (the ten digits, "+" and "="), so adding it left the
review testbed's tokenizer, and every run on it, unchanged. Everything is deterministic from a
seed; a held-out split never repeats a training prompt.
"""

from __future__ import annotations

import functools

import numpy as np

from rlhf_jax.data import tokenizer as tokenizer_lib

WORDS = tuple("0123456789") + ("+", "=")
MAX_DIGITS = 4


def _spaced(n: int) -> str:
    return " ".join(str(n))


@functools.lru_cache(maxsize=1)
def tokenizer() -> tokenizer_lib.Tokenizer:
    """The task's word-level tokenizer: pad, unk, bos, eos, then one piece per word."""
    return tokenizer_lib.train_sentencepiece(
        sentences=[" ".join(WORDS)] * 4, vocab_size=len(WORDS) + 4, model_type="word",
        chat=None)


TASKS = ("add", "copy")


def problem(a: int, b: int | None = None) -> dict:
    """One record: {"prompt": "a + b =", "completion": the sum, "answer": the sum without
    spaces}; with b None, the copying task: {"prompt": "a =", "completion": a, "answer": a}."""
    if b is None:
        return {"prompt": f"{_spaced(a)} =", "completion": _spaced(a), "answer": str(a)}
    return {"prompt": f"{_spaced(a)} + {_spaced(b)} =", "completion": _spaced(a + b),
            "answer": str(a + b)}


def slip(completion: str, rng: np.random.Generator) -> str:
    """The completion with its last digit repeated or (for a sum of two digits or more) left
    out: a wrong answer in the right format."""
    words = completion.split()
    if len(words) > 1 and rng.random() < 0.5:
        return " ".join(words[:-1])
    return " ".join(words + words[-1:])


def examples(n: int, *, digits: int, seed: int, exclude: frozenset = frozenset(),
             noise: float = 0.0, task: str = "add") -> list[dict]:
    """n distinct problems with operands in [0, 10**digits), none whose prompt is in
    `exclude`; a fraction `noise` (drawn per record) of the completions carry a `slip`.
    task "add" sums two numbers, "copy" repeats one (a task any small model learns in a few
    steps, for tests). Raises ValueError when fewer than n such problems exist."""
    if not 1 <= digits <= MAX_DIGITS:
        raise ValueError(f"digits={digits} must be in [1, {MAX_DIGITS}]")
    if task not in TASKS:
        raise ValueError(f"task={task!r} must be one of {TASKS}")
    size = 10 ** digits
    total = size * size if task == "add" else size
    if n > total - len(exclude):
        raise ValueError(f"{n} distinct problems with {digits}-digit operands do not exist "
                         f"(there are {total - len(exclude)} left); ask for fewer or "
                         "allow more digits")
    rng = np.random.default_rng(seed)
    rows, seen = [], set(exclude)
    while len(rows) < n:
        a, b = (int(x) for x in rng.integers(0, size, 2))
        row = problem(a, b if task == "add" else None)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            if noise and rng.random() < noise:
                row["completion"] = slip(row["completion"], rng)
            rows.append(row)
    return rows
