"""Tokenizers behind one interface: SentencePiece and Hugging Face `tokenizers`, with chat
formats (the checkpoint's Jinja template, see chat_template.py, or role markers) and
assistant-only loss masks.

Ways to get a tokenizer:

- `train_sentencepiece(sentences=..., vocab_size=..., model_type="bpe")` (or "unigram", "word")
  trains a model in memory with pad=0, unk=1, bos=2, eos=3 and the chat role markers as single
  pieces;
- `Tokenizer.load(path)` reads any existing SentencePiece `.model` file, e.g. the ones Llama 2
  (unk=0, bos=1, eos=2, no pad) and Gemma (pad=0, eos=1, bos=2, unk=3) ship;
- `Tokenizer.from_proto(bytes)` restores one from `tokenizer.serialized()`;
- `tokenizer_files.load_pretrained(directory)` reads the tokenizer of a Hugging Face
  checkpoint directory (`tokenizer.json` -> `HFTokenizer`: GPT-2, Llama 3, Qwen; else
  `tokenizer.model` -> `Tokenizer`: Llama 2, Gemma) with its special tokens, chat template
  and stop ids; `tokenizer_files.save_pretrained(tok, directory)` writes them back;
- `from_meta(to_meta(tok))`: the JSON-able form a checkpoint stores.

Both backends share `BaseTokenizer`: vocab_size, bos_id (None when the model has no BOS, e.g.
Qwen), eos_id, pad_id, unk_id, `prefix_ids` (what the model's tokenizer puts before a text),
`stop_ids` (eos and end-of-turn ids, where generation stops), `chat_template`, encode/decode,
padding and `encode_chat`.

Axis letters: B batch, T tokens.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import re
from typing import Iterable, Mapping, Sequence

import numpy as np
import sentencepiece as spm

from rlhf_jax.data.chat_template import (HAS_GENERATION_TAG, ChatTemplateError,
                                         compile_template, span_mask, strip_generation_marks)
from rlhf_jax.data.records import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
LOSS_ON = ("all_assistant", "last_assistant", "none")


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """Role markers of the chat format. Each marker is one special piece in models trained here.

    A conversation is encoded as
        [bos] <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...
    and the loss mask covers assistant text and the `<|end|>` closing it (the model has to learn
    to stop), never the role markers or other turns.
    """

    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"

    def pieces(self) -> tuple[str, ...]:
        """The marker strings, in the order they get ids when training."""
        return (self.system, self.user, self.assistant, self.end)

    def marker(self, role: str) -> str:
        """The marker that opens a turn of `role`."""
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role {role!r}; expected system, user or assistant")
        return getattr(self, role)


DEFAULT_CHAT = ChatFormat()


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------

class BaseTokenizer:
    """What every tokenizer offers. A backend sets the ids in `__init__` (via `_configure`)
    and implements `_encode_text`, `_encode_offsets`, `_decode_ids`, `_piece_id`,
    `id_to_piece` and `_is_control`.

    vocab_size: ids are < vocab_size. bos_id, unk_id: None where the model has none.
    pad_id: the model's pad token, else eos (padding positions are always masked out).
    prefix_ids: ids the model's tokenizer puts before a text ([bos] for Llama and Gemma,
      [] for Qwen and GPT-2); prompts start with them.
    stop_ids: ids at which generation stops: eos first, then end-of-turn tokens such as
      `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`.
    chat_template: the checkpoint's Jinja chat template, or None (then `encode_chat` uses
      the `ChatFormat` markers).
    """

    backend = ""
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    unk_id: int | None
    prefix_ids: list[int]
    stop_ids: tuple[int, ...]
    chat_template: str | None

    def _configure(self, *, vocab_size: int, bos_id, eos_id, pad_id, unk_id,
                   prefix_ids: Sequence[int] | None, stop_ids: Sequence[int],
                   chat_template: str | None) -> None:
        self.vocab_size = int(vocab_size)
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_id = None if eos_id is None else int(eos_id)
        self.unk_id = None if unk_id is None else int(unk_id)
        self.pad_id = int(pad_id) if pad_id is not None and pad_id >= 0 else self.eos_id
        if prefix_ids is None:
            prefix_ids = [] if self.bos_id is None else [self.bos_id]
        self.prefix_ids = [int(i) for i in prefix_ids]
        # eos first, each id once, in the order given.
        self.stop_ids = tuple(dict.fromkeys(
            int(i) for i in [self.eos_id, *stop_ids] if i is not None))
        self.chat_template = chat_template or None

    @property
    def core_vocab_size(self) -> int:
        """Ids below this are the model's own vocabulary; added tokens may lie above it (Gemma
        3's image tokens beyond its text embedding table)."""
        return self.vocab_size

    def special_ids(self) -> set[int]:
        """Every id this tokenizer writes on its own: bos/eos/pad/unk, prefix and stop ids."""
        ids = {self.bos_id, self.eos_id, self.pad_id, self.unk_id, *self.prefix_ids,
               *self.stop_ids}
        return {i for i in ids if i is not None}

    def same_ids(self, other: "BaseTokenizer") -> bool:
        """True when `other` maps every id to the same piece and has the same special ids: the
        token ids of one are the token ids of the other (templates and settings aside)."""
        if (self.vocab_size != other.vocab_size or self.eos_id != other.eos_id
                or self.bos_id != other.bos_id or self.prefix_ids != other.prefix_ids):
            return False
        return all(self.id_to_piece(i) == other.id_to_piece(i) for i in range(self.vocab_size))

    # -- backend hooks ----------------------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._encode_text(t) for t in texts]

    def _encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` with the (start, end) character span each token came from."""
        raise NotImplementedError

    def _decode_ids(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _piece_id(self, piece: str) -> int | None:
        """Id of a piece, None when it is not one piece of the vocabulary."""
        raise NotImplementedError

    def _is_control(self, idx: int) -> bool:
        """True for special tokens that stand for no text (eos, `<|im_end|>`, ...)."""
        raise NotImplementedError

    def id_to_piece(self, idx: int) -> str:
        """The piece string of an id."""
        raise NotImplementedError

    # -- pieces -----------------------------------------------------------------------------
    def piece_to_id(self, piece: str) -> int:
        """Id of a piece (unk id when it is not in the vocabulary; KeyError without unk)."""
        idx = self._piece_id(piece)
        if idx is not None:
            return idx
        if self.unk_id is None:
            raise KeyError(f"{piece!r} is not a piece of the vocabulary (no unk token)")
        return self.unk_id

    def has_piece(self, piece: str) -> bool:
        """True when `piece` is a single piece of the vocabulary (not mapped to unk)."""
        return self._piece_id(piece) is not None

    # -- encode / decode --------------------------------------------------------------------
    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids + [self.eos_id] if add_eos else ids

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """One string -> list of ids. add_bos prepends bos where the model has one."""
        return self._wrap(self._encode_text(text), add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        """B strings -> B lists of ids (ragged; see `pad_batch` for a [B, T] array)."""
        return [self._wrap(r, add_bos, add_eos) for r in self._encode_texts(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. Stops at the first stop id and drops pad/bos, so sampled rows decode
        cleanly."""
        return self.decode_batch([ids])[0]

    def decode_batch(self, ids_bt) -> list[str]:
        """[B, T] ids (array or ragged lists) -> B strings, each cut at its first stop id."""
        stops, drop = set(self.stop_ids), {self.pad_id, self.bos_id}
        out = []
        for row in ids_bt:
            row = [int(i) for i in row]
            cut = next((t for t, i in enumerate(row) if i in stops), len(row))
            out.append(self._decode_ids([i for i in row[:cut] if i not in drop]))
        return out

    def pad_batch(self, rows: Sequence[Sequence[int]], *, length: int | None = None,
                  left: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Ragged ids -> (ids [B, T] int32, mask [B, T] int32), right- (default) or left-padded."""
        length = max((len(r) for r in rows), default=0) if length is None else length
        ids = np.full((len(rows), length), self.pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for b, r in enumerate(rows):
            if len(r) > length:
                raise ValueError(f"row {b} has {len(r)} tokens, more than length={length}")
            sl = slice(length - len(r), length) if left else slice(0, len(r))
            ids[b, sl] = r
            mask[b, sl] = 1
        return ids, mask

    # -- chat -------------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict], *, loss_on: str = "all_assistant",
                    add_bos: bool = True, add_generation_prompt: bool = False,
                    chat: ChatFormat = DEFAULT_CHAT) -> tuple[np.ndarray, np.ndarray]:
        """Multi-turn conversation -> (ids [T] int32, loss_mask [T] int32).

        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
        loss_on: "all_assistant" puts the loss on every assistant turn, "last_assistant" only on
          the final one (e.g. the response of a preference pair), "none" on nothing (prompts).
        add_generation_prompt: end with what opens an assistant turn, so a sampler continues
          as the assistant.

        With a `chat_template` the conversation is rendered by it and the rendered text is
        tokenized without adding special tokens (the template writes them; `add_bos` and
        `chat` are not used). The loss covers the text inside the template's
        `{% generation %}` blocks, or, for a template without them, each assistant turn as
        rendered: from the end of the conversation before it with a generation prompt to the
        end of the conversation including it (its end-of-turn text included).

        Without a template: `[prefix] <marker> text <end> ...` with the `chat` markers, the
        loss on assistant text and the `<end>` closing it. Markers must be single pieces
        (true for models from `train_sentencepiece`); for a model without them (Llama 2,
        Gemma) the marker text is encoded as ordinary text instead.
        """
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={loss_on!r}; expected all_assistant, last_assistant or none")
        if self.chat_template is not None:
            return self._encode_chat_template(messages, loss_on=loss_on,
                                              add_generation_prompt=add_generation_prompt)
        last_asst = max((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                        default=-1)
        ids: list[int] = list(self.prefix_ids) if add_bos else []
        mask: list[int] = [0] * len(ids)
        for i, msg in enumerate(messages):
            on = msg["role"] == "assistant" and (
                loss_on == "all_assistant" or (loss_on == "last_assistant" and i == last_asst))
            head = self.marker_ids(chat.marker(msg["role"]))
            body = self.encode(msg["content"]) + self.marker_ids(chat.end)
            ids += head + body
            mask += [0] * len(head) + [int(on)] * len(body)
        if add_generation_prompt:
            head = self.marker_ids(chat.assistant)
            ids += head
            mask += [0] * len(head)
        return np.asarray(ids, np.int32), np.asarray(mask, np.int32)

    def marker_ids(self, marker: str) -> list[int]:
        """Ids of a chat marker: its single piece, or its text encoded where it is no piece."""
        if self.has_piece(marker):
            return [self.piece_to_id(marker)]
        return self.encode(marker)

    def render_chat(self, messages: Sequence[dict], *,
                    add_generation_prompt: bool = False) -> str:
        """The conversation as text, rendered by the chat template (as transformers'
        `apply_chat_template(..., tokenize=False)`). Needs a `chat_template`."""
        return self._render(messages, add_generation_prompt)[0]

    def _template_variables(self) -> dict:
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id,
                 "unk_token": self.unk_id}
        return {k: self.id_to_piece(i) for k, i in names.items() if i is not None}

    def _render(self, messages, add_generation_prompt) -> tuple[str, list[tuple[int, int]]]:
        """(rendered text, character spans of its `{% generation %}` blocks)."""
        import jinja2

        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template")
        template = compile_template(self.chat_template)
        try:
            text = template.render(messages=[dict(m) for m in messages], tools=None,
                                   documents=None, add_generation_prompt=add_generation_prompt,
                                   **self._template_variables())
        except Exception as e:  # noqa: BLE001  (a checkpoint's template is foreign code)
            reason = " ".join(str(e).split()) or type(e).__name__
            if not isinstance(e, jinja2.TemplateError):
                reason = f"{type(e).__name__}: {reason}"
            raise ChatTemplateError(f"chat template: {reason}") from None
        return strip_generation_marks(text)

    def _encode_chat_template(self, messages, *, loss_on, add_generation_prompt):
        text, gen_spans = self._render(messages, add_generation_prompt)
        ids, offsets = self._encode_offsets(text)
        if loss_on == "none":
            spans = []
        elif HAS_GENERATION_TAG.search(self.chat_template):
            spans = gen_spans if loss_on == "all_assistant" else gen_spans[-1:]
        else:
            spans = self._turn_spans(messages, text, last_only=loss_on == "last_assistant")
        return np.asarray(ids, np.int32), span_mask(offsets, spans)

    def _turn_spans(self, messages, text: str, *, last_only: bool) -> list[tuple[int, int]]:
        """Character spans of the assistant turns of a template without generation tags: the
        text each assistant message adds after the generation prompt before it."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        spans = []
        for i in turns[-1:] if last_only else turns:
            head = self.render_chat(messages[:i], add_generation_prompt=True)
            upto = self.render_chat(messages[:i + 1])
            if not (upto.startswith(head) and text.startswith(upto)):
                raise ChatTemplateError(
                    f"chat template renders assistant turn {i} differently once later turns "
                    "follow, so its loss mask cannot be read from the rendering; add "
                    "{% generation %}...{% endgeneration %} around assistant text in the "
                    "template")
            spans.append((len(head), len(upto)))
        return spans

    def chat_response_ids(self, text: str) -> list[int]:
        """Ids of an assistant reply as the chat template closes it: the rendering of
        [user, assistant: text] after its generation prompt (reply and end-of-turn text), so
        that encode_chat(prompt, add_generation_prompt=True) + these ids is the rendering of
        the whole conversation. Needs a `chat_template`."""
        return self._encode_text(self._response_text(text))

    def _response_text(self, text: str) -> str:
        probe = [{"role": "user", "content": "?"}]
        head = self.render_chat(probe, add_generation_prompt=True)
        full = self.render_chat(probe + [{"role": "assistant", "content": text}])
        if not full.startswith(head):
            raise ChatTemplateError(
                "chat template renders an assistant reply without the generation prompt "
                "before it, so a response cannot be appended to a prompt")
        return full[len(head):]

    def _turn_end_ids(self) -> list[int]:
        """The control token the chat template closes an assistant turn with (`<|im_end|>`,
        `<|eot_id|>`, `<end_of_turn>`), as a list of at most one id."""
        reply = "Reply"
        try:
            suffix = self._response_text(reply)
        except ChatTemplateError:
            return []
        end = suffix.find(reply) + len(reply)
        ids, offsets = self._encode_offsets(suffix)
        after = [i for i, (s, _) in zip(ids, offsets) if s >= end]
        return after[:1] if end >= len(reply) and after and self._is_control(after[0]) else []


# ---------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------

class Tokenizer(BaseTokenizer):
    """A SentencePiece processor with the ids this codebase needs and batch encode/decode.

    The ids are the model's own unless given: bos_id / eos_id None take the model's, pad_id
    None the model's pad piece, else eos; prefix_ids None is [bos] (Llama 2 and Gemma put bos
    before a text, and so does this codebase for models trained here).
    special_tokens: strings that stand for one control piece wherever they occur in a text
    (as transformers matches a checkpoint's special tokens, e.g. "<bos>"), and are written
    back when decoding; empty for a model read from a bare .model file, where such text is
    ordinary text as in SentencePiece.
    """

    backend = "sentencepiece"

    def __init__(self, processor: spm.SentencePieceProcessor, model_proto: bytes, *,
                 pad_id: int | None = None, bos_id: int | None = None,
                 eos_id: int | None = None, prefix_ids: Sequence[int] | None = None,
                 stop_ids: Sequence[int] = (), chat_template: str | None = None,
                 special_tokens: Mapping[str, int] | None = None):
        self.sp = processor
        self._proto = model_proto

        def own(idx):
            return idx if idx >= 0 else None

        if pad_id is None:
            pad_id = own(processor.pad_id())
        # Llama-2 style models reserve no pad piece. Padding positions are always masked out, so
        # any id works; eos is the usual choice and keeps embeddings in range.
        self._configure(vocab_size=processor.get_piece_size(),
                        bos_id=own(processor.bos_id()) if bos_id is None else bos_id,
                        eos_id=own(processor.eos_id()) if eos_id is None else eos_id,
                        pad_id=pad_id, unk_id=processor.unk_id(), prefix_ids=prefix_ids,
                        stop_ids=stop_ids, chat_template=chat_template)
        self.special_tokens = {str(s): int(i) for s, i in (special_tokens or {}).items()}
        self._special_text = {i: s for s, i in self.special_tokens.items()}
        # Longest first, so a special string that contains another wins.
        self._special_re = re.compile("|".join(
            re.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True))
        ) if self.special_tokens else None

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_proto(cls, model_proto: bytes, *, pad_id: int | None = None,
                   name: str = "serialized tokenizer", **settings) -> "Tokenizer":
        """Builds a tokenizer from serialized model bytes (what `serialized()` returns).
        Bytes that are not a SentencePiece model raise a DataError naming `name`. `settings`:
        the keyword arguments of `Tokenizer(...)` (bos_id, stop_ids, chat_template, ...)."""
        def fail(reason):
            raise DataError(file=name, reason=f"not a SentencePiece model ({reason})",
                            fix="point at a SentencePiece .model file (e.g. Llama 2's or "
                                "Gemma's tokenizer.model) or one written by Tokenizer.save")

        # SentencePiece accepts empty bytes as a model with no pieces; nothing encodes with it.
        if not model_proto:
            fail("no bytes")
        try:
            sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError:
            # SentencePiece's own message is a C++ source location, no help to the reader.
            fail("the bytes do not parse as one")
        if sp.get_piece_size() == 0:
            fail("no pieces")
        return cls(sp, bytes(model_proto), pad_id=pad_id, **settings)

    @classmethod
    def load(cls, path: str, *, pad_id: int | None = None, **settings) -> "Tokenizer":
        """Loads an existing SentencePiece `.model` file (Llama 2, Gemma, or one saved here).
        A path that cannot be read, or a file that is no SentencePiece model, raises a
        DataError naming the path."""
        path = str(path)
        try:
            with open(path, "rb") as f:
                proto = f.read()
        except OSError as e:
            raise DataError(file=path, reason=f"cannot be read ({e.strerror or e})",
                            fix="pass the path of a SentencePiece .model file") from None
        return cls.from_proto(proto, pad_id=pad_id, name=path, **settings)

    def serialized(self) -> bytes:
        """The model as bytes, to store next to a checkpoint."""
        return self._proto

    def save(self, path: str) -> None:
        """Writes the model as a `.model` file that `Tokenizer.load` and SentencePiece read."""
        with open(path, "wb") as f:
            f.write(self._proto)

    # -- backend hooks ----------------------------------------------------------------------
    def _chunks(self, text: str) -> Iterable[tuple[int, str, int | None]]:
        """(start, text, special id or None) pieces of `text`, split at special tokens."""
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                yield pos, text[pos:m.start()], None
            yield m.start(), m.group(), self.special_tokens[m.group()]
            pos = m.end()
        if pos < len(text) or not text:
            yield pos, text[pos:], None

    def _encode_text(self, text: str) -> list[int]:
        # A str, not a one-element list: sentencepiece encodes a list on a thread pool, whose
        # start-up costs ~20x the encoding of one short string.
        if self._special_re is None:
            return self.sp.encode(text)
        ids = []
        for _, chunk, special in self._chunks(text):
            ids += [special] if special is not None else self.sp.encode(chunk)
        return ids

    def _encode_texts(self, texts):
        if self._special_re is None:
            return self.sp.encode(texts)
        return [self._encode_text(t) for t in texts]

    def _encode_offsets(self, text):
        ids, offsets = [], []
        chunks = [(0, text, None)] if self._special_re is None else self._chunks(text)
        for start, chunk, special in chunks:
            if special is not None:
                ids.append(special)
                offsets.append((start, start + len(chunk)))
                continue
            # SentencePiece reports byte offsets into the UTF-8 of the chunk; a piece holding
            # part of a character (byte fallback) gets the whole character, as in transformers.
            lens = np.array([len(c.encode("utf-8")) for c in chunk], np.int64)
            ends = np.cumsum(lens)
            starts = ends - lens
            for p in self.sp.encode_as_proto(chunk).pieces:
                ids.append(p.id)
                offsets.append((start + int(np.searchsorted(ends, p.begin, "right")),
                                start + int(np.searchsorted(starts, p.end, "left"))))
        return ids, offsets

    def _decode_ids(self, ids):
        if not self.special_tokens:
            return self.sp.decode(ids)
        # Special tokens read back as their strings (SentencePiece writes nothing for control
        # pieces), so that decoding inverts encoding as in transformers.
        text, run = [], []
        for i in ids:
            if i in self._special_text:
                text += [self.sp.decode(run), self._special_text[i]]
                run = []
            else:
                run.append(i)
        return "".join(text + [self.sp.decode(run)])

    def _piece_id(self, piece):
        idx = self.sp.piece_to_id(piece)
        return idx if idx != self.unk_id or piece == self.sp.id_to_piece(self.unk_id) else None

    def _is_control(self, idx):
        return (self.sp.is_control(idx) or idx in self.special_tokens.values()
                or idx in self._user_defined_ids)

    @functools.cached_property
    def _user_defined_ids(self) -> set[int]:
        # Chat markers such as Gemma's <end_of_turn> are user-defined pieces: atomic in any
        # text, and standing for no ordinary text.
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        model = model_pb2.ModelProto()
        model.ParseFromString(self._proto)
        user_defined = model_pb2.ModelProto.SentencePiece.USER_DEFINED
        return {i for i, p in enumerate(model.pieces) if p.type == user_defined}

    def id_to_piece(self, idx: int) -> str:
        """The piece string of an id."""
        return self.sp.id_to_piece(int(idx))


SentencePieceTokenizer = Tokenizer


def train_sentencepiece(*, sentences: Iterable[str], vocab_size: int, model_type: str = "bpe",
                        user_defined_symbols: Sequence[str] = (),
                        chat: ChatFormat | None = DEFAULT_CHAT, character_coverage: float = 1.0,
                        hard_vocab_limit: bool = True, seed_sentencepiece_size: int = 100_000,
                        model_path: str | None = None) -> Tokenizer:
    """Trains a SentencePiece model in memory and returns it as a `Tokenizer`.

    Ids: pad=0, unk=1, bos=2, eos=3, then the chat markers (one piece each) and
    `user_defined_symbols`, then learned pieces. model_type: "bpe", "unigram", "word" or "char".
    `model_path`, if given, also writes the `.model` file. Training is single-threaded so the
    result is identical across runs and processes.
    """
    specials = list(chat.pieces() if chat is not None else ()) + list(user_defined_symbols)
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=writer, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        user_defined_symbols=specials, character_coverage=character_coverage,
        hard_vocab_limit=hard_vocab_limit, seed_sentencepiece_size=seed_sentencepiece_size,
        num_threads=1, minloglevel=2)
    tok = Tokenizer.from_proto(writer.getvalue())
    if model_path is not None:
        tok.save(model_path)
    return tok


# ---------------------------------------------------------------------------------------------
# Hugging Face `tokenizers`
# ---------------------------------------------------------------------------------------------

# transformers' `clean_up_tokenization_spaces` (it applies it to all but BPE models).
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class HFTokenizer(BaseTokenizer):
    """A Hugging Face `tokenizers.Tokenizer` (a checkpoint's tokenizer.json: GPT-2, Llama 3,
    Qwen, ...) with the interface of `BaseTokenizer`. Text is encoded as transformers encodes
    it with add_special_tokens=False: special-token strings in the text become their ids
    unless split_special_tokens is set."""

    backend = "hf"

    def __init__(self, tokenizer, *, eos_id: int, bos_id: int | None = None,
                 pad_id: int | None = None, unk_id: int | None = None,
                 prefix_ids: Sequence[int] | None = None, stop_ids: Sequence[int] = (),
                 chat_template: str | None = None, split_special_tokens: bool = False,
                 clean_up_spaces: bool = False):
        self.tk = tokenizer
        self.tk.encode_special_tokens = bool(split_special_tokens)
        self.split_special_tokens = bool(split_special_tokens)
        self.clean_up_spaces = bool(clean_up_spaces)
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._control = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        if prefix_ids is None:
            prefix_ids = self._post_processor_prefix()
        self._configure(vocab_size=max(vocab.values(), default=-1) + 1, bos_id=bos_id,
                        eos_id=eos_id, pad_id=pad_id, unk_id=unk_id, prefix_ids=prefix_ids,
                        stop_ids=stop_ids, chat_template=chat_template)

    @property
    def core_vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=False)

    @classmethod
    def from_str(cls, tokenizer_json: str, **settings) -> "HFTokenizer":
        """From the text of a tokenizer.json; `settings` are the keyword arguments of
        `HFTokenizer(...)`."""
        import tokenizers

        return cls(tokenizers.Tokenizer.from_str(tokenizer_json), **settings)

    def to_str(self) -> str:
        """The tokenizer.json text."""
        return self.tk.to_str()

    def _post_processor_prefix(self) -> list[int]:
        """The ids the tokenizer.json's post-processor puts before a text."""
        plain = self.tk.encode("a", add_special_tokens=False).ids
        full = self.tk.encode("a", add_special_tokens=True).ids
        for k in range(len(full) - len(plain) + 1):
            if full[k:k + len(plain)] == plain:
                return full[:k]
        return []

    # -- backend hooks ----------------------------------------------------------------------
    def _encode_text(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def _encode_texts(self, texts):
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def _encode_offsets(self, text):
        enc = self.tk.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def _decode_ids(self, ids):
        text = self.tk.decode(ids, skip_special_tokens=False)
        if self.clean_up_spaces:
            for a, b in _CLEANUPS:
                text = text.replace(a, b)
        return text

    def _piece_id(self, piece):
        return self.tk.token_to_id(piece)

    def _is_control(self, idx):
        return idx in self._control

    def id_to_piece(self, idx: int) -> str:
        """The token string of an id."""
        return self.tk.id_to_token(int(idx))


# ---------------------------------------------------------------------------------------------
# Checkpoint metadata
# ---------------------------------------------------------------------------------------------

def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors
    that quote a library's own complaint."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def to_meta(tok: BaseTokenizer) -> dict:
    """The tokenizer as a JSON-able dict, tagged with its backend, for a checkpoint."""
    meta = {"backend": tok.backend, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": tok.pad_id, "unk_id": tok.unk_id, "prefix_ids": list(tok.prefix_ids),
            "stop_ids": list(tok.stop_ids), "chat_template": tok.chat_template}
    if isinstance(tok, Tokenizer):
        meta.update(model_proto_b64=base64.b64encode(tok.serialized()).decode("ascii"),
                    special_tokens=dict(tok.special_tokens))
    else:
        meta.update(tokenizer_json=tok.to_str(), split_special_tokens=tok.split_special_tokens,
                    clean_up_spaces=tok.clean_up_spaces)
    return meta


def from_meta(meta: Mapping, *, name: str = "checkpoint tokenizer metadata") -> BaseTokenizer:
    """The tokenizer `to_meta` stored. Also reads the older form {"model_proto_b64", "pad_id"}
    (a SentencePiece model) of checkpoints written before there were two backends."""
    fix = "resume from a checkpoint written by rlhf_jax, or start afresh in a new workdir"
    try:
        backend = meta.get("backend", "sentencepiece")
        common = {k: meta[k] for k in ("bos_id", "eos_id", "prefix_ids", "stop_ids",
                                       "chat_template") if k in meta}
        if backend == "sentencepiece":
            proto = base64.b64decode(meta["model_proto_b64"], validate=True)
            return Tokenizer.from_proto(proto, pad_id=meta.get("pad_id"), name=name,
                                        special_tokens=meta.get("special_tokens"), **common)
        if backend == "hf":
            return HFTokenizer.from_str(
                meta["tokenizer_json"], pad_id=meta.get("pad_id"), unk_id=meta.get("unk_id"),
                split_special_tokens=meta.get("split_special_tokens", False),
                clean_up_spaces=meta.get("clean_up_spaces", False), **common)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (damaged metadata fails in many ways)
        raise DataError(file=name, reason=f"not tokenizer metadata ({type(e).__name__}: "
                        f"{first_line(e)})", fix=fix) from None
    raise DataError(file=name, reason=f"unknown tokenizer backend {backend!r} (expected "
                    "'sentencepiece' or 'hf')", fix=fix)
