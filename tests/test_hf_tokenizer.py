"""Tokenizers of Hugging Face checkpoints: the `tokenizers` backend, SentencePiece checkpoints,
chat templates and their assistant masks, save/load, checkpoint metadata and stop ids, each
checked against what transformers does with the same files.

Fixtures are made here, once per module: a byte-level BPE tokenizer.json in the style of Qwen
(trained with `tokenizers`, saved by transformers with a ChatML template that has
`{% generation %}` tags), and a SentencePiece model in the style of Gemma (byte fallback, no
dummy prefix, <start_of_turn>/<end_of_turn> pieces) saved as tokenizer.model with a
tokenizer_config.json naming GemmaTokenizer and Gemma's template (no generation tags).
"""

import io
import json
import os
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from rlhf_jax.data import batching, records
from rlhf_jax.data import tokenizer as tokenizer_lib, tokenizer_files
from rlhf_jax.data.records import DataError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "café naïve résumé 東京 日本語 😀 emoji",
    "Hello, how are you?\nI'm fine.\tThanks!",
    "  leading and trailing  spaces  ",
    "be brief and then answer the question 1234 5678",
] * 30

TEXTS = [
    "the lazy dog",
    " leading space",
    "trailing space ",
    "multiple   spaces  here",
    "tab\there\nnew line\n\n",
    "",
    " ",
    "café naïve 東京 日本語 😀",
    "unseen: Ünïcödé €uro 🦀 한국어",
    "a\r\nb",
    "I'm fine, thanks!",
]

# Qwen's ChatML, with the assistant text and its <|im_end|> inside generation tags.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_UNTAGGED = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")

# Gemma's template (as shipped with gemma-2b-it), and a variant with generation tags.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")
GEMMA_TAGGED = GEMMA.replace(
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}",
    "{{ '<start_of_turn>' + role + '\\n' }}{% if role == 'model' %}{% generation %}"
    "{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] | trim + '<end_of_turn>\\n' }}{% endif %}")

CONVO = [
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I'm fine.\nThanks! Ünïcödé €"},
    {"role": "user", "content": "東京?"},
    {"role": "assistant", "content": "日本語 😀 🦀"},
]
SYSTEM_CONVO = [{"role": "system", "content": "be brief"}] + CONVO


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A Qwen-style checkpoint tokenizer: byte-level BPE, NFC, no BOS, <|im_end|> as eos and
    <|endoftext|> as pad, both stop ids in generation_config.json."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
             r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tk = tokenizers.Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHATML)
    path = tmp_path_factory.mktemp("qwen")
    hf.save_pretrained(str(path))
    (path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [tk.token_to_id("<|im_end|>"), tk.token_to_id("<|endoftext|>")],
         "pad_token_id": tk.token_to_id("<|endoftext|>")}))
    return path


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A Gemma-style checkpoint tokenizer: tokenizer.model (pad=0, eos=1, bos=2, unk=3, byte
    fallback) + tokenizer_config.json naming GemmaTokenizer, with Gemma's chat template."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=writer, vocab_size=400, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", byte_fallback=True, add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], character_coverage=1.0,
        num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("gemma")
    (path / "tokenizer.model").write_bytes(writer.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False,
                      "normalized": False, "rstrip": False, "single_word": False,
                      "special": True},
        "chat_template": GEMMA}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    return path


_LOADED = {}


def _load(path):
    """(ours, transformers') tokenizers of a checkpoint directory, read once."""
    if path not in _LOADED:
        _LOADED[path] = (tokenizer_files.load_pretrained(path),
                         transformers.AutoTokenizer.from_pretrained(str(path)))
    return _LOADED[path]


@pytest.fixture(params=["qwen", "gemma"])
def pair(request):
    return _load(request.getfixturevalue(f"{request.param}_dir"))


def _kept(tok, ids):
    """The ids `decode` reads: up to the first stop id, without pad and bos."""
    ids = list(ids)
    cut = next((t for t, i in enumerate(ids) if i in tok.stop_ids), len(ids))
    return [i for i in ids[:cut] if i not in (tok.pad_id, tok.bos_id)]


