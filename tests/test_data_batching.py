"""Batching: fixed shapes, padding sides, masks, truncation, shuffling, iterator save/restore."""

import json

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data import batching, builders, synthetic
from rlhf_jax.data.records import DataError
from rlhf_jax.errors import CheckpointError, ConfigError

tfds.display_progress_bar(False)


@pytest.fixture(scope="module")
def tb():
    return synthetic.Testbed()


@pytest.fixture(scope="module")
def sft_rows(tb):
    return tb.sft_examples(23, seed=0)


@pytest.fixture(scope="module")
def pair_source(tb, tmp_path_factory):
    cfg = builders.SyntheticConfig(name="pairs_b", kind="pairs", n_train=30, n_test=5)
    b = builders.prepare(builders.SyntheticTestbed,
                         data_dir=str(tmp_path_factory.mktemp("pairs")), config=cfg)
    return b.as_data_source(split="train")


def ids_of(batch, key="tokens"):
    """Row contents without padding, as tuples (to compare example identity)."""
    return [tuple(int(t) for t, m in zip(row, mask) if m)
            for row, mask in zip(batch[key], batch["mask"])]


def test_sft_batch_right_padded_with_completion_loss_mask(tb, sft_rows):
    cfg = batching.BatchConfig(batch_size=4, buckets=(16, 32, 48), max_prompt_len=12,
                               shuffle=False)
    batch = next(batching.make_iterator(sft_rows, kind="sft", tokenizer=tb.tokenizer,
                                        config=cfg))
    assert batch["tokens"].shape[0] == 4 and batch["tokens"].shape[1] in cfg.buckets
    for b in range(4):
        p, c = tb.encode_example(sft_rows[b]["prompt"], sft_rows[b]["completion"])
        row, n = batch["tokens"][b], len(p) + len(c)
        assert row[:n].tolist() == p + c and (row[n:] == tb.tokenizer.pad_id).all()
        assert batch["mask"][b].tolist() == [1] * n + [0] * (len(row) - n)
        assert batch["loss_mask"][b].tolist() == [0] * len(p) + [1] * len(c) + [0] * (
            len(row) - n)
        assert batch["prompt_lens"][b] == len(p)
    # The smallest bucket that fits the longest row.
    longest = batch["mask"].sum(1).max()
    assert batch["tokens"].shape[1] == min(x for x in cfg.buckets if x >= longest)


def test_prompt_batch_left_padded(tb, sft_rows):
    cfg = batching.BatchConfig(batch_size=5, buckets=(8, 16), max_prompt_len=12,
                               shuffle=False)
    batch = next(batching.make_iterator(sft_rows, kind="prompts", tokenizer=tb.tokenizer,
                                        config=cfg))
    assert batch["tokens"].shape == (5, 16) or batch["tokens"].shape == (5, 8)
    for b in range(5):
        p, _ = tb.encode_example(sft_rows[b]["prompt"], "")
        assert batch["tokens"][b, -len(p):].tolist() == p
        assert batch["mask"][b].sum() == len(p) == batch["lengths"][b]
        assert batch["mask"][b, -1] == 1
        assert batch["positions"][b, -len(p):].tolist() == list(range(len(p)))


def test_pair_batch_stacks_chosen_then_rejected(tb, pair_source):
    cfg = batching.BatchConfig(batch_size=3, buckets=(32, 48), max_prompt_len=12,
                               shuffle=False)
    it = batching.make_iterator(pair_source, kind="pairs", tokenizer=tb.tokenizer, config=cfg,
                                extra_fields=("gold_chosen", "gold_rejected"))
    batch = next(it)
    assert batch["tokens"].shape[0] == 6 and batch["gold_chosen"].shape == (3,)
    for b in range(3):
        rec = pair_source[b]
        p, c = tb.encode_example(rec["prompt"].decode(), rec["chosen"].decode())
        _, r = tb.encode_example(rec["prompt"].decode(), rec["rejected"].decode())
        assert ids_of(batch)[b] == tuple(p + c)
        assert ids_of(batch)[3 + b] == tuple(p + r)
    # The loss mask picks exactly the responses, so the gold reward of the batch rows is the
    # stored gold of chosen then rejected.
    gold = np.asarray(tb.gold_reward(batch["tokens"], batch["loss_mask"]))
    np.testing.assert_allclose(gold, np.concatenate([batch["gold_chosen"],
                                                     batch["gold_rejected"]]), atol=1e-4)


