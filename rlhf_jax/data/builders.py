"""TFDS builders for the RLHF datasets, written as array_record and read without TensorFlow.

    builder = builders.prepare(builders.HhRlhfPairs, data_dir=D, manual_dir=M)
    source = builder.as_data_source(split="train")   # random access, TF-free
    source[0]  # {"prompt": b"...", "chosen": b"...", "rejected": b"...", ...}

Builders (TFDS names in brackets):

- `SyntheticTestbed` [rlhf_synthetic], configs "sft", "prompts", "pairs", "rankings": the
  testbed of `synthetic.py`, train and test splits (test prompts never occur in train).
- `ArithmeticTask` [rlhf_arithmetic], configs "sft", "prompts": the testbed's checkable task
  (`arithmetic.py`), each record with its `answer`; test prompts never occur in train.
- `HhRlhfPairs` [rlhf_hh_pairs]: Anthropic HH-RLHF jsonl(.gz) files placed in manual_dir.
- `TldrComparisons` [rlhf_tldr_comparisons]: OpenAI summarize-from-feedback comparison
  JSON-lines files placed in manual_dir.
- `ImdbPrompts` [rlhf_imdb_prompts]: review prefixes from the upstream aclImdb archive placed in
  manual_dir, or from a previously prepared catalog `imdb_reviews` (array_record) in data_dir.

All of them take `skip_invalid` (default False: the first bad record raises a `DataError` naming
file, record and field; so does a file that cannot be read) and `max_chars` (text fields longer
than this are bad records). What was skipped, and which files were not read, is in
`builder.info.metadata["skipped"]` and in `metadata.json` next to the data. See docs/data.md.

`prepare` is safe to call from several processes at once on one data_dir (e.g. the processes of
a multi-host run): one prepares while the others wait, then all read the same files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import inspect
import logging
import os
import re
import tarfile
import zlib

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from rlhf_jax.data import arithmetic, records
from rlhf_jax.data import synthetic
from rlhf_jax.data.records import DataError
from rlhf_jax.errors import ConfigError
# Re-exported: the HH transcript helpers belong with the HH builder's users.
from rlhf_jax.data.records import hh_to_messages, split_hh_conversation  # noqa: F401

DEFAULT_MAX_CHARS = 100_000
_VERSION = tfds.core.Version("1.0.0")


class _RlhfBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: array_record output, bad-record policy, skip counts in metadata."""

    VERSION = _VERSION

    # TFDS 4.9.10 resolves a package builder's source path through `importlib_resources`, which
    # current etils no longer installs; the file of the class is all TFDS needs from it.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """The file that defines the builder."""
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, skip_invalid: bool = False, max_chars: int | None = DEFAULT_MAX_CHARS,
                 file_format: str = "array_record", **kwargs):
        self.skip_invalid = skip_invalid
        self.max_chars = max_chars
        self.skip_log = records.SkipLog(skip_invalid=skip_invalid)
        super().__init__(file_format=file_format, **kwargs)

    # TFDS prints two bold lines per prepared dataset, with temporary paths and "Unknown size";
    # `prepare` prints one line of its own instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _features(self) -> dict:
        raise NotImplementedError

    def _manual_root(self, dl_manager) -> str:
        """The folder of raw files, or a DataError naming it when it is missing or empty."""
        try:
            return os.fspath(dl_manager.manual_dir)
        except AssertionError:
            # TFDS asserts, with a multi-line message, that the folder exists and is not empty.
            where = os.fspath(getattr(dl_manager, "_manual_dir", None) or "manual_dir")
            raise DataError(file=where, reason="no raw files here (missing or empty folder)",
                            fix=f"place the {self.name} files there (see docs/data.md) or pass "
                                f"manual_dir=") from None

    def _json_files(self, root: str) -> list[str]:
        """The JSON-lines files under root (relative paths); every other file is listed in the
        report as not read, never silently ignored."""
        paths, others = records.list_files(root, records.JSON_SUFFIXES)
        for path in others:
            self.skip_log.ignore(os.path.relpath(path, root))
        return [os.path.relpath(path, root) for path in paths]

    def _json_lines(self, root: str, rel: str):
        """(index, record) of one file, read whole first; a file that cannot be read raises,
        or with skip_invalid is recorded as a bad file and gives nothing."""
        try:
            return records.read_jsonl(os.path.join(root, rel), display_name=rel)
        except DataError as err:
            self.skip_log.bad_file(err)
            return []

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, description=(type(self).__doc__ or "").split("\n")[0],
            features=tfds.features.FeaturesDict(self._features()),
            metadata=tfds.core.MetadataDict())

    def _text(self, value, *, file, index, field, allow_empty=False):
        return records.check_text(value, file=file, index=index, field=field,
                                  max_chars=self.max_chars, allow_empty=allow_empty)

    def _finish(self, rows_by_split: dict, *, where: str) -> dict:
        """Records the skip summary in the metadata and returns the split generators."""
        self.info.metadata["skipped"] = self.skip_log.summary()
        rows_by_split = {k: v for k, v in rows_by_split.items() if v}
        if not rows_by_split:
            notes = [n for n in (self.skip_log.files_note(), self.skip_log.count and
                                 f"{records.plural(self.skip_log.count, 'bad record')} skipped")
                     if n]
            raise DataError(
                file=where, reason="no valid records found" + (
                    f" ({'; '.join(notes)})" if notes else ""),
                fix=f"place readable {self.name} files there (see docs/data.md)")
        return {split: self._generate_examples(rows) for split, rows in rows_by_split.items()}

    def _generate_examples(self, rows):
        for key, example in rows:
            yield key, example

    @property
    def skipped(self) -> dict:
        """{"skipped": n, "by_reason": {...}, "examples": [...], "filtered": {...}}."""
        return dict(self.info.metadata.get("skipped", {}))


