"""Data sources as a registry kind ("data_source"): where a stage's records come from, and
what the source knows besides its records.

    source = sources.get(config.data.source)        # "synthetic", "arithmetic(digits=3)", "tfds"
    records = source.records(config.data, "prompts", "test", workdir)   # random access
    source.tokenizer()        # the source's own tokenizer (the testbeds have one), or None
    source.gold(tok)          # the reward evaluation logs as the truth, or None

A trainer asks its source these questions instead of asking which source it has: the review
testbed answers with its gold reward r* (for a policy that speaks its token ids), the arithmetic
task with exact match against each prompt's answer, a TFDS dataset with nothing. A new source is
one registered function returning a `Source`.

Every record field a reward reads (exact_match's `answer`) travels with the prompt batches
(`batching.make_iterator(text_fields=...)`), so a verifier works on any source whose prompt
records carry the field, the testbed's or a prepared dataset's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rlhf_jax import registry, schema
from rlhf_jax.data import arithmetic, tokenizer as tokenizer_lib
from rlhf_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Gold:
    """The reward an evaluation reports as the truth: a reward expression (rlhf_jax/rewards.py)
    and the inputs its terms read that only the source has (the testbed's gold tables)."""
    expr: str
    inputs: dict = dataclasses.field(default_factory=dict)


class Source:
    """A data source. `records` is the one required method."""

    name = ""
    # Record kinds it supplies ("sft", "prompts", "pairs", "rankings"); None: whatever the
    # prepared dataset holds.
    kinds: tuple[str, ...] | None = None
    # Reward inputs it provides (rewards.py: the "gold" term reads "tables").
    reward_inputs: tuple[str, ...] = ()
    # It generates its records (their number is data.n_train / data.n_test), rather than
    # reading a prepared dataset named data.name.
    generated = False

    def records(self, data, kind: str, split: str, workdir: Path):
        raise NotImplementedError

    def tokenizer(self) -> tokenizer_lib.BaseTokenizer | None:
        """The tokenizer the source's text is written for, when it has one."""
        return None

    def gold(self, tok) -> Gold | None:
        """The reward evaluations report as the truth for a model with tokenizer `tok`."""
        return None

    def check(self, kind: str) -> None:
        """A ConfigError when the source cannot supply records of `kind`."""
        if self.kinds is not None and kind not in self.kinds:
            raise ConfigError(f"data.source={self.name!r} has no {kind!r} records (it has "
                              f"{', '.join(self.kinds)}); pick a source that does, e.g. "
                              "'synthetic' or a prepared TFDS dataset")


def _data_dir(data, workdir: Path) -> str:
    return data.get("data_dir", "") or str(Path(workdir) / "data")


class ReviewTestbed(Source):
    """The synthetic review language of synthetic.py, with its known gold reward."""

    name = "synthetic"
    kinds = ("sft", "prompts", "pairs", "rankings")
    reward_inputs = ("tables",)
    generated = True

    def records(self, data, kind, split, workdir):
        from rlhf_jax.data import builders
        self.check(kind)
        n_train, n_test = int(data.n_train), int(data.n_test)
        tau, flip_rate = float(data.get("tau", 1.0)), float(data.get("flip_rate", 0.0))
        # Every field that changes the records is in the name: a prepared dataset of that
        # name is reused as it is.
        cfg = builders.SyntheticConfig(
            name=f"{kind}_{n_train}_{n_test}_s{data.seed}_t{tau}_f{flip_rate}",
            kind=kind, n_train=n_train, n_test=n_test, seed=int(data.seed), tau=tau,
            flip_rate=flip_rate)
        builder = builders.prepare(builders.SyntheticTestbed, data_dir=_data_dir(data, workdir),
                                   config=cfg)
        return builder.as_data_source(split=split)

    def tokenizer(self):
        return testbed().tokenizer

    def gold(self, tok):
        # r* reads the testbed's own token ids: a model with another tokenizer (a Hugging Face
        # checkpoint trained on the testbed's text, say) cannot be scored by it token by token.
        bed = testbed()
        return Gold("gold", {"tables": bed.tables}) if tok.same_ids(bed.tokenizer) else None


class ArithmeticTestbed(Source):
    """The testbed's checkable task (arithmetic.py): sums, each record with its answer."""

    name = "arithmetic"
    kinds = ("sft", "prompts")
    generated = True

    def __init__(self, digits: int = 2, noise: float = 0.0, task: str = "add"):
        self.digits, self.noise, self.task = digits, noise, task

    def records(self, data, kind, split, workdir):
        from rlhf_jax.data import builders
        self.check(kind)
        n_train, n_test = int(data.n_train), int(data.n_test)
        # Prompts carry no demonstrations, so noise changes only the SFT records.
        noise = self.noise if kind == "sft" else 0.0
        cfg = builders.ArithmeticConfig(
            name=f"{kind}_{self.task}_{n_train}_{n_test}_s{data.seed}_d{self.digits}_n{noise}",
            kind=kind, n_train=n_train, n_test=n_test, seed=int(data.seed), digits=self.digits,
            noise=noise, task=self.task)
        try:
            builder = builders.prepare(builders.ArithmeticTask,
                                       data_dir=_data_dir(data, workdir), config=cfg)
        except ValueError as e:      # more problems asked for than the digits allow
            raise ConfigError(f"data.source={data.source!r}: {e}") from None
        return builder.as_data_source(split=split)

    def tokenizer(self):
        return arithmetic.tokenizer()

    def gold(self, tok):
        # Exact match reads decoded text and the prompt's answer: any tokenizer will do.
        return Gold("exact_match")


class Tfds(Source):
    """A TFDS dataset already prepared under data.data_dir (data.name), read without TF."""

    name = "tfds"

    def records(self, data, kind, split, workdir):
        from rlhf_jax.data import builders
        import tensorflow_datasets as tfds
        data_dir = _data_dir(data, workdir)
        if not Path(data_dir).is_dir():
            raise ConfigError(f"data.data_dir={data_dir!r} does not exist; prepare the dataset "
                              "first (see docs/data.md) and point data.data_dir at it")
        try:
            with builders.quiet_tfds():
                return tfds.data_source(data.name, split=split, data_dir=data_dir,
                                        download=False)
        except (ValueError, KeyError) as e:
            # A name not prepared there (DatasetNotFoundError, a ValueError, or a KeyError for
            # a registered builder), or a split it does not have. TFDS's message goes on to
            # list its whole catalog: keep its first line and list what is prepared instead.
            text = str(e.args[0]) if e.args else type(e).__name__
            first = (text.strip().splitlines() or [type(e).__name__])[0].rstrip(".")
            prepared = prepared_datasets(Path(data_dir))
            shown = ", ".join(prepared[:20]) + (f" and {len(prepared) - 20} more"
                                                 if len(prepared) > 20 else "")
            raise ConfigError(f"data.name={data.name!r} (split {split!r}) cannot be read from "
                              f"data.data_dir={data_dir!r}: {first}; datasets prepared "
                              f"there: {shown or 'none'}; fix data.name or prepare the dataset "
                              "first (see docs/data.md)") from None


def prepared_datasets(data_dir: Path) -> list[str]:
    """Names of the TFDS datasets prepared under data_dir (those with a dataset_info.json in
    <name>/[<config>/]<version>/), as data.name would spell them."""
    found = set()
    for info in list(data_dir.glob("*/*/dataset_info.json")) + list(
            data_dir.glob("*/*/*/dataset_info.json")):
        parts = info.relative_to(data_dir).parts[:-2]      # drop <version>/dataset_info.json
        found.add("/".join(parts))
    return sorted(found)


_TESTBED = None


def testbed():
    """The review testbed with its default settings (deterministic; built once per process)."""
    global _TESTBED
    if _TESTBED is None:
        from rlhf_jax.data import synthetic
        _TESTBED = synthetic.Testbed()
    return _TESTBED


# ---------------------------------------------------------------------------------------------
# The registered sources
# ---------------------------------------------------------------------------------------------

@registry.register("data_source", "synthetic")
def synthetic_source() -> Source:
    """The review testbed: SFT reviews, prompts, Bradley-Terry pairs and ranked lists, scored by
    its known gold reward (docs/testbed.md)."""
    return _REVIEWS


_REVIEWS = ReviewTestbed()


@registry.register("data_source", "arithmetic", args={
    "digits": schema.Int(ge=1, le=arithmetic.MAX_DIGITS, doc="digits of each operand"),
    "noise": schema.Float(ge=0, le=1, doc="share of training demonstrations with a slip"),
    "task": schema.Choice(*arithmetic.TASKS, doc="sum two numbers, or copy one")})
def arithmetic_source(digits: int = 2, noise: float = 0.0, task: str = "add") -> Source:
    """The testbed's checkable task: sums of two numbers, each prompt with its answer for the
    exact_match reward (RL with verifiable rewards)."""
    return ArithmeticTestbed(digits, noise, task)


@registry.register("data_source", "tfds")
def tfds_source() -> Source:
    """A TFDS dataset prepared under data.data_dir, named by data.name (docs/data.md)."""
    return _TFDS


_TFDS = Tfds()


def get(spec: str) -> Source:
    """The source a `data.source` string names (a ConfigError listing the names if unknown)."""
    return registry.get("data_source", spec)()