def test_truncation_rule():
    p, r = batching.truncate([2, 10, 11, 12, 13, 14], [20, 21, 22, 23, 3], max_prompt_len=4,
                             max_len=7, bos_id=2)
    assert p == [2, 12, 13, 14]       # bos, then the end of the prompt
    assert r == [20, 21, 22]          # the start of the response
    p, r = batching.truncate([10, 11], [20, 3], max_prompt_len=4, max_len=7, bos_id=2)
    assert (p, r) == ([10, 11], [20, 3])


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(prompt=st.lists(st.integers(4, 50), max_size=30),
                  response=st.lists(st.integers(4, 50), max_size=30),
                  max_prompt_len=st.integers(1, 20), extra=st.integers(1, 20),
                  with_bos=st.booleans())
def test_truncation_rule_properties(prompt, response, max_prompt_len, extra, with_bos):
    prompt = [2] + prompt if with_bos else prompt
    max_len = max_prompt_len + extra
    p, r = batching.truncate(prompt, response, max_prompt_len=max_prompt_len, max_len=max_len,
                             bos_id=2)
    assert len(p) <= max_prompt_len and len(p) + len(r) <= max_len
    assert r == response[:len(r)]                       # a prefix of the response
    body = p[1:] if with_bos and len(prompt) > max_prompt_len else p
    assert body == prompt[len(prompt) - len(body):]      # a suffix of the prompt
    if with_bos:
        assert p[0] == 2
    if len(prompt) <= max_prompt_len and len(prompt) + len(response) <= max_len:
        assert (p, r) == (prompt, response)              # nothing to cut, nothing cut


def test_overlong_truncates_or_errors(tb, sft_rows):
    cfg = batching.BatchConfig(batch_size=2, buckets=(12,), max_prompt_len=5, shuffle=False)
    batch = next(batching.make_iterator(sft_rows, kind="sft", tokenizer=tb.tokenizer,
                                        config=cfg))
    assert batch["tokens"].shape == (2, 12)
    p, c = tb.encode_example(sft_rows[0]["prompt"], sft_rows[0]["completion"])
    kept = [p[0]] + p[len(p) - 4:]
    assert batch["tokens"][0].tolist() == kept + c[:12 - len(kept)]
    rows = [{"prompt": "i watched the film twice . the plot",
             "completion": "was good , but the cast was not very good ."}]
    one = batching.BatchConfig(batch_size=1, buckets=(12,), max_prompt_len=5, shuffle=False)
    batch = next(batching.make_iterator(rows, kind="sft", tokenizer=tb.tokenizer, config=one))
    assert [tb.id_to_word(i) for i in batch["tokens"][0]] == (
        "<s> twice . the plot was good , but the cast was".split())
    assert batch["loss_mask"][0].tolist() == [0] * 5 + [1] * 7
    assert batch["truncated"].tolist() == [1]
    strict = batching.BatchConfig(batch_size=2, buckets=(12,), max_prompt_len=5,
                                  shuffle=False, overlong="error")
    it = batching.make_iterator(sft_rows, kind="sft", tokenizer=tb.tokenizer, config=strict,
                                name="sft/train")
    with pytest.raises(DataError, match=r"sft/train: record 0: field 'completion': prompt \+ "
                                        r"response = 15 tokens, longer than the limit 12"):
        next(it)
    long_prompt = [{"prompt": "i watched the film twice . the plot", "completion": "was good ."}]
    it = batching.make_iterator(long_prompt, kind="sft", tokenizer=tb.tokenizer, config=strict,
                                name="sft/train")
    with pytest.raises(DataError, match=r"record 0: field 'prompt': 9 tokens, longer than"):
        next(it)


