"""Tokenizers of Hugging Face checkpoint directories, in and out.

`load_pretrained(directory)` reads what `save_pretrained` writes: `tokenizer.json` (preferred:
GPT-2, Llama 3, Qwen -> `HFTokenizer`) or `tokenizer.model` (Llama 2, Gemma -> the
SentencePiece `Tokenizer`), `tokenizer_config.json` and `special_tokens_map.json` (special
tokens, add_bos_token, chat_template), `chat_template.jinja`, and `generation_config.json` (the
stop ids). `save_pretrained(tok, directory)` writes files `transformers.AutoTokenizer` loads
with the same encoding, special tokens and template. Every unreadable or missing file is a
one-line DataError naming it.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from rlhf_jax.data.records import DataError
from rlhf_jax.data.tokenizer import (BaseTokenizer, HFTokenizer, Tokenizer, first_line)

# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoint directories
# ---------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
FIX_DIRECTORY = ("point at a Hugging Face checkpoint directory, as save_pretrained writes it "
                 "(tokenizer.json or tokenizer.model, tokenizer_config.json, ...)")
_NAMED_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _read_json(directory: str, name: str) -> dict | None:
    """The JSON object in directory/name; None when there is no such file."""
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    fix = f"restore {name} from the checkpoint it came from, or remove it"
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(file=path, reason=f"cannot be read as JSON ({first_line(e)})",
                        fix=fix) from None
    if not isinstance(value, dict):
        raise DataError(file=path, reason=f"expected a JSON object, got {type(value).__name__}",
                        fix=fix)
    return value


def _token_text(value, *, path: str, field: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise DataError(file=path, field=field, reason=f"expected a token string or an AddedToken "
                    f"dict with 'content', got {json.dumps(value)[:60]}",
                    fix="fix tokenizer_config.json")


def _read_chat_template(directory: str, config: dict, config_path: str) -> str | None:
    """chat_template.jinja (what transformers 5 writes) wins over tokenizer_config.json's
    chat_template (a string, or a list of named templates of which "default" is used)."""
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(file=path, reason=f"cannot be read ({first_line(e)})",
                            fix="restore chat_template.jinja, or remove it") from None
    value = config.get("chat_template")
    if value is None:
        value = (_read_json(directory, "chat_template.json") or {}).get("chat_template")
        config_path = os.path.join(directory, "chat_template.json")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if "default" not in named:
            raise DataError(file=config_path, field="chat_template",
                            reason=f"named templates {sorted(map(str, named))} but none named "
                                   "'default'", fix="name the one to use 'default'")
        value = named["default"]
    if value is not None and not isinstance(value, str):
        raise DataError(file=config_path, field="chat_template",
                        reason=f"expected a Jinja template string, got {type(value).__name__}",
                        fix="fix or remove the chat_template entry")
    return value


def _id_list(value, *, path: str, field: str, vocab_size: int) -> list[int]:
    """An id or a list of ids (generation_config.json's eos_token_id), each checked."""
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size):
            raise DataError(file=path, field=field, reason=f"{json.dumps(v)[:60]} is not a "
                            f"token id below the vocabulary size {vocab_size}",
                            fix=f"fix {os.path.basename(path)}")
    return list(values)