# ---------------------------------------------------------------------------------------------
# Synthetic testbed
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """What to generate: kind in {"sft", "prompts", "pairs", "rankings"}, sizes, seed, labelling
    noise (tau, flip_rate) and list length k for rankings."""

    kind: str = "sft"
    n_train: int = 20_000
    n_test: int = 1_000
    seed: int = 0
    tau: float = 1.0
    flip_rate: float = 0.0
    k: int = 4


class SyntheticTestbed(_RlhfBuilder):
    """The synthetic review testbed: SFT reviews, prompts, preference pairs, ranked lists."""

    name = "rlhf_synthetic"
    BUILDER_CONFIGS = [
        SyntheticConfig(name="sft", kind="sft", n_train=20_000, n_test=1_000),
        SyntheticConfig(name="prompts", kind="prompts", n_train=4_000, n_test=500),
        SyntheticConfig(name="pairs", kind="pairs", n_train=10_000, n_test=1_000),
        SyntheticConfig(name="rankings", kind="rankings", n_train=2_000, n_test=200),
    ]

    def _features(self):
        text, f32 = tfds.features.Text(), np.float32
        kind = self.builder_config.kind
        if kind == "sft":
            return dict(prompt=text, completion=text, gold=tfds.features.Scalar(f32))
        if kind == "prompts":
            return dict(prompt=text, kind=text)
        if kind == "pairs":
            return dict(prompt=text, chosen=text, rejected=text,
                        gold_chosen=tfds.features.Scalar(f32),
                        gold_rejected=tfds.features.Scalar(f32))
        if kind == "rankings":
            return dict(prompt=text, responses=tfds.features.Sequence(tfds.features.Text()),
                        gold=tfds.features.Tensor(shape=(None,), dtype=f32))
        raise ValueError(f"unknown synthetic kind {kind!r}")

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        tb = synthetic.Testbed()
        splits, train_prompts = {}, set()
        for split, n, seed in (("train", cfg.n_train, cfg.seed),
                               ("test", cfg.n_test, cfg.seed + 1_000_003)):
            rows, attempt = [], 0
            while len(rows) < n:
                # Oversample, then drop test rows whose prompt occurs in train (held out).
                batch = self._make(tb, cfg, n - len(rows), seed + 7919 * attempt)
                attempt += 1
                for row in batch:
                    if split == "test" and row["prompt"] in train_prompts:
                        continue
                    rows.append((f"{split}-{len(rows)}", row))
            if split == "train":
                train_prompts = {r["prompt"] for _, r in rows}
            splits[split] = rows[:n]
        return self._finish(splits, where="synthetic")

    @staticmethod
    def _make(tb, cfg, n, seed):
        if cfg.kind == "sft":
            rows = tb.sft_examples(n, seed=seed)
            for r in rows:
                r["gold"] = np.float32(tb.gold_reward_text(r["prompt"], r["completion"]))
            return rows
        if cfg.kind == "prompts":
            return [dict(prompt=p.text, kind=p.kind) for p in tb.prompts(n, seed=seed)]
        if cfg.kind == "pairs":
            return tb.preference_pairs(n, seed=seed, tau=cfg.tau, flip_rate=cfg.flip_rate)
        rows = tb.ranked_lists(n, k=cfg.k, seed=seed, tau=cfg.tau)
        for r in rows:
            r["gold"] = np.asarray(r["gold"], np.float32)
        return rows