def _raw_decode(tok, ids):
    """Ids -> text with nothing cut or dropped, through the backend itself."""
    return (tok.tk.decode(ids, skip_special_tokens=False) if tok.backend == "hf"
            else tok.sp.decode(ids))


def _masked_spans(tok, ids, mask):
    """The text of each contiguous run of masked tokens."""
    runs, cur = [], []
    for i, m in zip(list(ids), list(mask)):
        if m:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    return [_raw_decode(tok, r) for r in runs + ([cur] if cur else [])]


def _same_encoding(tok, hf, texts):
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert tok.prefix_ids + ids == hf(text)["input_ids"], text
        assert tok.decode(ids) == hf.decode(_kept(tok, ids)), text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint: ids, encode, decode
# ---------------------------------------------------------------------------------------------

def test_special_ids_from_the_checkpoint(qwen_dir, gemma_dir):
    tok, hf = _load(qwen_dir)
    im_end, eot = hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>")
    assert tok.backend == "hf" and isinstance(tok, tokenizer_lib.BaseTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (None, im_end, eot, None)
    assert tok.prefix_ids == [] and tok.stop_ids == (im_end, eot)
    assert tok.chat_template == hf.chat_template == CHATML
    assert tok.vocab_size == len(hf)

    tok, hf = _load(gemma_dir)
    assert tok.backend == "sentencepiece" and isinstance(tok, tokenizer_lib.Tokenizer)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert tok.prefix_ids == [2]
    assert tok.stop_ids == (1, tok.piece_to_id("<end_of_turn>")) == (1, 5)
    assert tok.chat_template == hf.chat_template == GEMMA


SPECIAL_TEXTS = {
    "qwen": ["<|im_start|>user\nhi<|im_end|>\n", "x<|endoftext|>y", "<|im_end|>"],
    "gemma": ["<start_of_turn>model\nhi<end_of_turn>", "<bos>x <eos> y<unk><pad>", "<eos>"],
}


@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_encode_decode_match_transformers(request, name):
    tok, hf = _load(request.getfixturevalue(f"{name}_dir"))
    _same_encoding(tok, hf, TEXTS + SPECIAL_TEXTS[name])
    # Plain text decodes back to itself; a row stops at its first stop id.
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("the lazy dog")
    assert tok.decode(tok.prefix_ids + ids + [tok.stop_ids[-1]] + ids) == "the lazy dog"


def test_split_special_tokens_reads_special_strings_as_text(qwen_dir, tmp_path):
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(qwen_dir / name, tmp_path / name)
    config = json.loads((qwen_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {**config, "split_special_tokens": True}))
    tok = tokenizer_files.load_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    _same_encoding(tok, hf, SPECIAL_TEXTS["qwen"])
    assert tok.stop_ids[0] not in tok.encode("<|im_end|>")


# ---------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("agp", [False, True])
def test_chat_ids_and_assistant_masks_match_transformers(qwen_dir, agp):
    tok, hf = _load(qwen_dir)
    messages = SYSTEM_CONVO[:-1] if agp else SYSTEM_CONVO
    want = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True, add_generation_prompt=agp)
    ids, mask = tok.encode_chat(messages, add_generation_prompt=agp)
    assert ids.dtype == mask.dtype == np.int32
    assert ids.tolist() == want["input_ids"]
    assert mask.tolist() == want["assistant_masks"]
    assert tok.render_chat(messages, add_generation_prompt=agp) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=agp)
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert _masked_spans(tok, ids, mask) == replies
    _, last = tok.encode_chat(messages, loss_on="last_assistant", add_generation_prompt=agp)
    assert _masked_spans(tok, ids, last) == replies[-1:]
    assert tok.encode_chat(messages, loss_on="none")[1].sum() == 0


def test_spm_chat_masks_match_transformers_through_offsets(gemma_dir):
    # Gemma with generation tags: SentencePiece offsets (bytes, byte-fallback pieces for
    # unseen characters such as "€" and "🦀") map to the same tokens as transformers'.
    tok, hf = _load(gemma_dir)
    tagged = tokenizer_lib.from_meta({**tokenizer_lib.to_meta(tok), "chat_template": GEMMA_TAGGED})
    for messages, agp in ((CONVO, False), (CONVO[:-1], True)):
        want = hf.apply_chat_template(messages, chat_template=GEMMA_TAGGED, tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True,
                                      add_generation_prompt=agp)
        ids, mask = tagged.encode_chat(messages, add_generation_prompt=agp)
        assert ids.tolist() == want["input_ids"]
        assert mask.tolist() == want["assistant_masks"]


