"""TFDS builders on fixtures in the real upstream formats, TF-free reading, and bad input."""

import bz2
import dataclasses
import gzip
import io
import json
import logging
import lzma
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data import builders
from rlhf_jax.data.records import DataError

tfds.display_progress_bar(False)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Fixture writers (real formats)
# ---------------------------------------------------------------------------------------------

def hh(*turns):
    """("Human", "hi"), ("Assistant", "hello") -> the HH-RLHF transcript string."""
    return "".join(f"\n\n{role}: {text}" for role, text in turns)


HH_GOOD = [
    {"chosen": hh(("Human", "What is a good name for a cat?"), ("Assistant", "Whiskers.")),
     "rejected": hh(("Human", "What is a good name for a cat?"), ("Assistant", "Dog."))},
    {"chosen": hh(("Human", "Hi"), ("Assistant", "Hello, how can I help?"),
                  ("Human", "Tell me a joke"), ("Assistant", "Why did the chicken cross?")),
     "rejected": hh(("Human", "Hi"), ("Assistant", "Hello, how can I help?"),
                    ("Human", "Tell me a joke"), ("Assistant", "No."))},
]


def write_jsonl_gz(path, rows, raw_lines=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wb") as f:
        for r in rows:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")


def write_hh(root, train_rows, test_rows=HH_GOOD[:1], raw_lines=()):
    write_jsonl_gz(os.path.join(root, "helpful-base", "train.jsonl.gz"), train_rows, raw_lines)
    write_jsonl_gz(os.path.join(root, "helpful-base", "test.jsonl.gz"), test_rows)


def tldr(split="train", choice=0, post="My cat ignores me. What should I do?",
         texts=("cat ignores me, help", "pets are hard")):
    return {"info": {"id": "t3_abc", "post": post, "title": "Cat problems",
                     "subreddit": "relationships", "site": "reddit"},
            "summaries": [{"text": texts[0], "policy": "ref", "note": None},
                          {"text": texts[1], "policy": "sup2", "note": None}],
            "choice": choice, "worker": "w1", "batch": "batch3", "split": split,
            "extra": {"confidence": 7}}


def write_tldr(root, rows, name="batch3.json"):
    os.makedirs(os.path.join(root, "comparisons"), exist_ok=True)
    with open(os.path.join(root, "comparisons", name), "wb") as f:
        for r in rows:
            f.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")


IMDB_FILES = {
    "aclImdb/train/pos/0_9.txt": b"A wonderful film.<br /><br />I loved every minute of it.",
    "aclImdb/train/neg/1_2.txt": b"Awful movie, really bad acting and a dull plot.",
    "aclImdb/test/pos/2_10.txt": b"Best film of the year, truly great.",
    "aclImdb/test/neg/3_1.txt": b"Terrible. Just terrible from start to finish.",
    "aclImdb/train/unsup/4_0.txt": b"Saw this last week with some friends at home.",
    "aclImdb/README": b"not a review",
}


def write_imdb_archive(root, files=IMDB_FILES):
    os.makedirs(root, exist_ok=True)
    with tarfile.open(os.path.join(root, "aclImdb_v1.tar.gz"), "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def text(x):
    return x.decode() if isinstance(x, bytes) else x


# ---------------------------------------------------------------------------------------------
# Builders on good fixtures
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sft", "prompts", "pairs", "rankings"])
def test_synthetic_builder(tmp_path, kind):
    cfg = builders.SyntheticConfig(name=f"{kind}_tiny", kind=kind, n_train=40, n_test=12, k=3)
    b = builders.prepare(builders.SyntheticTestbed, data_dir=str(tmp_path), config=cfg)
    src = b.as_data_source()
    assert (len(src["train"]), len(src["test"])) == (40, 12)
    train_prompts = {text(src["train"][i]["prompt"]) for i in range(40)}
    assert not train_prompts & {text(src["test"][i]["prompt"]) for i in range(12)}
    ex = src["train"][0]
    if kind == "pairs":
        assert ex["chosen"] != ex["rejected"]
        assert np.isfinite(ex["gold_chosen"]) and np.isfinite(ex["gold_rejected"])
    if kind == "rankings":
        assert len(ex["responses"]) == 3 and ex["gold"].shape == (3,)
    # Same config, fresh data dir: identical bytes.
    b2 = builders.prepare(builders.SyntheticTestbed, data_dir=str(tmp_path / "again"),
                          config=cfg)
    assert b2.as_data_source(split="train")[5] .keys() == ex.keys()
    assert str(b2.as_data_source(split="train")[5]) == str(src["train"][5])
    if kind in ("sft", "pairs", "prompts"):
        # The iterator reads an array_record source a batch at a time (__getitems__) in a
        # background thread; the batches equal those of the same records read one by one from
        # a list in the caller's thread.
        from rlhf_jax.data import batching
        from rlhf_jax.trainers import common
        tok = common.testbed().tokenizer
        config = batching.BatchConfig(batch_size=8, buckets=(36,), max_prompt_len=12)
        as_list = [src["train"][i] for i in range(40)]
        fast = batching.make_iterator(src["train"], kind=kind, tokenizer=tok, config=config)
        slow = batching.make_iterator(as_list, kind=kind, tokenizer=tok,
                                      config=dataclasses.replace(config, prefetch=0))
        for _ in range(6):   # past the first epoch's end
            a, b = next(fast), next(slow)
            assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_hh_rlhf_builder(tmp_path):
    write_hh(str(tmp_path / "manual"), HH_GOOD)
    b = builders.prepare("rlhf_hh_pairs", data_dir=str(tmp_path / "data"),
                         manual_dir=str(tmp_path / "manual"))
    src = b.as_data_source()
    assert (len(src["train"]), len(src["test"])) == (2, 1)
    rows = sorted((src["train"][i] for i in range(2)), key=lambda r: len(r["prompt"]))
    assert text(rows[0]["prompt"]) == "\n\nHuman: What is a good name for a cat?\n\nAssistant:"
    assert (text(rows[0]["chosen"]), text(rows[0]["rejected"])) == ("Whiskers.", "Dog.")
    # Multi-turn: the shared conversation is the prompt, only the final turns differ.
    assert text(rows[1]["prompt"]).endswith("Tell me a joke\n\nAssistant:")
    assert text(rows[1]["prompt"]).count("\n\nAssistant:") == 2
    assert builders.hh_to_messages(text(rows[1]["prompt"])) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Tell me a joke"}]
    assert text(rows[1]["source"]) == os.path.join("helpful-base", "train.jsonl.gz")
    assert b.skipped["skipped"] == 0


def test_tldr_builder(tmp_path):
    cnndm = {"info": {"id": "cnn1", "article": "Some news.", "site": "cnn"},
             "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0, "split": "valid2"}
    write_tldr(str(tmp_path / "manual"), [tldr(choice=1), tldr(split="valid1"), cnndm])
    b = builders.prepare(builders.TldrComparisons, data_dir=str(tmp_path / "data"),
                         manual_dir=str(tmp_path / "manual"))
    src = b.as_data_source()
    assert sorted(src) == ["train", "valid1"]
    ex = src["train"][0]
    assert text(ex["prompt"]) == ("SUBREDDIT: r/relationships\n\nTITLE: Cat problems\n\n"
                                  "POST: My cat ignores me. What should I do?\n\nTL;DR:")
    assert (text(ex["chosen"]), text(ex["rejected"])) == (" pets are hard",
                                                          " cat ignores me, help")
    assert text(src["valid1"][0]["chosen"]) == " cat ignores me, help"
    assert b.skipped["filtered"] == {"cnn/dm record (info.article)": 1}


def test_imdb_builder_from_archive(tmp_path):
    write_imdb_archive(str(tmp_path / "manual"))
    b = builders.prepare(builders.ImdbPrompts, data_dir=str(tmp_path / "data"),
                         config="archive", manual_dir=str(tmp_path / "manual"))
    src = b.as_data_source()
    assert {k: len(v) for k, v in src.items()} == {"train": 2, "test": 2, "unsupervised": 1}
    by_id = {text(src["train"][i]["id"]): src["train"][i] for i in range(2)}
    pos = by_id["aclImdb/train/pos/0_9.txt"]
    assert int(pos["label"]) == 1
    assert "<br" not in text(pos["text"])
    prompt = text(pos["prompt"]).split()
    assert 2 <= len(prompt) <= 8 and text(pos["text"]).split()[:len(prompt)] == prompt
    assert int(src["unsupervised"][0]["label"]) == -1


def test_imdb_builder_from_extracted_directory(tmp_path):
    for name, data in IMDB_FILES.items():
        path = tmp_path / "manual" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    b = builders.prepare(builders.ImdbPrompts, data_dir=str(tmp_path / "data"),
                         config="archive", manual_dir=str(tmp_path / "manual"))
    assert len(b.as_data_source(split="test")) == 2


class _PreparedImdbReviews(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes what a prepared catalog `imdb_reviews` looks like on disk (same name, config,
    version and features), standing in for the user's previously prepared copy."""

    name = "imdb_reviews"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="plain_text")]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=["neg", "pos"])}),
            supervised_keys=("text", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples([("great fun film to watch", 1), ("so dull", 0)]),
                "test": self._generate_examples([("an ok movie overall really", 1)])}

    def _generate_examples(self, rows):
        for i, (t, label) in enumerate(rows):
            yield i, {"text": t, "label": label}