def test_epoch_covers_each_example_once_and_shuffle_by_seed(tb, sft_rows):
    def order(seed, shuffle=True):
        cfg = batching.BatchConfig(batch_size=1, buckets=(48,), seed=seed, shuffle=shuffle,
                                   num_epochs=2)
        return [ids_of(b)[0] for b in batching.make_iterator(
            sft_rows, kind="sft", tokenizer=tb.tokenizer, config=cfg)]

    a, b, c = order(1), order(1), order(2)
    n = len(sft_rows)
    assert len(a) == 2 * n and a == b and a != c
    assert sorted(a[:n]) == sorted(a[n:]) and len(set(a[:n])) == n
    assert a[:n] != a[n:]  # a fresh permutation each epoch
    assert order(0, shuffle=False)[:n] == order(5, shuffle=False)[:n]


def test_final_partial_batch_is_padded_and_marked(tb, sft_rows):
    cfg = batching.BatchConfig(batch_size=10, buckets=(48,), num_epochs=1,
                               drop_remainder=False)
    batches = list(batching.make_iterator(sft_rows, kind="sft", tokenizer=tb.tokenizer,
                                          config=cfg))
    assert [int(b["valid"].sum()) for b in batches] == [10, 10, 3]
    assert all(b["tokens"].shape == (10, 48) for b in batches)
    assert batches[-1]["mask"][3:].sum() == 0 and batches[-1]["loss_mask"][3:].sum() == 0


@pytest.mark.parametrize("kind", ["sft", "pairs"])
@pytest.mark.parametrize("consumed", [2, 7, 10])   # mid-epoch; at, and just past, the boundary
def test_iterator_state_round_trip(tb, sft_rows, pair_source, kind, consumed):
    source = sft_rows if kind == "sft" else pair_source
    n = len(source)
    cfg = batching.BatchConfig(batch_size=3, buckets=(32, 48), max_prompt_len=12, seed=4)

    def make():
        return batching.make_iterator(source, kind=kind, tokenizer=tb.tokenizer, config=cfg)

    it = make()
    for _ in range(consumed):
        next(it)
    state = json.loads(json.dumps(it.get_state()))   # what a checkpoint stores
    expected = [ids_of(next(it)) for _ in range(10)]  # crosses an epoch boundary
    restored = make()
    restored.set_state(state)
    assert [ids_of(next(restored)) for _ in range(10)] == expected
    assert (consumed + 10) * 3 > n  # the checked stretch includes an epoch boundary


def test_state_from_another_pipeline_is_refused(tb, sft_rows):
    cfg = batching.BatchConfig(batch_size=3, buckets=(48,), seed=4)
    it = batching.make_iterator(sft_rows, kind="sft", tokenizer=tb.tokenizer, config=cfg)
    state = it.get_state()
    other = batching.make_iterator(sft_rows, kind="sft", tokenizer=tb.tokenizer,
                                   config=batching.BatchConfig(batch_size=3, buckets=(48,),
                                                               seed=5))
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


def test_chat_format_encoder_on_hh_prompt():
    from rlhf_jax.data import tokenizer as tokenizer_lib
    tok = tokenizer_lib.train_sentencepiece(
        sentences=["hello how are you", "i am fine thanks", "tell me a joke please"] * 30,
        vocab_size=60, model_type="bpe")
    rows = [{"prompt": "\n\nHuman: hello\n\nAssistant: hi\n\nHuman: tell me a joke\n\nAssistant:",
             "chosen": "no joke", "rejected": "a joke"}]
    cfg = batching.BatchConfig(batch_size=1, buckets=(64,), max_prompt_len=40, shuffle=False)
    batch = next(batching.make_iterator(rows, kind="pairs", tokenizer=tok, config=cfg,
                                        format="chat"))
    ids = batch["tokens"][0][batch["mask"][0] == 1].tolist()
    user, asst, end = (tok.piece_to_id(m) for m in ("<|user|>", "<|assistant|>", "<|end|>"))
    assert ids.count(user) == 2 and ids.count(asst) == 2  # "hi" turn + generation prompt
    target = batch["tokens"][0][batch["loss_mask"][0] == 1].tolist()
    assert target[-2:] == [end, tok.eos_id]
    assert tok.sp.decode(target[:-2]) == "no joke"


