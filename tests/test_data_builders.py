"""TFDS builders on fixtures in the real upstream formats, TF-free reading, and bad input."""

import dataclasses
import gzip
import io
import json
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


def test_hh_skip_invalid_counts_every_case(tmp_path):
    bad = [r for _, r, _, _ in BAD_HH]
    undecodable = (b'{"chosen": "\\n\\nHuman: q\\n\\nAssistant: \xff", '
                   b'"rejected": "\\n\\nHuman: q\\n\\nAssistant: fine"}')
    write_hh(str(tmp_path / "manual"), HH_GOOD + bad, raw_lines=[undecodable, b"[1, 2]"])
    b = builders.prepare(builders.HhRlhfPairs, data_dir=str(tmp_path / "data"),
                         manual_dir=str(tmp_path / "manual"), skip_invalid=True, max_chars=300)
    assert len(b.as_data_source(split="train")) == 2
    assert b.skipped["skipped"] == len(bad) + 2
    assert sum(b.skipped["by_reason"].values()) == len(bad) + 2
    assert any("record 2" in m for m in b.skipped["examples"])
    # The count is stored with the data: a fresh builder on the same dir reports it too.
    again = builders.HhRlhfPairs(data_dir=str(tmp_path / "data"))
    assert again.skipped["skipped"] == len(bad) + 2
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
