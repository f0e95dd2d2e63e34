"""Tokenizer: training, loading existing .model files, batch round trips, chat loss masks."""

import io

import numpy as np
import pytest
import sentencepiece as spm

from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.data.records import DataError

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "all that glitters is not gold",
    "to be or not to be that is the question",
    "the early bird catches the worm but the second mouse gets the cheese",
    "actions speak louder than words",
] * 20


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tok(request):
    return tokenizer_lib.train_sentencepiece(sentences=CORPUS, vocab_size=60,
                                             model_type=request.param)


def test_reserved_ids(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    for marker in tokenizer_lib.DEFAULT_CHAT.pieces():
        assert tok.has_piece(marker)
        assert tok.id_to_piece(tok.piece_to_id(marker)) == marker


def test_batch_round_trip(tok):
    texts = ["the lazy dog", "not gold but words", "to be or not to be"]
    ids = tok.encode_batch(texts, add_bos=True, add_eos=True)
    assert all(r[0] == tok.bos_id and r[-1] == tok.eos_id for r in ids)
    assert tok.decode_batch(ids) == texts
    padded, mask = tok.pad_batch(ids)
    assert padded.shape == (3, max(map(len, ids))) and padded.dtype == np.int32
    assert tok.decode_batch(padded) == texts
    left, lmask = tok.pad_batch(ids, left=True)
    assert (lmask.sum(1) == mask.sum(1)).all() and lmask[:, -1].all()
    # Decoding stops at the first eos: what a sampler leaves after it is ignored.
    assert tok.decode(ids[0] + [7, 8, 9]) == texts[0]
    # One string (the data pipeline's fast path) encodes exactly like a batch of one.
    for text, row in zip(texts, ids):
        assert tok.encode(text, add_bos=True, add_eos=True) == row
        assert tok.encode(text) == tok.encode_batch([text])[0] == row[1:-1]


def test_serialized_and_saved_model_round_trip(tok, tmp_path):
    path = str(tmp_path / "t.model")
    tok.save(path)
    again = tokenizer_lib.Tokenizer.load(path)
    again2 = tokenizer_lib.Tokenizer.from_proto(tok.serialized())
    for t in (again, again2):
        assert t.encode("the worm") == tok.encode("the worm")
        assert t.vocab_size == tok.vocab_size


def test_training_is_deterministic():
    a = tokenizer_lib.train_sentencepiece(sentences=CORPUS, vocab_size=60, model_type="bpe")
    b = tokenizer_lib.train_sentencepiece(sentences=CORPUS, vocab_size=60, model_type="bpe")
    assert a.serialized() == b.serialized()


def _foreign_model(path, *, unk_id, bos_id, eos_id, pad_id, model_type="bpe"):
    """A .model with another project's id layout, written by the SentencePiece trainer itself,
    standing in for a downloaded checkpoint's tokenizer."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=writer,
                                   vocab_size=60, model_type=model_type, unk_id=unk_id,
                                   bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, num_threads=1,
                                   minloglevel=2)
    with open(path, "wb") as f:
        f.write(writer.getvalue())


def _llama_style_model(path):
    # Llama 2: unk=0, bos=1, eos=2, no pad piece.
    _foreign_model(path, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)


def test_load_gemma_style_model(tmp_path):
    # Gemma: pad=0, eos=1, bos=2, unk=3.
    path = str(tmp_path / "gemma_like.model")
    _foreign_model(path, pad_id=0, eos_id=1, bos_id=2, unk_id=3, model_type="unigram")
    tok = tokenizer_lib.Tokenizer.load(path)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    ids, mask = tok.pad_batch(tok.encode_batch(["the worm", "all that glitters is not gold"],
                                               add_bos=True, add_eos=True))
    assert ids[0, -1] == 0 and mask[0, -1] == 0
    assert tok.decode_batch(ids) == ["the worm", "all that glitters is not gold"]


def test_load_existing_model_without_pad(tmp_path):
    path = str(tmp_path / "llama_like.model")
    _llama_style_model(path)
    tok = tokenizer_lib.Tokenizer.load(path)
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.pad_id == tok.eos_id  # no pad piece: eos pads, masks do the rest
    ids = tok.encode_batch(["the lazy dog", "gold"], add_bos=True)
    assert tok.decode_batch(ids) == ["the lazy dog", "gold"]
    # Chat markers that are not pieces are spelled out as text instead of becoming unk.
    ids, mask = tok.encode_chat([{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "gold"}])
    assert mask.sum() > 0
    assert tok.sp.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if m]).startswith("gold")
    assert tokenizer_lib.Tokenizer.load(path, pad_id=0).pad_id == 0


def test_prefix_and_stop_ids(tok, tmp_path):
    # Models trained here and Llama/Gemma-style models put bos before a text; generation
    # stops at eos alone unless a checkpoint names more stop ids.
    assert tok.prefix_ids == [tok.bos_id] and tok.stop_ids == (tok.eos_id,)
    assert tok.chat_template is None and tok.special_tokens == {}
    path = str(tmp_path / "no_bos.model")
    _foreign_model(path, unk_id=0, bos_id=-1, eos_id=1, pad_id=-1)
    no_bos = tokenizer_lib.Tokenizer.load(path)
    assert no_bos.bos_id is None and no_bos.prefix_ids == [] and no_bos.pad_id == 1
    assert no_bos.encode("the worm", add_bos=True) == no_bos.encode("the worm")
    ids, _ = no_bos.encode_chat([{"role": "user", "content": "hi"}])
    assert ids.tolist() == (no_bos.marker_ids("<|user|>") + no_bos.encode("hi")
                            + no_bos.marker_ids("<|end|>"))
    assert no_bos.decode_batch([no_bos.encode("the worm") + [1, 5]]) == ["the worm"]


CONVO = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the question"},
    {"role": "assistant", "content": "the lazy dog"},
    {"role": "user", "content": "and then"},
    {"role": "assistant", "content": "not gold"},
]


def _masked_text(tok, ids, mask):
    """Decodes the masked spans, one string per contiguous span."""
    spans, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    end = tok.piece_to_id(tokenizer_lib.DEFAULT_CHAT.end)
    return [(tok.sp.decode([i for i in s if i != end]), s[-1] == end) for s in spans]


def test_chat_mask_all_assistant_turns(tok):
    ids, mask = tok.encode_chat(CONVO)
    assert ids.shape == mask.shape and ids[0] == tok.bos_id
    assert _masked_text(tok, ids, mask) == [("the lazy dog", True), ("not gold", True)]
    markers = [tok.piece_to_id(m) for m in tokenizer_lib.DEFAULT_CHAT.pieces()[:3]]
    assert not mask[np.isin(ids, markers)].any()


def test_chat_mask_last_assistant_turn_only(tok):
    ids, mask = tok.encode_chat(CONVO, loss_on="last_assistant")
    assert _masked_text(tok, ids, mask) == [("not gold", True)]
    ids2, mask2 = tok.encode_chat(CONVO[:4], loss_on="none", add_generation_prompt=True)
    assert mask2.sum() == 0
    assert ids2[-1] == tok.piece_to_id("<|assistant|>")
    # The prompt form is a prefix of the full conversation's ids.
    assert ids.tolist()[:len(ids2)] == ids2.tolist()


def test_chat_rejects_unknown_role(tok):
    with pytest.raises(ValueError, match="unknown chat role"):
        tok.encode_chat([{"role": "robot", "content": "x"}])


@pytest.mark.parametrize("case,reason", [
    ("missing", "cannot be read (No such file or directory)"),
    ("directory", "cannot be read (Is a directory)"),
    ("empty", "not a SentencePiece model (no bytes)"),
    ("text", "not a SentencePiece model"),
    ("html", "not a SentencePiece model"),
])
def test_load_names_the_path_it_could_not_use(tmp_path, case, reason):
    path = tmp_path / "tokenizer.model"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("this is a vocabulary list, not a model\n")
    elif case == "html":
        path.write_bytes(b"<!DOCTYPE html><html>404</html>")
    with pytest.raises(DataError) as err:
        tokenizer_lib.Tokenizer.load(str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}: {reason}") and "\n" not in msg
    assert ".model" in msg.split("; ", 1)[1]     # and says what to point at instead


def test_from_proto_refuses_bytes_that_are_no_model(tok):
    with pytest.raises(DataError, match="^serialized tokenizer: not a SentencePiece model"):
        tokenizer_lib.Tokenizer.from_proto(b"\x00garbage")
    assert tokenizer_lib.Tokenizer.from_proto(tok.serialized()).vocab_size == tok.vocab_size