def test_config_validation():
    with pytest.raises(ValueError, match="max_prompt_len"):
        batching.BatchConfig(batch_size=2, buckets=(16,), max_prompt_len=16)
    with pytest.raises(ValueError, match="buckets"):
        batching.BatchConfig(batch_size=2, buckets=(32, 16))
    with pytest.raises(ValueError, match="overlong"):
        batching.BatchConfig(batch_size=2, overlong="drop")
    with pytest.raises(ValueError, match="prefetch"):
        batching.BatchConfig(batch_size=2, prefetch=-1)


def test_chat_kind_multi_turn_loss_mask():
    from rlhf_jax.data import tokenizer as tokenizer_lib
    tok = tokenizer_lib.train_sentencepiece(
        sentences=["hello how are you", "i am fine thanks", "tell me a joke please"] * 30,
        vocab_size=60, model_type="bpe")
    convo = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
             {"role": "user", "content": "a joke"}, {"role": "assistant", "content": "no joke"}]
    # The same conversation as a TFDS Sequence feature returns it: a dict of lists of bytes.
    as_tfds = {"role": [m["role"].encode() for m in convo],
               "content": [m["content"].encode() for m in convo]}
    cfg = batching.BatchConfig(batch_size=2, buckets=(64,), max_prompt_len=40, shuffle=False)
    end = tok.piece_to_id("<|end|>")

    def spans(batch, row):
        ids, lm = batch["tokens"][row], batch["loss_mask"][row]
        out, cur = [], []
        for i, m in zip(ids.tolist(), lm.tolist()):
            if m:
                cur.append(i)
            elif cur:
                out, cur = out + [cur], []
        return out + ([cur] if cur else [])

    for loss_on, want in (("all_assistant", ["hi", "no joke"]), ("last_assistant", ["no joke"])):
        batch = next(batching.make_iterator([{"messages": convo}, {"messages": as_tfds}],
                                            kind="chat", tokenizer=tok, config=cfg,
                                            chat_loss_on=loss_on))
        for row in (0, 1):
            got = spans(batch, row)
            assert [tok.sp.decode([i for i in s if i not in (end, tok.eos_id)]) for s in got] \
                == want
            assert got[-1][-2:] == [end, tok.eos_id]
        assert (batch["tokens"][0] == batch["tokens"][1]).all()
    # Over-long: the same rule as sft, with everything before the first loss token as prompt.
    small = batching.BatchConfig(batch_size=1, buckets=(10,), max_prompt_len=4, shuffle=False)
    batch = next(batching.make_iterator([{"messages": convo}], kind="chat", tokenizer=tok,
                                        config=small, chat_loss_on="last_assistant"))
    assert batch["truncated"].tolist() == [1] and batch["loss_mask"][0, :4].sum() == 0
    assert batch["loss_mask"][0, 4:].all()
    with pytest.raises(DataError, match="no assistant turn"):
        next(batching.make_iterator([{"messages": convo[:1]}], kind="chat", tokenizer=tok,
                                    config=cfg))


def test_overlong_skip_leaves_an_empty_counted_row(tb):
    rows = [{"prompt": "the plot", "completion": "was good ."},
            {"prompt": "i watched the film twice . the plot",
             "completion": "was good , but the cast was not very good ."},
            {"prompt": "the cast", "completion": "was bad ."}]
    cfg = batching.BatchConfig(batch_size=3, buckets=(12,), max_prompt_len=5, shuffle=False,
                               overlong="skip")
    it = batching.make_iterator(rows, kind="sft", tokenizer=tb.tokenizer, config=cfg)
    batch = next(it)
    assert batch["skipped"].tolist() == [0, 1, 0] and batch["valid"].tolist() == [1, 0, 1]
    assert batch["mask"][1].sum() == 0 and batch["loss_mask"][1].sum() == 0
    assert [tb.id_to_word(i) for i in batch["tokens"][2][batch["mask"][2] == 1]] == (
        "<s> the cast was bad . </s>".split())
    assert it.get_state()["next_batch"] == 1