def load_pretrained(directory) -> BaseTokenizer:
    """The tokenizer of a Hugging Face checkpoint directory, as `save_pretrained` writes it.

    Reads tokenizer.json (preferred; an `HFTokenizer`) or tokenizer.model (SentencePiece:
    Llama 2, Gemma; a `Tokenizer`), and where present tokenizer_config.json (special tokens,
    add_bos_token, split_special_tokens, chat_template), special_tokens_map.json,
    chat_template.jinja and generation_config.json / config.json (eos, pad and stop ids).
    stop_ids: eos, generation_config.json's eos_token_id(s), and the control token the chat
    template ends an assistant turn with. A missing directory or tokenizer file, or a file
    that cannot be read, raises a DataError naming it.
    """
    directory = str(directory)
    if not os.path.isdir(directory):
        reason = "is not a directory" if os.path.exists(directory) else "no such directory"
        raise DataError(file=directory, reason=reason, fix=FIX_DIRECTORY)
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = _read_json(directory, "tokenizer_config.json") or {}
    smap_path = os.path.join(directory, "special_tokens_map.json")
    smap = _read_json(directory, "special_tokens_map.json") or {}
    gen_path = os.path.join(directory, "generation_config.json")
    gen = _read_json(directory, "generation_config.json") or {}
    model_config = _read_json(directory, "config.json") or {}
    template = _read_chat_template(directory, config, config_path)

    # A key in tokenizer_config.json wins, also when it is null (Qwen: "bos_token": null).
    texts, where = {}, {}
    for key in _NAMED_TOKENS:
        src, path = (config, config_path) if key in config else (smap, smap_path)
        texts[key] = _token_text(src.get(key), path=path, field=key)
        where[key] = path
    for key in ("add_bos_token", "split_special_tokens", "clean_up_tokenization_spaces"):
        if key in config and not isinstance(config[key], bool):
            raise DataError(file=config_path, field=key, reason=f"expected true or false, got "
                            f"{json.dumps(config[key])[:40]}", fix="fix tokenizer_config.json")
    split_special = config.get("split_special_tokens", False)

    json_path, model_path = (os.path.join(directory, f) for f in TOKENIZER_FILES)
    if os.path.exists(json_path):
        import tokenizers

        try:
            backend = tokenizers.Tokenizer.from_file(json_path)
        except Exception as e:  # noqa: BLE001  (the Rust library raises plain Exceptions)
            raise DataError(file=json_path, reason=f"not a tokenizers file ({first_line(e)})",
                            fix="restore tokenizer.json from the checkpoint it came from") from None
        piece_id, token_file = backend.token_to_id, json_path
        vocab_size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    elif os.path.exists(model_path):
        sp_tok = Tokenizer.load(model_path)
        piece_id, token_file, vocab_size = sp_tok._piece_id, model_path, sp_tok.vocab_size
    else:
        raise DataError(file=directory, reason=f"has no tokenizer file (looked for "
                        f"{' and '.join(TOKENIZER_FILES)})", fix=FIX_DIRECTORY)

    def lookup(key):
        if texts[key] is None:
            return None
        idx = piece_id(texts[key])
        if idx is None:
            raise DataError(file=where[key], field=key, reason=f"{texts[key]!r} is not a token "
                            f"of {os.path.basename(token_file)}",
                            fix=f"name a token of {os.path.basename(token_file)}")
        return idx

    def config_id(key):
        for path, src in ((gen_path, gen), (os.path.join(directory, "config.json"),
                                            model_config)):
            if src.get(key) is not None:
                return _id_list(src[key], path=path, field=key, vocab_size=vocab_size)[0]
        return None

    bos_id, eos_id, unk_id = lookup("bos_token"), lookup("eos_token"), lookup("unk_token")
    pad_id = lookup("pad_token")
    pad_id = pad_id if pad_id is not None else config_id("pad_token_id")
    stop_ids = (_id_list(gen["eos_token_id"], path=gen_path, field="eos_token_id",
                         vocab_size=vocab_size) if gen.get("eos_token_id") is not None else [])
    prefix_ids = None
    if "add_bos_token" in config:
        prefix_ids = [bos_id] if config["add_bos_token"] and bos_id is not None else []

    if os.path.exists(json_path):
        eos_id = eos_id if eos_id is not None else config_id("eos_token_id")
        if eos_id is None:
            raise DataError(file=config_path, field="eos_token",
                            reason="no eos token (nor eos_token_id in generation_config.json "
                                   "or config.json)", fix="name the eos_token")
        if unk_id is None and getattr(backend.model, "unk_token", None):
            unk_id = backend.token_to_id(backend.model.unk_token)
        clean_up = (config.get("clean_up_tokenization_spaces", False)
                    and type(backend.model).__name__ != "BPE")
        tok = HFTokenizer(backend, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id, unk_id=unk_id,
                          prefix_ids=prefix_ids, stop_ids=stop_ids, chat_template=template,
                          split_special_tokens=split_special, clean_up_spaces=clean_up)
    else:
        specials = {} if split_special else _spm_special_tokens(
            sp_tok, texts, config, smap, config_path=config_path)
        tok = Tokenizer(sp_tok.sp, sp_tok.serialized(), pad_id=pad_id, bos_id=bos_id,
                        eos_id=eos_id, prefix_ids=prefix_ids, stop_ids=stop_ids,
                        chat_template=template, special_tokens=specials)
    if template is not None:
        tok.stop_ids = tuple(dict.fromkeys(tok.stop_ids + tuple(tok._turn_end_ids())))
    return tok


def _spm_special_tokens(tok: Tokenizer, texts: dict, config: dict, smap: dict, *,
                        config_path: str) -> dict[str, int]:
    """The strings transformers matches as one token in a text, for a SentencePiece model:
    its bos/eos/unk pieces, the named special tokens, additional and added tokens. Only those
    SentencePiece never produces from text (control and unknown pieces) need matching here;
    it matches user-defined pieces itself."""
    sp = tok.sp
    names = [t for t in texts.values() if t is not None]
    names += [sp.id_to_piece(i) for i in (sp.bos_id(), sp.eos_id(), sp.unk_id()) if i >= 0]
    for src in (config, smap):
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = src.get(key) or []
            names += [_token_text(v, path=config_path, field=key)
                      for v in (value.values() if isinstance(value, Mapping) else value)]
    for idx, entry in (config.get("added_tokens_decoder") or {}).items():
        text = _token_text(entry, path=config_path, field="added_tokens_decoder")
        if not str(idx).isdigit() or sp.piece_to_id(text) != int(idx) or (
                text != sp.id_to_piece(sp.unk_id()) and sp.piece_to_id(text) == sp.unk_id()):
            raise DataError(file=config_path, field=f"added_tokens_decoder.{idx}",
                            reason=f"{text!r} is not piece {idx} of tokenizer.model (tokens "
                                   "added beyond a SentencePiece model are not supported)",
                            fix="use the checkpoint's tokenizer.json instead")
        names.append(text)
    out = {}
    for text in names:
        idx = tok._piece_id(text)
        if idx is not None and (sp.is_control(idx) or sp.is_unknown(idx)):
            out[text] = idx
    return out