def test_imdb_builder_from_prepared_catalog(tmp_path):
    _PreparedImdbReviews(data_dir=str(tmp_path / "data"),
                         file_format="array_record").download_and_prepare()
    b = builders.prepare(builders.ImdbPrompts, data_dir=str(tmp_path / "data"),
                         config="catalog")
    src = b.as_data_source()
    assert (len(src["train"]), len(src["test"])) == (2, 1)
    labels = sorted(int(src["train"][i]["label"]) for i in range(2))
    assert labels == [0, 1]


def test_imdb_catalog_in_tfrecord_format_is_explained(tmp_path):
    _PreparedImdbReviews(data_dir=str(tmp_path / "data"),
                         file_format="array_record").download_and_prepare()
    # Writing TFRecord needs TF, so relabel the prepared copy as the catalog's default format.
    (info_path,) = (tmp_path / "data" / "imdb_reviews").glob("*/*/dataset_info.json")
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(DataError, match="prepared as tfrecord, which only TensorFlow reads"):
        builders.prepare(builders.ImdbPrompts, data_dir=str(tmp_path / "data"),
                         config="catalog")


def test_reading_needs_no_tensorflow(tmp_path):
    """Build and read with `import tensorflow` made impossible, in a fresh process."""
    write_hh(str(tmp_path / "manual"), HH_GOOD)
    code = f"""
import sys

class HideTensorFlow:
    # Wraps an import finder so that TensorFlow looks uninstalled, even where it is.
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [HideTensorFlow(f) for f in sys.meta_path]
import tensorflow_datasets as tfds
tfds.display_progress_bar(False)
from rlhf_jax.data import builders
b = builders.prepare("rlhf_hh_pairs", data_dir={str(tmp_path / 'data')!r},
                     manual_dir={str(tmp_path / 'manual')!r})
c = builders.prepare(builders.SyntheticTestbed, data_dir={str(tmp_path / 'data')!r},
                     config=builders.SyntheticConfig(name="p", kind="pairs", n_train=5, n_test=2))
src = tfds.data_source("rlhf_hh_pairs", data_dir={str(tmp_path / 'data')!r}, download=False)
assert "tensorflow" not in sys.modules
print(len(src["train"]), len(c.as_data_source(split="train")), src["train"][0]["prompt"][:8])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "2 5 b'\\n\\nHuman:'"


# ---------------------------------------------------------------------------------------------
# Bad input: an error naming file, record and field, or a count with skip_invalid=True
# ---------------------------------------------------------------------------------------------

Q = ("Human", "question?")
BAD_HH = [
    ("missing", {"chosen": hh(Q, ("Assistant", "a"))}, "rejected", "missing"),
    ("empty", {"chosen": "  ", "rejected": hh(Q, ("Assistant", "b"))}, "chosen", "empty"),
    ("identical",
     {"chosen": hh(Q, ("Assistant", "same")), "rejected": hh(Q, ("Assistant", "same"))},
     "rejected", "identical"),
    ("prefix", {"chosen": hh(Q, ("Assistant", "a")), "rejected": hh(("Human", "other"),
                                                                     ("Assistant", "b"))},
     "rejected", "differs"),
    ("no_assistant", {"chosen": hh(Q), "rejected": hh(Q, ("Assistant", "b"))}, "chosen",
     "no assistant"),
    ("empty_turn", {"chosen": hh(Q, ("Assistant", "")), "rejected": hh(Q, ("Assistant", "b"))},
     "chosen", "empty final"),
    ("ends_with_human", {"chosen": hh(Q, ("Assistant", "a"), ("Human", "more?")),
                         "rejected": hh(Q, ("Assistant", "b"))}, "chosen", "ends with a human"),
    ("too_long", {"chosen": hh(Q, ("Assistant", "x" * 500)), "rejected": hh(Q, ("Assistant", "b"))},
     "chosen", "longer than the limit"),
    # Responses that differ only in spacing carry no preference (docs/data.md, "Bad input").
    ("whitespace_only", {"chosen": hh(Q, ("Assistant", "Same answer.")),
                         "rejected": hh(Q, ("Assistant", "Same  answer.\n"))},
     "rejected", "identical to chosen up to whitespace"),
    # A response to nothing: no human turn, or a human turn without text.
    ("no_human", {"chosen": hh(("Assistant", "a")), "rejected": hh(("Assistant", "b"))},
     "chosen", "no human turn"),
    ("empty_human", {"chosen": hh(("Human", " "), ("Assistant", "a")),
                     "rejected": hh(("Human", " "), ("Assistant", "b"))}, "chosen",
     "empty human turn"),
    ("empty_earlier_human",
     {"chosen": hh(("Human", ""), ("Assistant", "hi"), Q, ("Assistant", "a")),
      "rejected": hh(("Human", ""), ("Assistant", "hi"), Q, ("Assistant", "b"))},
     "chosen", "empty human turn"),
]


@pytest.mark.parametrize("case,record,field,reason", BAD_HH, ids=[c[0] for c in BAD_HH])
def test_hh_bad_record_raises_with_location(tmp_path, case, record, field, reason):
    write_hh(str(tmp_path / "manual"), HH_GOOD + [record])
    with pytest.raises(DataError) as err:
        builders.prepare(builders.HhRlhfPairs, data_dir=str(tmp_path / "data"),
                         manual_dir=str(tmp_path / "manual"), max_chars=300)
    e = err.value
    assert (e.file, e.index, e.field) == (os.path.join("helpful-base", "train.jsonl.gz"), 2, field)
    assert reason in e.reason
    msg = str(e)
    assert "train.jsonl.gz" in msg and "record 2" in msg and repr(field) in msg
    # One line, `what; how to fix` (the command line prints it as `error: <message>`).
    assert "\n" not in msg and msg.endswith("skip_invalid=True to skip and count it")


def test_hh_undecodable_and_invalid_json(tmp_path):
    undecodable = (b'{"chosen": "\\n\\nHuman: q\\n\\nAssistant: caf\xe9 \xff", '
                   b'"rejected": "\\n\\nHuman: q\\n\\nAssistant: fine"}')
    write_hh(str(tmp_path / "m1"), HH_GOOD, raw_lines=[undecodable])
    with pytest.raises(DataError, match=r"record 2: field 'chosen': undecodable"):
        builders.prepare(builders.HhRlhfPairs, data_dir=str(tmp_path / "d1"),
                         manual_dir=str(tmp_path / "m1"))
    write_hh(str(tmp_path / "m2"), HH_GOOD, raw_lines=[b'{"chosen": "trunc'])
    with pytest.raises(DataError, match=r"record 2: field '<record>': not valid JSON"):
        builders.prepare(builders.HhRlhfPairs, data_dir=str(tmp_path / "d2"),
                         manual_dir=str(tmp_path / "m2"))
    # Nested deeper than Python's recursion limit: json raises RecursionError, not a decode
    # error; it is a bad record like any other (and skip_invalid skips it, see below).
    write_hh(str(tmp_path / "m3"), HH_GOOD, raw_lines=[b"[" * 100_000 + b"]" * 100_000])
    with pytest.raises(DataError, match=r"record 2: field '<record>': JSON nested too deeply"):
        builders.prepare(builders.HhRlhfPairs, data_dir=str(tmp_path / "d3"),
                         manual_dir=str(tmp_path / "m3"))


def test_hh_skip_invalid_counts_every_case(tmp_path):
    bad = [r for _, r, _, _ in BAD_HH]
    undecodable = (b'{"chosen": "\\n\\nHuman: q\\n\\nAssistant: \xff", '
                   b'"rejected": "\\n\\nHuman: q\\n\\nAssistant: fine"}')
    raw = [undecodable, b"[1, 2]", b"null", b'"a string"', b"[" * 100_000 + b"]" * 100_000]
    write_hh(str(tmp_path / "manual"), HH_GOOD + bad, raw_lines=raw)
    b = builders.prepare(builders.HhRlhfPairs, data_dir=str(tmp_path / "data"),
                         manual_dir=str(tmp_path / "manual"), skip_invalid=True, max_chars=300)
    assert len(b.as_data_source(split="train")) == 2
    assert b.skipped["skipped"] == len(bad) + len(raw)
    assert sum(b.skipped["by_reason"].values()) == len(bad) + len(raw)
    assert any("record 2" in m for m in b.skipped["examples"])
    # The count is stored with the data: a fresh builder on the same dir reports it too.
    again = builders.HhRlhfPairs(data_dir=str(tmp_path / "data"))
    assert again.skipped["skipped"] == len(bad) + len(raw)
    # After fixing the raw files, overwrite=True rebuilds in place.
    write_hh(str(tmp_path / "manual"), HH_GOOD)
    fixed = builders.prepare(builders.HhRlhfPairs, data_dir=str(tmp_path / "data"),
                             manual_dir=str(tmp_path / "manual"), overwrite=True)
    assert fixed.skipped["skipped"] == 0 and len(fixed.as_data_source(split="train")) == 2


BAD_TLDR = [
    ("missing_post", lambda r: r["info"].pop("post"), "info.post", "missing"),
    ("empty_summary", lambda r: r["summaries"][1].update(text=" "), "summaries[1].text", "empty"),
    ("missing_summary", lambda r: r["summaries"].pop(), "summaries[1].text", "missing"),
    ("identical", lambda r: r["summaries"][1].update(text=r["summaries"][0]["text"]),
     "summaries[1].text", "identical"),
    ("bad_choice", lambda r: r.update(choice=2), "choice", "expected 0 or 1"),
    # 1.0 == 1 passes `in (0, 1)` but cannot index the summaries; only the integers are labels.
    ("float_choice", lambda r: r.update(choice=1.0), "choice", "got 1.0 (float)"),
    ("bool_choice", lambda r: r.update(choice=True), "choice", "got True (bool)"),
    ("null_choice", lambda r: r.update(choice=None), "choice", "got None (NoneType)"),
    ("info_not_object", lambda r: r.update(info="a post"), "info.post",
     "expected an object at 'info', got str"),
    ("summaries_not_list", lambda r: r.update(summaries="ab"), "summaries[0].text",
     "expected a list at 'summaries', got str"),
    ("bad_split", lambda r: r.update(split="dev"), "split", "not one of"),
    ("too_long", lambda r: r["info"].update(post="word " * 100), "info.post", "longer than"),
]


@pytest.mark.parametrize("case,mutate,field,reason", BAD_TLDR, ids=[c[0] for c in BAD_TLDR])
def test_tldr_bad_record(tmp_path, case, mutate, field, reason):
    bad = tldr()
    mutate(bad)
    write_tldr(str(tmp_path / "manual"), [tldr(), bad])
    with pytest.raises(DataError) as err:
        builders.prepare(builders.TldrComparisons, data_dir=str(tmp_path / "data"),
                         manual_dir=str(tmp_path / "manual"), max_chars=300)
    e = err.value
    assert (e.file, e.index, e.field) == (os.path.join("comparisons", "batch3.json"), 1, field)
    assert reason in e.reason
    b = builders.prepare(builders.TldrComparisons, data_dir=str(tmp_path / "data2"),
                         manual_dir=str(tmp_path / "manual"), max_chars=300, skip_invalid=True)
    assert b.skipped["skipped"] == 1 and len(b.as_data_source(split="train")) == 1


def test_imdb_undecodable_review(tmp_path):
    files = dict(IMDB_FILES)
    files["aclImdb/train/neg/7_1.txt"] = b"bad bytes \xff\xfe here"
    write_imdb_archive(str(tmp_path / "manual"), files)
    with pytest.raises(DataError) as err:
        builders.prepare(builders.ImdbPrompts, data_dir=str(tmp_path / "data"),
                         config="archive", manual_dir=str(tmp_path / "manual"))
    assert err.value.field == "text" and err.value.index == 7
    assert "aclImdb/train/neg/7_1.txt" in err.value.file
    b = builders.prepare(builders.ImdbPrompts, data_dir=str(tmp_path / "data2"),
                         config="archive", manual_dir=str(tmp_path / "manual"),
                         skip_invalid=True)
    assert b.skipped["skipped"] == 1 and len(b.as_data_source(split="train")) == 2


def test_no_files_is_an_error(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "README").write_text("nothing here")
    with pytest.raises(DataError, match="no valid records"):
        builders.prepare(builders.HhRlhfPairs, data_dir=str(tmp_path / "data"),
                         manual_dir=str(tmp_path / "manual"))


def test_stage_data_source_keeps_label_noise_settings_apart(tmp_path):
    """Two stages sharing a data directory with different flip_rate get different datasets
    (every field that changes the records names the prepared dataset)."""
    import ml_collections
    from rlhf_jax.trainers import common
    data = ml_collections.ConfigDict(dict(source="synthetic", data_dir=str(tmp_path), n_train=64,
                                          n_test=8, seed=0, tau=1.0, flip_rate=0.0))
    clean = common.data_source(data, "pairs", "train", tmp_path)
    data.flip_rate = 0.5
    noisy = common.data_source(data, "pairs", "train", tmp_path)
    swapped = [clean[i]["chosen"] != noisy[i]["chosen"] for i in range(64)]
    assert 10 < sum(swapped) < 54


# ---------------------------------------------------------------------------------------------
# Damaged, compressed and unknown files: named, never silently dropped
# ---------------------------------------------------------------------------------------------

def _gz(rows):
    return gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows * 20))


def _corrupt_body(data):
    """Flips 16 bytes in the middle of a compressed stream (header and trailer intact)."""
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 16]) + data[mid + 16:]


HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n"
_LINES = b"".join(json.dumps(r).encode() + b"\n" for r in HH_GOOD * 20)
DAMAGED = [
    ("truncated_gz", "train.jsonl.gz", lambda: _gz(HH_GOOD)[:len(_gz(HH_GOOD)) // 2],
     "ended before"),
    ("not_gzip", "train.jsonl.gz", lambda: _LINES, "Not a gzipped file"),
    ("corrupt_gz_body", "train.jsonl.gz", lambda: _corrupt_body(_gz(HH_GOOD)), "cannot be read"),
    ("truncated_bz2", "train.jsonl.bz2", lambda: bz2.compress(_LINES)[:100], "ended before"),
    ("corrupt_xz", "train.jsonl.xz", lambda: _corrupt_body(lzma.compress(_LINES)),
     "cannot be read"),
    ("html_page", "train.jsonl.gz", lambda: HTML_PAGE, "HTML page"),
    ("empty_file", "train.jsonl", lambda: b"", "empty"),
]


@pytest.mark.parametrize("case,filename,content,reason", DAMAGED, ids=[c[0] for c in DAMAGED])
def test_damaged_jsonl_file_is_named_or_skipped(tmp_path, case, filename, content, reason):
    manual = tmp_path / "manual"
    write_hh(str(manual), HH_GOOD)
    damaged = manual / "harmless-base" / filename
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(content())
    rel = os.path.join("harmless-base", filename)
    with pytest.raises(DataError) as err:
        builders.prepare(builders.HhRlhfPairs, data_dir=str(tmp_path / "d1"),
                         manual_dir=str(manual))
    e = err.value
    assert (e.file, e.index, e.field) == (rel, None, None) and reason in str(e)
    assert "\n" not in str(e) and "download the file again" in str(e)
    # skip_invalid: the damaged file is left out and named; the good files are read.
    b = builders.prepare(builders.HhRlhfPairs, data_dir=str(tmp_path / "d2"),
                         manual_dir=str(manual), skip_invalid=True)
    assert len(b.as_data_source(split="train")) == 2
    (bad,) = b.skipped["bad_files"]
    assert bad.startswith(rel + ": ") and reason in bad
    # ... unless nothing readable is left: then it is an error that names the damaged file.
    os.remove(manual / "helpful-base" / "train.jsonl.gz")
    os.remove(manual / "helpful-base" / "test.jsonl.gz")
    with pytest.raises(DataError, match=f"no valid records found.*{rel}"):
        builders.prepare(builders.HhRlhfPairs, data_dir=str(tmp_path / "d3"),
                         manual_dir=str(manual), skip_invalid=True)


def test_damaged_tldr_file_is_named(tmp_path):
    write_tldr(str(tmp_path / "manual"), [tldr()])
    (tmp_path / "manual" / "comparisons" / "batch4.json.gz").write_bytes(b"\x1f\x8b\x08junk")
    with pytest.raises(DataError, match=r"^comparisons/batch4.json.gz: cannot be read"):
        builders.prepare(builders.TldrComparisons, data_dir=str(tmp_path / "d1"),
                         manual_dir=str(tmp_path / "manual"))
    b = builders.prepare(builders.TldrComparisons, data_dir=str(tmp_path / "d2"),
                         manual_dir=str(tmp_path / "manual"), skip_invalid=True)
    assert len(b.as_data_source(split="train")) == 1
    assert b.skipped["bad_files"][0].startswith("comparisons/batch4.json.gz: cannot be read")


def _imdb_archive_bytes(tmp_path):
    write_imdb_archive(str(tmp_path / "good"))
    return (tmp_path / "good" / "aclImdb_v1.tar.gz").read_bytes()


@pytest.mark.parametrize("case", ["truncated", "html", "corrupt"])
def test_damaged_imdb_archive_is_named(tmp_path, case):
    good = _imdb_archive_bytes(tmp_path)
    content = {"truncated": good[:len(good) // 2], "html": HTML_PAGE,
               "corrupt": _corrupt_body(good)}[case]
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "aclImdb_v1.tar.gz").write_bytes(content)
    with pytest.raises(DataError) as err:
        builders.prepare(builders.ImdbPrompts, data_dir=str(tmp_path / "d1"), config="archive",
                         manual_dir=str(tmp_path / "manual"))
    msg = str(err.value)
    assert msg.startswith("aclImdb_v1.tar.gz: cannot be read") and "\n" not in msg
    if case == "html":
        assert "HTML page" in msg
    # skip_invalid leaves the archive out, and then nothing is left: still an error, naming it.
    with pytest.raises(DataError, match="no valid records found.*aclImdb_v1.tar.gz"):
        builders.prepare(builders.ImdbPrompts, data_dir=str(tmp_path / "d2"), config="archive",
                         manual_dir=str(tmp_path / "manual"), skip_invalid=True)


def test_compressed_files_are_read_and_other_files_listed(tmp_path):
    """.bz2 and .xz are read like .gz; files the builder does not read are listed in
    `skipped["ignored_files"]`, not passed over in silence (hidden files are not data)."""
    manual = tmp_path / "manual"
    write_hh(str(manual), HH_GOOD[:1])
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in HH_GOOD[1:])
    (manual / "harmless-base").mkdir()
    (manual / "harmless-base" / "train.jsonl.bz2").write_bytes(bz2.compress(lines))
    (manual / "harmless-base" / "test.jsonl.xz").write_bytes(lzma.compress(lines))
    (manual / "harmless-base" / "train.parquet").write_bytes(b"PAR1")
    (manual / "README.md").write_text("HH-RLHF")
    (manual / ".git").mkdir()
    (manual / ".git" / "HEAD").write_text("ref: refs/heads/main")
    b = builders.prepare(builders.HhRlhfPairs, data_dir=str(tmp_path / "data"),
                         manual_dir=str(manual))
    src = b.as_data_source()
    assert (len(src["train"]), len(src["test"])) == (2, 2)
    assert {text(src["train"][i]["source"]) for i in range(2)} == {
        os.path.join("helpful-base", "train.jsonl.gz"),
        os.path.join("harmless-base", "train.jsonl.bz2")}
    assert b.skipped["ignored_files"] == ["README.md",
                                          os.path.join("harmless-base", "train.parquet")]
    assert b.skipped["ignored_files_count"] == 2 and b.skipped["bad_files"] == []


def test_imdb_lists_files_it_does_not_read(tmp_path):
    write_imdb_archive(str(tmp_path / "manual"))
    (tmp_path / "manual" / "notes.txt").write_text("mine")
    b = builders.prepare(builders.ImdbPrompts, data_dir=str(tmp_path / "data"),
                         config="archive", manual_dir=str(tmp_path / "manual"))
    assert b.skipped["ignored_files"] == ["notes.txt", "aclImdb_v1.tar.gz:aclImdb/README"]


def test_missing_manual_dir_is_named(tmp_path):
    with pytest.raises(DataError) as err:
        builders.prepare(builders.HhRlhfPairs, data_dir=str(tmp_path / "data"),
                         manual_dir=str(tmp_path / "nowhere"))
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "nowhere") + ": no raw files here")
    assert "\n" not in msg and "manual_dir=" in msg


def test_unknown_builder_name_lists_the_names(tmp_path):
    from rlhf_jax.errors import ConfigError
    with pytest.raises(ConfigError, match=r"unknown dataset builder 'rlhf_hh'; choose one of "
                                          r"\[.*'rlhf_hh_pairs'"):
        builders.prepare("rlhf_hh", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# What a person reads: one line per prepared dataset, no TFDS chatter
# ---------------------------------------------------------------------------------------------

def test_prepare_prints_one_line_only_when_it_prepares(tmp_path, capfd, caplog):
    from tensorflow_datasets.core.utils import tqdm_utils
    tfds.display_progress_bar(True)
    try:
        cfg = builders.SyntheticConfig(name="pairs_quiet", kind="pairs", n_train=30, n_test=4)
        with caplog.at_level(logging.DEBUG):
            builders.prepare(builders.SyntheticTestbed, data_dir=str(tmp_path), config=cfg)
        out, err = capfd.readouterr()
        assert out == (f"data: prepared rlhf_synthetic/pairs_quiet (train 30, test 4) in "
                       f"{tmp_path}\n")
        assert err == ""       # no progress bars, no "Shuffling .../incomplete..." lines
        assert not [r for r in caplog.records if "tensorflow_datasets" in r.pathname]
        assert tqdm_utils._active is True   # the caller's progress-bar setting is restored
        builders.prepare(builders.SyntheticTestbed, data_dir=str(tmp_path), config=cfg)
        assert capfd.readouterr() == ("", "")   # already prepared: nothing to say
    finally:
        tfds.display_progress_bar(False)


def test_prepared_line_reports_what_was_skipped(tmp_path, capfd):
    write_hh(str(tmp_path / "manual"), HH_GOOD + [BAD_HH[0][1]])
    (tmp_path / "manual" / "README.md").write_text("HH-RLHF")
    builders.prepare(builders.HhRlhfPairs, data_dir=str(tmp_path / "data"),
                     manual_dir=str(tmp_path / "manual"), skip_invalid=True)
    out = capfd.readouterr().out
    assert out == (f"data: prepared rlhf_hh_pairs (train 2, test 1) in {tmp_path / 'data'}; "
                   "1 bad record skipped, 1 file not read (see builder.skipped)\n")


def test_stage_data_source_names_what_it_cannot_read(tmp_path):
    import ml_collections
    from rlhf_jax.errors import ConfigError
    from rlhf_jax.trainers import common
    builders.prepare(builders.SyntheticTestbed, data_dir=str(tmp_path),
                     config=builders.SyntheticConfig(name="p", kind="pairs", n_train=5, n_test=2))
    data = ml_collections.ConfigDict(dict(source="tfds", data_dir=str(tmp_path),
                                          name="rlhf_hh_pairs"))
    for name, split, why in (("rlhf_hh_pairs", "train", "has not been generated"),
                             ("no_such_set", "train", "Dataset no_such_set not found"),
                             ("rlhf_synthetic/p", "valid", "Unknown split 'valid'")):
        data.name = name
        with pytest.raises(ConfigError) as err:
            common.data_source(data, "pairs", split, tmp_path)
        msg = str(err.value)
        assert msg.startswith(f"data.name={name!r} (split {split!r}) cannot be read") and why in msg
        assert "datasets prepared there: rlhf_synthetic/p;" in msg and "\n" not in msg
    data.source = "hf"
    with pytest.raises(ConfigError, match="unknown data_source 'hf'; registered: arithmetic, "):
        common.data_source(data, "pairs", "train", tmp_path)


def test_the_prepared_list_shows_datasets_only_and_at_most_20(tmp_path):
    import ml_collections
    from rlhf_jax.errors import ConfigError
    from rlhf_jax.trainers import common
    for i in range(25):                       # prepared: <name>/<version>/dataset_info.json
        (tmp_path / f"set{i:02d}" / "1.0.0").mkdir(parents=True)
        (tmp_path / f"set{i:02d}" / "1.0.0" / "dataset_info.json").write_text("{}")
    for junk in ("cache", "downloads", ".locks"):
        (tmp_path / junk / "x").mkdir(parents=True)
    data = ml_collections.ConfigDict(dict(source="tfds", data_dir=str(tmp_path), name="nope"))
    with pytest.raises(ConfigError) as err:
        common.data_source(data, "pairs", "train", tmp_path)
    msg = str(err.value)
    assert "datasets prepared there: set00, set01," in msg and "set19 and 5 more;" in msg
    assert "cache" not in msg and "downloads" not in msg and "set20" not in msg