# ---------------------------------------------------------------------------------------------
# Failing well: bad configs, bad states and bad records, each named in one line
# ---------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (dict(batch_size=0), "batch_size=0"),
    (dict(batch_size=2.0), "batch_size=2.0"),
    (dict(batch_size=True), "batch_size=True"),
    (dict(buckets=()), "buckets=()"),
    (dict(buckets=(16, 0)), "buckets"),
    (dict(buckets=(32, 16)), "buckets=(32, 16)"),
    (dict(buckets=(16.0, 32)), "buckets"),
    (dict(buckets=64), "buckets=64"),
    (dict(max_prompt_len=0), "max_prompt_len=0"),
    (dict(max_prompt_len=64), "max_prompt_len=64"),
    (dict(max_prompt_len="8"), "max_prompt_len='8'"),
    (dict(seed=-1), "seed=-1"),
    (dict(num_epochs=0), "num_epochs=0"),
    (dict(shuffle="yes"), "shuffle='yes'"),
    (dict(prefetch=-1), "prefetch=-1"),
    (dict(overlong="drop"), "overlong='drop'"),
]


@pytest.mark.parametrize("kwargs,named", BAD_CONFIGS, ids=[n for _, n in BAD_CONFIGS])
def test_batch_config_is_validated(kwargs, named):
    with pytest.raises(ConfigError) as err:
        batching.BatchConfig(**{"batch_size": 2, **kwargs})
    msg = str(err.value)
    assert msg.startswith(f"batching: {named}") and "; use " in msg and "\n" not in msg


def test_batch_config_takes_buckets_as_a_list():
    cfg = batching.BatchConfig(batch_size=2, buckets=[16, 32], max_prompt_len=8)
    assert cfg.buckets == (16, 32) and hash(cfg)


def test_make_iterator_arguments_are_validated(tb, sft_rows):
    cfg = batching.BatchConfig(batch_size=2)
    make = lambda source=sft_rows, **kw: batching.make_iterator(  # noqa: E731
        source, tokenizer=tb.tokenizer, config=cfg, **{"kind": "sft", **kw})
    with pytest.raises(ConfigError, match="kind='rl' is invalid"):
        make(kind="rl")
    with pytest.raises(ConfigError, match="chat_loss_on='first' is invalid"):
        make(kind="chat", chat_loss_on="first")
    with pytest.raises(ConfigError, match=r"fields \['answer'\] are not roles of kind='sft'"):
        make(fields={"answer": "output"})
    with pytest.raises(ConfigError, match="format='html' is invalid"):
        make(format="html")
    with pytest.raises(DataError, match="^empty/train: has no records; "):
        make(source=[], name="empty/train")


def _state_iterator(tb, sft_rows, **kw):
    cfg = batching.BatchConfig(batch_size=3, buckets=(48,), seed=4, **kw)
    return batching.make_iterator(sft_rows, kind="sft", tokenizer=tb.tokenizer, config=cfg)


@pytest.mark.parametrize("state", [
    None, [], {}, {"next_batch": 2}, {"fingerprint": {}}, {"next_batch": -1, "fingerprint": {}},
    {"next_batch": "2", "fingerprint": {}}, {"next_batch": 2.0, "fingerprint": {}},
    {"next_batch": 2, "fingerprint": "sft"}])
def test_malformed_iterator_state_is_refused(tb, sft_rows, state):
    it = _state_iterator(tb, sft_rows)
    with pytest.raises(CheckpointError, match="is not a saved position") as err:
        it.set_state(state)
    assert "\n" not in str(err.value)


def test_state_from_another_dataset_or_past_the_end_is_refused(tb, sft_rows):
    state = _state_iterator(tb, sft_rows).get_state()
    other = _state_iterator(tb, sft_rows[:-1])          # the dataset changed size
    with pytest.raises(ConfigError, match=r"'num_examples': \(23, 22\)"):
        other.set_state(state)
    finite = _state_iterator(tb, sft_rows, num_epochs=1)   # 7 batches of 3 from 23
    finite.set_state({**finite.get_state(), "next_batch": 7})
    with pytest.raises(StopIteration):
        next(finite)
    with pytest.raises(CheckpointError,
                       match=r"next_batch=8 is past the end of this pipeline \(7 batches\)"):
        finite.set_state({**finite.get_state(), "next_batch": 8})