def test_template_without_generation_tags_masks_each_turn_as_rendered(qwen_dir, gemma_dir):
    tok, hf = _load(gemma_dir)
    ids, mask = tok.encode_chat(CONVO)
    assert ids.tolist() == hf.apply_chat_template(CONVO, tokenize=True, return_dict=True
                                                  )["input_ids"]
    assert ids[0] == tok.bos_id
    assert _masked_spans(tok, ids, mask) == [
        "I'm fine.\nThanks! Ünïcödé €<end_of_turn>\n", "日本語 😀 🦀<end_of_turn>\n"]
    ids2, mask2 = tok.encode_chat(CONVO, loss_on="last_assistant")
    assert ids2.tolist() == ids.tolist()
    assert _masked_spans(tok, ids, mask2) == ["日本語 😀 🦀<end_of_turn>\n"]

    # The same ChatML without tags: the reply, its <|im_end|> and the newline after it.
    tagged, _ = _load(qwen_dir)
    plain = tokenizer_lib.from_meta({**tokenizer_lib.to_meta(tagged),
                                     "chat_template": CHATML_UNTAGGED})
    ids, mask = plain.encode_chat(SYSTEM_CONVO)
    assert ids.tolist() == tagged.encode_chat(SYSTEM_CONVO)[0].tolist()
    assert _masked_spans(plain, ids, mask) == [
        m["content"] + "<|im_end|>\n" for m in SYSTEM_CONVO if m["role"] == "assistant"]


def test_template_that_refuses_a_conversation(gemma_dir):
    tok, _ = _load(gemma_dir)
    with pytest.raises(tokenizer_lib.ChatTemplateError, match="System role not supported"):
        tok.encode_chat(SYSTEM_CONVO)
    # In a dataset, the refusal names the source and the record.
    source = [{"messages": CONVO}, {"messages": SYSTEM_CONVO}]
    config = batching.BatchConfig(batch_size=2, buckets=(128,), max_prompt_len=64,
                                  shuffle=False, prefetch=0)
    it = batching.make_iterator(source, kind="chat", tokenizer=tok, config=config,
                                name="chats.jsonl")
    with pytest.raises(DataError, match=r"^chats.jsonl: record 1: .*System role not supported"):
        next(it)


@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_chat_prompt_plus_response_is_the_rendering_of_the_conversation(request, name):
    tok, hf = _load(request.getfixturevalue(f"{name}_dir"))
    enc = batching.TextEncoder(tok, format="chat")
    prompt = "\n\nHuman: Hello, how are you?\n\nAssistant: fine\n\nHuman: 東京?\n\nAssistant:"
    response = "日本語 😀 🦀"
    messages = records.hh_to_messages(prompt) + [{"role": "assistant", "content": response}]
    want = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    # ... up to the reply's end-of-turn token, where generation stops too (the template's
    # newline after it opens the next turn), so a reward model reads trained and sampled
    # responses at the same token.
    cut = max(i for i, t in enumerate(want) if t in tok.stop_ids) + 1
    assert len(want) - cut == 1
    assert enc.prompt(prompt) + enc.response(response) == want[:cut]
    end = {"qwen": "<|im_end|>", "gemma": "<end_of_turn>"}[name]
    assert _raw_decode(tok, enc.response(response)) == response + end
    assert tok.decode(enc.response(response)) == response   # cut at the end-of-turn id

    # kind="chat" batches: the template's ids and masks, nothing appended after them.
    config = batching.BatchConfig(batch_size=1, buckets=(128,), max_prompt_len=64,
                                  shuffle=False, prefetch=0)
    batch = next(batching.make_iterator([{"messages": CONVO}], kind="chat", tokenizer=tok,
                                        config=config))
    ids, mask = tok.encode_chat(CONVO)
    n = int(batch["mask"][0].sum())
    assert batch["tokens"][0, :n].tolist() == ids.tolist()
    assert batch["loss_mask"][0, :n].tolist() == mask.tolist()