@dataclasses.dataclass(eq=False)
class ArithmeticConfig(tfds.core.BuilderConfig):
    """What to generate: kind "sft" (prompt, completion, answer) or "prompts" (prompt,
    answer), sizes, seed, the operands' number of digits, the share of noisy
    demonstrations in the training split (arithmetic.slip) and the task ("add" or "copy")."""

    kind: str = "sft"
    n_train: int = 5_000
    n_test: int = 500
    seed: int = 0
    digits: int = 2
    noise: float = 0.0
    task: str = "add"


class ArithmeticTask(_RlhfBuilder):
    """The testbed's checkable task: sums of two numbers, the answer in a field (arithmetic.py)."""

    name = "rlhf_arithmetic"
    BUILDER_CONFIGS = [ArithmeticConfig(name="sft", kind="sft"),
                       ArithmeticConfig(name="prompts", kind="prompts")]

    def _features(self):
        text = tfds.features.Text()
        if self.builder_config.kind == "sft":
            return dict(prompt=text, completion=text, answer=text)
        return dict(prompt=text, answer=text)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        # Test problems first, then training problems that avoid them: held out by prompt.
        test = arithmetic.examples(cfg.n_test, digits=cfg.digits, seed=cfg.seed + 1_000_003,
                                   task=cfg.task)
        train = arithmetic.examples(cfg.n_train, digits=cfg.digits, seed=cfg.seed,
                                    exclude=frozenset(r["prompt"] for r in test),
                                    noise=cfg.noise, task=cfg.task)
        keep = ("prompt", "completion", "answer") if cfg.kind == "sft" else ("prompt", "answer")
        splits = {split: [(f"{split}-{i}", {k: r[k] for k in keep}) for i, r in enumerate(rows)]
                  for split, rows in (("train", train), ("test", test))}
        return self._finish(splits, where="arithmetic")


# ---------------------------------------------------------------------------------------------
# Anthropic HH-RLHF
# ---------------------------------------------------------------------------------------------