GOOD = {"prompt": "the plot", "completion": "was good .", "chosen": "was good .",
        "rejected": "was bad .", "gold": 1.5}
BAD_RECORDS = [
    ("none", "sft", None, "<record>", "expected a record (a dict of fields), got NoneType"),
    ("string", "sft", "the plot was good", "<record>", "got str"),
    ("list", "pairs", ["the plot", "was good"], "<record>", "got list"),
    ("null_text", "sft", {**GOOD, "completion": None}, "completion", "missing (null)"),
    ("number_text", "sft", {**GOOD, "prompt": 3}, "prompt", "expected text, got int"),
    ("extra_missing", "pairs", {k: v for k, v in GOOD.items() if k != "gold"}, "gold",
     "missing"),
    ("extra_text", "pairs", {**GOOD, "gold": "high"}, "gold", "expected a number, got 'high'"),
    ("extra_list", "pairs", {**GOOD, "gold": [1.0, 2.0]}, "gold", "expected a number"),
    ("extra_nan", "pairs", {**GOOD, "gold": float("nan")}, "gold", "not a finite number"),
    ("extra_inf", "pairs", {**GOOD, "gold": np.float32("inf")}, "gold", "not a finite number"),
    ("messages_int", "chat", {"messages": 5}, "messages", "expected a list of {role, content}"),
    ("message_str", "chat", {"messages": ["hello"]}, "messages[0]",
     "expected a {role, content} message, got str"),
    ("no_content", "chat", {"messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant"}]}, "messages[1].content",
     "missing"),
    ("null_content", "chat", {"messages": [{"role": "assistant", "content": None}]},
     "messages[0].content", "missing (null)"),
    ("no_role", "chat", {"messages": [{"content": "hi"}]}, "messages[0].role", "missing"),
    ("bad_role", "chat", {"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role",
     "unknown role 'bot'"),
    ("tfds_no_content", "chat", {"messages": {"role": [b"user"]}}, "messages.content",
     "missing"),
    ("tfds_lengths", "chat", {"messages": {"role": [b"user", b"assistant"],
                                           "content": [b"hi"]}}, "messages",
     "2 roles but 1 contents"),
]


@pytest.mark.parametrize("case,kind,record,field,reason", BAD_RECORDS,
                         ids=[c[0] for c in BAD_RECORDS])
def test_bad_record_names_source_record_and_field(tb, case, kind, record, field, reason):
    cfg = batching.BatchConfig(batch_size=2, buckets=(48,), shuffle=False)
    extra = ("gold",) if kind == "pairs" else ()
    it = batching.make_iterator([GOOD if kind != "chat" else
                                 {"messages": [{"role": "assistant", "content": "ok"}]}, record],
                                kind=kind, tokenizer=tb.tokenizer, config=cfg,
                                extra_fields=extra, name="mine/train")
    with pytest.raises(DataError) as err:
        next(it)
    e = err.value
    assert (e.file, e.index, e.field) == ("mine/train", 1, field)
    assert reason in e.reason
    assert str(e).startswith(f"mine/train: record 1: field {field!r}: ") and "\n" not in str(e)


def test_a_damaged_prepared_dataset_is_a_data_error_naming_its_directory(tb, tmp_path):
    cfg = builders.SyntheticConfig(name="pairs_damaged", kind="pairs", n_train=30, n_test=5)
    b = builders.prepare(builders.SyntheticTestbed, data_dir=str(tmp_path), config=cfg)
    source = b.as_data_source(split="train")
    (path,) = [p for p in tmp_path.rglob("*train.array_record*")]
    with open(path, "r+b") as f:      # damaged after it was prepared: cut short
        f.truncate(path.stat().st_size // 3)
    it = batching.make_iterator(source, kind="pairs", tokenizer=tb.tokenizer,
                                config=batching.BatchConfig(batch_size=4, buckets=(36,),
                                                            max_prompt_len=12, prefetch=0))
    with pytest.raises(DataError, match=r"pairs_damaged/1.0.0 \(split train\): cannot read "
                                        r"records .*delete that directory") as e:
        next(it)
    assert "\n" not in str(e.value)