def test_prompts_without_bos(qwen_dir, gemma_dir):
    qwen, _ = _load(qwen_dir)
    gemma, _ = _load(gemma_dir)
    text = "the quick brown fox jumps over the lazy dog"
    assert batching.TextEncoder(qwen).prompt(text) == qwen.encode(text)
    assert batching.TextEncoder(gemma).prompt(text) == [gemma.bos_id] + gemma.encode(text)
    prompt = batching.TextEncoder(qwen).prompt(text)
    kept, _ = batching.truncate(prompt, [], max_prompt_len=4, max_len=8,
                                prefix=qwen.prefix_ids)
    assert kept == prompt[-4:]
    prompt = batching.TextEncoder(gemma).prompt(text)
    kept, _ = batching.truncate(prompt, [], max_prompt_len=4, max_len=8,
                                prefix=gemma.prefix_ids)
    assert kept == [gemma.bos_id] + prompt[-3:]
    # Without a template, the ChatFormat markers are spelled out and nothing stands for bos.
    plain = tokenizer_lib.from_meta({**tokenizer_lib.to_meta(qwen), "chat_template": None})
    ids, mask = plain.encode_chat(CONVO)
    assert ids.tolist()[:len(plain.encode("<|user|>"))] == plain.encode("<|user|>")
    assert "".join(_masked_spans(plain, ids, mask)).startswith("I'm fine.")


# ---------------------------------------------------------------------------------------------
# Stop ids
# ---------------------------------------------------------------------------------------------