def _word_level_json(tok: Tokenizer) -> str | None:
    """tokenizer.json for a word-level SentencePiece model (the testbed's), or None for other
    model types.

    transformers converts BPE and unigram SentencePiece models itself, but not word models: it
    reads every text as one unknown token. The equivalent `tokenizers` pipeline is the
    vocabulary as a WordLevel model behind NFKC (SentencePiece's nmt_nfkc, less its control-
    character rules) and a Metaspace split: whitespace-separated words, each with its "▁".
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Tokenizer as TokenizersTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.serialized())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.WORD:
        return None
    vocab = {tok.id_to_piece(i): i for i in range(tok.vocab_size)}
    unk = None if tok.unk_id is None else tok.id_to_piece(tok.unk_id)
    tk = TokenizersTokenizer(models.WordLevel(vocab, unk_token=unk))
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always",
                                                split=True)
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    specials = sorted({i for i in (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id)
                       if i is not None} | set(tok.special_tokens.values()))
    tk.add_special_tokens([tok.id_to_piece(i) for i in specials])
    if tok.prefix_ids:
        bos = tok.id_to_piece(tok.prefix_ids[0])
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.prefix_ids[0])])
    return tk.to_str()


def save_pretrained(tok: BaseTokenizer, directory) -> None:
    """Writes the tokenizer files of a Hugging Face checkpoint, so that
    `transformers.AutoTokenizer.from_pretrained(directory)` (transformers 5) loads a tokenizer
    that encodes and decodes the same, with the same special tokens and chat template, and
    `load_pretrained(directory)` gives this tokenizer back.

    Files: tokenizer.json (HF backend) or tokenizer.model (SentencePiece, loaded by
    transformers' generic `TokenizersBackend`, which follows the model's own normalizer),
    tokenizer_config.json, chat_template.jinja (with a template), and the token ids of
    generation_config.json (stop ids as eos_token_id), merged into one already there.
    """
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)

    def piece(idx):
        return None if idx is None else tok.id_to_piece(idx)

    config = {"tokenizer_class": "TokenizersBackend", "bos_token": piece(tok.bos_id),
              "eos_token": piece(tok.eos_id), "pad_token": piece(tok.pad_id),
              "unk_token": piece(tok.unk_id)}
    if isinstance(tok, Tokenizer):
        tok.save(os.path.join(directory, "tokenizer.model"))
        word_level = _word_level_json(tok)
        json_path = os.path.join(directory, "tokenizer.json")
        if word_level is not None:
            with open(json_path, "w", encoding="utf-8") as f:
                f.write(word_level)
        elif os.path.exists(json_path):
            os.remove(json_path)    # it would be read in place of tokenizer.model
        config.update(add_bos_token=bool(tok.prefix_ids), add_eos_token=False,
                      clean_up_tokenization_spaces=False,
                      # A model read from a bare .model file treats "<s>" in a text as text.
                      split_special_tokens=not tok.special_tokens)
        if tok.special_tokens:
            config["added_tokens_decoder"] = {
                str(i): {"content": s, "special": True, "normalized": False, "lstrip": False,
                         "rstrip": False, "single_word": False}
                for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])}
    else:
        with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tok.to_str())
        # An explicit add_bos_token makes transformers rebuild the post-processor; write it
        # only where the tokenizer.json's own post-processor would prepend something else.
        if tok.prefix_ids != tok._post_processor_prefix():
            config.update(add_bos_token=bool(tok.prefix_ids), add_eos_token=False)
        config.update(split_special_tokens=tok.split_special_tokens,
                      clean_up_tokenization_spaces=tok.clean_up_spaces)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if tok.chat_template is not None:
        with open(jinja_path, "w", encoding="utf-8") as f:
            f.write(tok.chat_template)
    elif os.path.exists(jinja_path):
        os.remove(jinja_path)   # a stale template would be read back as this tokenizer's
    gen = _read_json(directory, "generation_config.json") or {}
    gen.update(bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
               eos_token_id=list(tok.stop_ids) if len(tok.stop_ids) > 1 else tok.eos_id)
    with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2)
