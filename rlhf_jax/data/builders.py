"""TFDS builders for the RLHF datasets, written as array_record and read without TensorFlow.

    builder = builders.prepare(builders.HhRlhfPairs, data_dir=D, manual_dir=M)
    source = builder.as_data_source(split="train")   # random access, TF-free
    source[0]  # {"prompt": b"...", "chosen": b"...", "rejected": b"...", ...}

Builders (TFDS names in brackets):

- `SyntheticTestbed` [rlhf_synthetic], configs "sft", "prompts", "pairs", "rankings": the
  testbed of `synthetic.py`, train and test splits (test prompts never occur in train).
- `HhRlhfPairs` [rlhf_hh_pairs]: Anthropic HH-RLHF jsonl(.gz) files placed in manual_dir.
- `TldrComparisons` [rlhf_tldr_comparisons]: OpenAI summarize-from-feedback comparison
  JSON-lines files placed in manual_dir.
- `ImdbPrompts` [rlhf_imdb_prompts]: review prefixes from the upstream aclImdb archive placed in
  manual_dir, or from a previously prepared catalog `imdb_reviews` (array_record) in data_dir.

All of them take `skip_invalid` (default False: the first bad record raises a `DataError` naming
file, record and field) and `max_chars` (text fields longer than this are bad records). What was
skipped is in `builder.info.metadata["skipped"]` and in `metadata.json` next to the data.
See docs/data.md.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import os
import re
import tarfile
import zlib

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from rlhf_jax.data import records
from rlhf_jax.data import synthetic
from rlhf_jax.data.records import DataError
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

    def _features(self) -> dict:
        raise NotImplementedError

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
            raise DataError(file=where, index=None, field="<files>",
                            reason="no valid records found")
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


# ---------------------------------------------------------------------------------------------
# Anthropic HH-RLHF
# ---------------------------------------------------------------------------------------------

class HhRlhfPairs(_RlhfBuilder):
    """Anthropic HH-RLHF preference pairs (Bai et al. 2022), from user-placed jsonl(.gz)."""

    name = "rlhf_hh_pairs"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Place the HH-RLHF files (https://github.com/anthropics/hh-rlhf), e.g.
    helpful-base/train.jsonl.gz and helpful-base/test.jsonl.gz, anywhere under manual_dir.
    Files whose name starts with "train" form the train split, "test" the test split.
    """

    def _features(self):
        text = tfds.features.Text()
        return dict(prompt=text, chosen=text, rejected=text, source=text)

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        splits = {"train": [], "test": []}
        for path in records.find_files(root, (".jsonl", ".jsonl.gz", ".json", ".json.gz")):
            rel = os.path.relpath(path, root)
            base = os.path.basename(path)
            split = "train" if base.startswith("train") else (
                "test" if base.startswith("test") else None)
            if split is None:
                self.skip_log.filter(f"file {rel} is neither train* nor test*")
                continue
            for index, rec in records.read_jsonl(path, display_name=rel):
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
        if parts["chosen"][1] == parts["rejected"][1]:
            raise DataError(file=file, index=index, field="rejected",
                            reason="identical to chosen")
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
    (comparisons/batch*.json, JSON lines) anywhere under manual_dir. Each record's "split"
    field (train, valid1, valid2) picks its split; CNN/DM records (info.article, no info.post)
    are left out and counted under "filtered".
    """

    def _features(self):
        text = tfds.features.Text()
        return dict(prompt=text, chosen=text, rejected=text, id=text, source=text)

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        splits = {s: [] for s in TLDR_SPLITS}
        for path in records.find_files(root, (".json", ".jsonl", ".json.gz", ".jsonl.gz")):
            rel = os.path.relpath(path, root)
            for index, rec in records.read_jsonl(path, display_name=rel):
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
        if split not in TLDR_SPLITS:
            raise DataError(file=file, index=index, field="split",
                            reason=f"{split!r} is not one of {TLDR_SPLITS}")
        post = self._text(get("info.post"), file=file, index=index, field="info.post")
        title = self._text(get("info.title"), file=file, index=index, field="info.title")
        sub = self._text(get("info.subreddit"), file=file, index=index,
                         field="info.subreddit")
        summaries = [self._text(get(f"summaries[{i}].text"), file=file, index=index,
                                field=f"summaries[{i}].text").strip() for i in (0, 1)]
        choice = get("choice")
        if isinstance(choice, bool) or choice not in (0, 1):
            raise DataError(file=file, index=index, field="choice",
                            reason=f"expected 0 or 1, got {choice!r}")
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
            root = os.fspath(dl_manager.manual_dir)
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

    @staticmethod
    def _from_archive(root):
        archive = os.path.join(root, "aclImdb_v1.tar.gz")
        if os.path.exists(archive):
            with tarfile.open(archive, "r:*") as tar:
                for member in tar:
                    m = _IMDB_MEMBER.search(member.name)
                    if not member.isfile() or not m:
                        continue
                    split = _IMDB_SPLIT[(m.group(1), m.group(2))]
                    raw = tar.extractfile(member).read()
                    yield (split, member.name, f"aclImdb_v1.tar.gz:{member.name}",
                           int(m.group(3)), raw, _IMDB_LABEL[m.group(2)])
            return
        extracted = sorted(glob.glob(os.path.join(root, "**", "aclImdb", "*", "*", "*.txt"),
                                     recursive=True))
        if not extracted:
            raise DataError(file=root, index=None, field="<files>",
                            reason="neither aclImdb_v1.tar.gz nor an aclImdb/ directory found")
        for path in extracted:
            m = _IMDB_MEMBER.search(path.replace(os.sep, "/"))
            if not m:
                continue
            with open(path, "rb") as f:
                raw = f.read()
            ident = "aclImdb/" + path.replace(os.sep, "/").split("aclImdb/", 1)[1]
            yield (_IMDB_SPLIT[(m.group(1), m.group(2))], ident, path, int(m.group(3)), raw,
                   _IMDB_LABEL[m.group(2)])

    def _from_catalog(self, cfg):
        base = cfg.catalog_data_dir or os.fspath(self._data_dir_root)
        infos = sorted(glob.glob(os.path.join(base, "imdb_reviews", "*", "*",
                                              "dataset_info.json")))
        if not infos:
            raise DataError(file=os.path.join(base, "imdb_reviews"), index=None, field="<files>",
                            reason="no prepared imdb_reviews dataset found")
        # The highest version, read straight from its directory: no catalog code, no TF.
        path = max((os.path.dirname(p) for p in infos),
                   key=lambda d: tuple(int(x) for x in os.path.basename(d).split(".")))
        catalog = tfds.builder_from_directory(path)
        fmt = catalog.info.file_format
        if fmt is not None and getattr(fmt, "value", fmt) != "array_record":
            raise DataError(file=path, index=None, field="<files>",
                            reason=f"prepared as {getattr(fmt, 'value', fmt)}, which only "
                                   f"TensorFlow reads; prepare imdb_reviews with "
                                   f"file_format='array_record' or use the 'archive' config")
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

BUILDERS = {b.name: b for b in (SyntheticTestbed, HhRlhfPairs, TldrComparisons, ImdbPrompts)}


def prepare(builder: str | type, *, data_dir: str, config=None, manual_dir: str | None = None,
            skip_invalid: bool = False, max_chars: int | None = DEFAULT_MAX_CHARS,
            overwrite: bool = False):
    """Builds (once) and returns a prepared builder; read it with `builder.as_data_source()`.

    builder: a class above or its TFDS name. config: a config name or config object.
    manual_dir: where the user placed the raw files (HH-RLHF, TL;DR, IMDb archive).
    overwrite: rebuild even if a prepared copy exists (after changing the raw files).
    Nothing is downloaded.
    """
    cls = BUILDERS[builder] if isinstance(builder, str) else builder
    b = cls(data_dir=data_dir, config=config, skip_invalid=skip_invalid, max_chars=max_chars)
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, download_mode=mode))
    return b