def test_stop_ids_cut_decoding(qwen_dir, gemma_dir, tmp_path):
    tok, _ = _load(qwen_dir)
    im_end, eot = tok.stop_ids
    reply = tok.encode("I'm fine.")
    rows = [reply + [im_end] + tok.encode(" junk"), reply + [eot, 7, 8],
            reply + [tok.pad_id] * 3]
    assert tok.decode_batch(rows) == ["I'm fine."] * 3
    padded, _ = tok.pad_batch(rows)
    assert tok.decode_batch(padded) == ["I'm fine."] * 3
    gemma, _ = _load(gemma_dir)
    end_of_turn = gemma.piece_to_id("<end_of_turn>")
    assert gemma.decode([gemma.bos_id] + gemma.encode("hi") + [end_of_turn, 9]) == "hi"

    # A base-model style config (eos <|endoftext|>, no generation_config.json): the template's
    # end-of-turn token is a stop id too.
    base = tmp_path / "base"
    base.mkdir()
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy(qwen_dir / name, base / name)
    (base / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    assert tokenizer_files.load_pretrained(base).stop_ids == (eot, im_end)


# ---------------------------------------------------------------------------------------------
# Saving, and checkpoint metadata
# ---------------------------------------------------------------------------------------------

def test_save_pretrained_loads_the_same_in_transformers(pair, tmp_path):
    tok, _ = pair
    tokenizer_files.save_pretrained(tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (
        tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id)
    assert hf.chat_template == tok.chat_template
    _same_encoding(tok, hf, TEXTS)
    messages = CONVO if tok.backend == "sentencepiece" else SYSTEM_CONVO
    assert hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == \
        tok.encode_chat(messages)[0].tolist()
    again = tokenizer_files.load_pretrained(tmp_path)
    assert tokenizer_lib.to_meta(again) == tokenizer_lib.to_meta(tok)


def test_save_pretrained_of_a_trained_sentencepiece_model(tmp_path):
    tok = tokenizer_lib.train_sentencepiece(sentences=CORPUS, vocab_size=120)
    tokenizer_files.save_pretrained(tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)
    # "<s>" in a text is text, as SentencePiece has it; the chat markers are single pieces.
    texts = TEXTS + ["<s> x </s> <pad>", "<|user|> hi <|end|>"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert [tok.bos_id] + ids == hf(text)["input_ids"], text
        if tok.unk_id not in ids:   # SentencePiece writes unk as " ⁇ ", transformers "<unk>"
            assert tok.decode(ids) == hf.decode(ids), text
    assert tok.piece_to_id("<|user|>") in tok.encode("<|user|> hi <|end|>")
    again = tokenizer_files.load_pretrained(tmp_path)
    assert tokenizer_lib.to_meta(again) == tokenizer_lib.to_meta(tok)


@pytest.mark.parametrize("name", ["qwen", "gemma", "trained"])
def test_meta_round_trip(request, name):
    if name == "trained":
        tok = tokenizer_lib.train_sentencepiece(sentences=CORPUS, vocab_size=120)
    else:
        tok, _ = _load(request.getfixturevalue(f"{name}_dir"))
    meta = json.loads(json.dumps(tokenizer_lib.to_meta(tok)))
    assert meta["backend"] == tok.backend
    again = tokenizer_lib.from_meta(meta)
    assert type(again) is type(tok) and tokenizer_lib.to_meta(again) == meta
    for attr in ("vocab_size", "bos_id", "eos_id", "pad_id", "unk_id", "prefix_ids",
                 "stop_ids", "chat_template"):
        assert getattr(again, attr) == getattr(tok, attr), attr
    assert again.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert again.decode_batch(tok.encode_batch(TEXTS)) == tok.decode_batch(
        tok.encode_batch(TEXTS))
    messages = SYSTEM_CONVO if name == "qwen" else CONVO
    for a, b in zip(again.encode_chat(messages), tok.encode_chat(messages)):
        assert a.tolist() == b.tolist()


def test_meta_of_older_checkpoints():
    import base64

    tok = tokenizer_lib.train_sentencepiece(sentences=CORPUS, vocab_size=120)
    old = {"model_proto_b64": base64.b64encode(tok.serialized()).decode("ascii"), "pad_id": 0}
    again = tokenizer_lib.from_meta(old)
    assert isinstance(again, tokenizer_lib.Tokenizer)
    assert tokenizer_lib.to_meta(again) == tokenizer_lib.to_meta(tok)
    assert again.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    with pytest.raises(DataError, match="^checkpoint tokenizer metadata: not tokenizer metadata"):
        tokenizer_lib.from_meta({"backend": "hf", "tokenizer_json": "{"})
    with pytest.raises(DataError, match="unknown tokenizer backend 'tiktoken'"):
        tokenizer_lib.from_meta({"backend": "tiktoken"})


# ---------------------------------------------------------------------------------------------
# Load errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,file,reason", [
    ("missing", "", "no such directory"),
    ("empty", "", "has no tokenizer file (looked for tokenizer.json and tokenizer.model)"),
    ("corrupt_json", "tokenizer.json", "not a tokenizers file"),
    ("corrupt_model", "tokenizer.model", "not a SentencePiece model"),
    ("corrupt_config", "tokenizer_config.json", "cannot be read as JSON"),
    ("corrupt_generation", "generation_config.json", "cannot be read as JSON"),
    ("unknown_eos", "tokenizer_config.json", "field 'eos_token': '<|nope|>' is not a token"),
    ("bad_stop", "generation_config.json", "field 'eos_token_id': 99999 is not a token id"),
])
def test_load_errors_name_the_file(qwen_dir, tmp_path, case, file, reason):
    path = tmp_path / "ckpt"
    if case != "missing":
        path.mkdir()
    if case in ("corrupt_config", "corrupt_generation", "unknown_eos", "bad_stop"):
        shutil.copy(qwen_dir / "tokenizer.json", path / "tokenizer.json")
    if case == "corrupt_json":
        (path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    elif case == "corrupt_model":
        (path / "tokenizer.model").write_bytes(b"<!DOCTYPE html><html>404</html>")
    elif case == "corrupt_config":
        (path / "tokenizer_config.json").write_text("{'eos_token': ")
    elif case == "corrupt_generation":
        (path / "generation_config.json").write_text("")
    elif case == "unknown_eos":
        (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    elif case == "bad_stop":
        (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 99999]}))
    with pytest.raises(DataError) as err:
        tokenizer_files.load_pretrained(path)
    msg = str(err.value)
    where = os.path.join(str(path), file) if file else str(path)
    assert msg.startswith(f"{where}: {reason}"), msg
    assert "\n" not in msg and "; " in msg       # one line, with what to do about it