class HhRlhfPairs(_RlhfBuilder):
    """Anthropic HH-RLHF preference pairs (Bai et al. 2022), from user-placed jsonl(.gz)."""

    name = "rlhf_hh_pairs"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Place the HH-RLHF files (https://github.com/anthropics/hh-rlhf), e.g.
    helpful-base/train.jsonl.gz and helpful-base/test.jsonl.gz, anywhere under manual_dir
    (.jsonl or .json, plain or compressed with gzip, bz2 or xz).
    Files whose name starts with "train" form the train split, "test" the test split.
    """

    def _features(self):
        text = tfds.features.Text()
        return dict(prompt=text, chosen=text, rejected=text, source=text)

    def _split_generators(self, dl_manager):
        root = self._manual_root(dl_manager)
        splits = {"train": [], "test": []}
        for rel in self._json_files(root):
            base = os.path.basename(rel)
            split = "train" if base.startswith("train") else (
                "test" if base.startswith("test") else None)
            if split is None:
                self.skip_log.filter(f"file {rel} is neither train* nor test*")
                continue
            for index, rec in self._json_lines(root, rel):
                try:
                    row = self._parse(rec, file=rel, index=index)
                except DataError as err:
                    self.skip_log.bad(err)
                    continue
                splits[split].append((f"{rel}:{index}", row))
        return self._finish(splits, where=root)

    def _parse(self, rec, *, file, index):
        if isinstance(rec, DataError):
            raise rec
        texts = {f: self._text(rec.get(f), file=file, index=index, field=f)
                 for f in ("chosen", "rejected")}
        parts = {}
        for f, t in texts.items():
            parts[f] = split_hh_conversation(t)
            if parts[f] is None:
                raise DataError(file=file, index=index, field=f, reason="no assistant turn")
            if not parts[f][1].strip():
                raise DataError(file=file, index=index, field=f,
                                reason="empty final assistant turn")
            if "\n\nHuman:" in parts[f][1]:
                raise DataError(file=file, index=index, field=f,
                                reason="the conversation ends with a human turn")
        if parts["chosen"][0] != parts["rejected"][0]:
            raise DataError(file=file, index=index, field="rejected",
                            reason="conversation differs from chosen before the final "
                                   "assistant turn")
        problem = records.hh_prompt_problem(parts["chosen"][0])
        if problem is not None:
            raise DataError(file=file, index=index, field="chosen", reason=problem)
        if parts["chosen"][1] == parts["rejected"][1]:
            raise DataError(file=file, index=index, field="rejected",
                            reason="identical to chosen")
        if records.same_up_to_whitespace(parts["chosen"][1], parts["rejected"][1]):
            raise DataError(file=file, index=index, field="rejected",
                            reason="identical to chosen up to whitespace")
        return dict(prompt=parts["chosen"][0], chosen=parts["chosen"][1],
                    rejected=parts["rejected"][1], source=file)


# ---------------------------------------------------------------------------------------------
# OpenAI summarize-from-feedback (TL;DR comparisons)
# ---------------------------------------------------------------------------------------------

TLDR_SPLITS = ("train", "valid1", "valid2")


def tldr_prompt(*, subreddit: str, title: str, post: str) -> str:
    """The query format of Stiennon et al. (2020) as used by Huang et al. (2024, "The N+
    implementation details of RLHF with PPO: a case study on TL;DR summarization")."""
    return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


class TldrComparisons(_RlhfBuilder):
    """Reddit TL;DR summary comparisons (Stiennon et al. 2020), from user-placed JSON lines."""

    name = "rlhf_tldr_comparisons"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Place the comparison files of https://github.com/openai/summarize-from-feedback
    (comparisons/batch*.json, JSON lines; also .jsonl, plain or compressed with gzip, bz2 or
    xz) anywhere under manual_dir. Each record's "split"
    field (train, valid1, valid2) picks its split; CNN/DM records (info.article, no info.post)
    are left out and counted under "filtered".
    """

    def _features(self):
        text = tfds.features.Text()
        return dict(prompt=text, chosen=text, rejected=text, id=text, source=text)

    def _split_generators(self, dl_manager):
        root = self._manual_root(dl_manager)
        splits = {s: [] for s in TLDR_SPLITS}
        for rel in self._json_files(root):
            for index, rec in self._json_lines(root, rel):
                try:
                    parsed = self._parse(rec, file=rel, index=index)
                except DataError as err:
                    self.skip_log.bad(err)
                    continue
                if parsed is not None:
                    split, row = parsed
                    splits[split].append((f"{rel}:{index}", row))
        return self._finish(splits, where=root)

    def _parse(self, rec, *, file, index):
        if isinstance(rec, DataError):
            raise rec
        get = lambda path: records.get_field(rec, path, file=file, index=index)  # noqa: E731
        info = get("info")
        if isinstance(info, dict) and info.get("post") is None and "article" in info:
            self.skip_log.filter("cnn/dm record (info.article)")
            return None
        split = get("split")
        if not isinstance(split, str) or split not in TLDR_SPLITS:
            raise DataError(file=file, index=index, field="split",
                            reason=f"{records.short(split)} is not one of {TLDR_SPLITS}")
        post = self._text(get("info.post"), file=file, index=index, field="info.post")
        title = self._text(get("info.title"), file=file, index=index, field="info.title")
        sub = self._text(get("info.subreddit"), file=file, index=index,
                         field="info.subreddit")
        summaries = [self._text(get(f"summaries[{i}].text"), file=file, index=index,
                                field=f"summaries[{i}].text").strip() for i in (0, 1)]
        choice = get("choice")
        # Only the integers 0 and 1, as upstream writes them: a float or a bool label (1.0,
        # true) comes from some other producer, and guessing what it meant could swap pairs.
        if type(choice) is not int or choice not in (0, 1):
            raise DataError(file=file, index=index, field="choice",
                            reason=f"expected 0 or 1 (an integer), got {records.short(choice)} "
                                   f"({type(choice).__name__})")
        if summaries[0] == summaries[1]:
            raise DataError(file=file, index=index, field="summaries[1].text",
                            reason="identical to summaries[0].text")
        # A leading space: the summary continues "TL;DR:" as one text.
        return split, dict(prompt=tldr_prompt(subreddit=sub, title=title, post=post),
                           chosen=" " + summaries[choice], rejected=" " + summaries[1 - choice],
                           id=str(info.get("id", "")), source=file)


# ---------------------------------------------------------------------------------------------
# IMDb prompts
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class ImdbConfig(tfds.core.BuilderConfig):
    """source: "archive" (aclImdb_v1.tar.gz or an extracted aclImdb/ in manual_dir) or "catalog"
    (a prepared TFDS `imdb_reviews` in array_record format under catalog_data_dir, default the
    builder's data_dir). Prompts are the first n words of a review, n in prompt_words chosen
    per review by a hash of its id (deterministic)."""

    source: str = "archive"
    catalog_data_dir: str | None = None
    prompt_words: tuple[int, int] = (2, 8)


_IMDB_MEMBER = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg|unsup)/(\d+)_(\d+)\.txt$")
_IMDB_SPLIT = {("train", "pos"): "train", ("train", "neg"): "train", ("test", "pos"): "test",
               ("test", "neg"): "test", ("train", "unsup"): "unsupervised"}
_IMDB_LABEL = {"neg": 0, "pos": 1, "unsup": -1}


class ImdbPrompts(_RlhfBuilder):
    """IMDb review prefixes as RL prompts (Maas et al. 2011; the sentiment task of Ziegler et al.
    2019), with the full review and its label."""

    name = "rlhf_imdb_prompts"
    BUILDER_CONFIGS = [ImdbConfig(name="archive", source="archive"),
                       ImdbConfig(name="catalog", source="catalog")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Place aclImdb_v1.tar.gz (http://ai.stanford.edu/~amaas/data/sentiment/) or its extracted
    aclImdb/ directory in manual_dir. Or use config "catalog" with a TFDS imdb_reviews that was
    prepared with file_format="array_record".
    """

    def _features(self):
        text = tfds.features.Text()
        return dict(prompt=text, text=text, label=tfds.features.Scalar(np.int32), id=text)

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        if cfg.source == "catalog":
            reviews, where = self._from_catalog(cfg), "imdb_reviews"
        else:
            root = self._manual_root(dl_manager)
            reviews, where = self._from_archive(root), root
        splits = {"train": [], "test": [], "unsupervised": []}
        for split, ident, file, index, raw, label in reviews:
            try:
                text = self._decode(raw, file=file, index=index)
            except DataError as err:
                self.skip_log.bad(err)
                continue
            words = text.split()
            lo, hi = cfg.prompt_words
            n = lo + zlib.crc32(ident.encode()) % (hi - lo + 1)
            splits[split].append((ident, dict(prompt=" ".join(words[:n]), text=text,
                                              label=np.int32(label), id=ident)))
        return self._finish(splits, where=where)

    def _decode(self, raw: bytes, *, file, index) -> str:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(file=file, index=index, field="text",
                            reason="undecodable text (invalid UTF-8)") from None
        # The upstream files mark paragraphs with HTML line breaks.
        text = re.sub(r"<br\s*/?>", " ", text).strip()
        return self._text(text, file=file, index=index, field="text")

    ARCHIVE = "aclImdb_v1.tar.gz"

    def _from_archive(self, root):
        """The reviews of the archive in `root`, else of an extracted aclImdb/ under it; every
        other file is listed as not read."""
        archive = os.path.join(root, self.ARCHIVE)
        if os.path.exists(archive):
            for path in records.list_files(root, ())[1]:
                if path != archive:
                    self.skip_log.ignore(os.path.relpath(path, root))
            try:
                reviews = self._read_archive(archive)
            except records.READ_ERRORS as e:
                # The whole archive is read before any review is used, so a damaged one adds
                # none, wherever the damage is.
                self.skip_log.bad_file(records.unreadable(archive, e, name=self.ARCHIVE))
                reviews = []
            yield from reviews
            return
        texts, others = records.list_files(root, (".txt",))
        extracted = [p for p in texts if _IMDB_MEMBER.search(p.replace(os.sep, "/"))]
        if not extracted:
            raise DataError(file=root, reason=f"neither {self.ARCHIVE} nor an extracted "
                                              "aclImdb/ directory found",
                            fix=f"place {self.ARCHIVE} (or its extracted aclImdb/) there, see "
                                "docs/data.md")
        for path in sorted(set(texts) - set(extracted)) + others:
            self.skip_log.ignore(os.path.relpath(path, root))
        for path in extracted:
            m = _IMDB_MEMBER.search(path.replace(os.sep, "/"))
            rel = os.path.relpath(path, root)
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError as e:
                self.skip_log.bad_file(records.unreadable(path, e, name=rel))
                continue
            ident = "aclImdb/" + path.replace(os.sep, "/").split("aclImdb/", 1)[1]
            yield (_IMDB_SPLIT[(m.group(1), m.group(2))], ident, path, int(m.group(3)), raw,
                   _IMDB_LABEL[m.group(2)])

    def _read_archive(self, archive):
        reviews = []
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                m = _IMDB_MEMBER.search(member.name)
                if not m:
                    self.skip_log.ignore(f"{self.ARCHIVE}:{member.name}")
                    continue
                split = _IMDB_SPLIT[(m.group(1), m.group(2))]
                raw = tar.extractfile(member).read()
                reviews.append((split, member.name, f"{self.ARCHIVE}:{member.name}",
                                int(m.group(3)), raw, _IMDB_LABEL[m.group(2)]))
        return reviews

    def _from_catalog(self, cfg):
        base = cfg.catalog_data_dir or os.fspath(self._data_dir_root)
        infos = sorted(glob.glob(os.path.join(base, "imdb_reviews", "*", "*",
                                              "dataset_info.json")))
        if not infos:
            raise DataError(file=os.path.join(base, "imdb_reviews"),
                            reason="no prepared imdb_reviews dataset found",
                            fix="prepare imdb_reviews with file_format='array_record' there, "
                                "set ImdbConfig(catalog_data_dir=...), or use the 'archive' "
                                "config")
        # The highest version, read straight from its directory: no catalog code, no TF.
        path = max((os.path.dirname(p) for p in infos),
                   key=lambda d: tuple(int(x) for x in os.path.basename(d).split(".")))
        catalog = tfds.builder_from_directory(path)
        fmt = catalog.info.file_format
        if fmt is not None and getattr(fmt, "value", fmt) != "array_record":
            raise DataError(file=path,
                            reason=f"prepared as {getattr(fmt, 'value', fmt)}, which only "
                                   f"TensorFlow reads",
                            fix="prepare imdb_reviews with file_format='array_record' or use "
                                "the 'archive' config")
        for split in catalog.info.splits:
            ours = {"train": "train", "test": "test", "unsupervised": "unsupervised"}.get(split)
            if ours is None:
                continue
            source = catalog.as_data_source(split=split)
            for index in range(len(source)):
                ex = source[index]
                label = int(ex["label"]) if ours != "unsupervised" else -1
                yield (ours, f"imdb_reviews/{split}/{index}", f"{path} ({split})", index,
                       ex["text"], label)


# ---------------------------------------------------------------------------------------------
# Convenience
# ---------------------------------------------------------------------------------------------

BUILDERS = {b.name: b for b in (SyntheticTestbed, ArithmeticTask, HhRlhfPairs,
                                 TldrComparisons, ImdbPrompts)}


def prepare(builder: str | type, *, data_dir: str, config=None, manual_dir: str | None = None,
            skip_invalid: bool = False, max_chars: int | None = DEFAULT_MAX_CHARS,
            overwrite: bool = False):
    """Builds (once) and returns a prepared builder; read it with `builder.as_data_source()`.

    builder: a class above or its TFDS name. config: a config name or config object.
    manual_dir: where the user placed the raw files (HH-RLHF, TL;DR, IMDb archive).
    overwrite: rebuild even if a prepared copy exists (after changing the raw files).
    Nothing is downloaded. Prints one line when it prepares a dataset, nothing when the
    dataset was already prepared. Processes preparing the same data_dir take turns (a file
    lock), so the first prepares and the others then find the prepared dataset.
    """
    if isinstance(builder, str):
        if builder not in BUILDERS:
            raise ConfigError(f"unknown dataset builder {builder!r}; choose one of "
                              f"{sorted(BUILDERS)}")
        cls = BUILDERS[builder]
    else:
        cls = builder
    data_dir = os.fspath(data_dir)
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    with _exclusive(data_dir, cls.name), quiet_tfds():
        # Built under the lock: a builder reads the prepared dataset's info when it is made,
        # so one made before another process finished preparing would not see it.
        b = cls(data_dir=data_dir, config=config, skip_invalid=skip_invalid,
                max_chars=max_chars)
        fresh = overwrite or not b.is_prepared()
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, download_mode=mode))
    if fresh:
        print(_prepared_line(b, data_dir), flush=True)
    return b


def _prepared_line(b, data_dir: str) -> str:
    """"data: prepared rlhf_synthetic/pairs (train 20000, test 1000) in runs/x/data", plus
    what was skipped or not read."""
    name = b.name if b.builder_config is None else f"{b.name}/{b.builder_config.name}"
    sizes = ", ".join(f"{split} {info.num_examples}" for split, info in b.info.splits.items())
    line = f"data: prepared {name} ({sizes}) in {data_dir}"
    skipped = b.skipped
    notes = []
    if skipped.get("skipped"):
        notes.append(f"{records.plural(skipped['skipped'], 'bad record')} skipped")
    if skipped.get("bad_files"):
        notes.append(f"{records.plural(len(skipped['bad_files']), 'damaged file')} skipped")
    if skipped.get("ignored_files_count"):
        notes.append(f"{records.plural(skipped['ignored_files_count'], 'file')} not read")
    return line + (f"; {', '.join(notes)} (see builder.skipped)" if notes else "")


@contextlib.contextmanager
def _exclusive(data_dir: str, name: str):
    """Holds an exclusive lock on `data_dir/.{name}.lock` while preparing `name`.

    Processes that prepare the same dataset in the same data_dir (the processes of a
    multi-host run sharing a workdir) would otherwise both generate it and race to rename
    their copy into place. flock needs no jax.distributed, and the kernel releases it when
    its holder exits or crashes, so no stale lock is ever left behind. One lock per builder
    (not per config): configs of a builder share the builder's folder, where TFDS also writes
    a file. Remote data_dirs (gs://...) have no flock; prepare those from one process.
    """
    if "://" in data_dir:
        yield
        return
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _TfdsChatter(logging.Filter):
    """Drops TFDS's info and warning records ("Using custom data configuration: ..." for every
    builder config made here, "Reusing dataset ..."); errors still show."""

    def filter(self, record):
        return record.levelno >= logging.ERROR or "tensorflow_datasets" not in record.pathname


@contextlib.contextmanager
def quiet_tfds():
    """No TFDS progress bars (they show temporary paths and flash by for small datasets) and
    no TFDS chatter on the absl logger, while preparing; both are restored afterwards."""
    from tensorflow_datasets.core.utils import tqdm_utils
    bars = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    absl_logger, chatter = logging.getLogger("absl"), _TfdsChatter()
    absl_logger.addFilter(chatter)
    try:
        yield
    finally:
        absl_logger.removeFilter(chatter)
        tfds.display_progress_bar(bars)
