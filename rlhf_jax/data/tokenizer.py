"""SentencePiece tokenizers and a multi-turn chat format with assistant-only loss masks.

Three ways to get a `Tokenizer`:

- `train_sentencepiece(sentences=..., vocab_size=..., model_type="bpe")` (or "unigram", "word")
  trains a model in memory with pad=0, unk=1, bos=2, eos=3 and the chat role markers as single
  pieces;
- `Tokenizer.load(path)` reads any existing SentencePiece `.model` file, e.g. the ones Llama 2
  (unk=0, bos=1, eos=2, no pad) and Gemma (pad=0, eos=1, bos=2, unk=3) ship;
- `Tokenizer.from_proto(bytes)` restores one from `tokenizer.serialized()`, which is how a
  checkpoint stores it.

Axis letters: B batch, T tokens.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from rlhf_jax.data.records import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


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


class Tokenizer:
    """A SentencePiece processor with the ids this codebase needs and batch encode/decode."""

    def __init__(self, processor: spm.SentencePieceProcessor, model_proto: bytes, *,
                 pad_id: int | None = None):
        self.sp = processor
        self._proto = model_proto
        self.vocab_size = processor.get_piece_size()
        self.unk_id = processor.unk_id()
        self.bos_id = processor.bos_id()
        self.eos_id = processor.eos_id()
        if pad_id is None:
            pad_id = processor.pad_id()
        # Llama-2 style models reserve no pad piece. Padding positions are always masked out, so
        # any id works; eos is the usual choice and keeps embeddings in range.
        self.pad_id = pad_id if pad_id >= 0 else self.eos_id

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_proto(cls, model_proto: bytes, *, pad_id: int | None = None,
                   name: str = "serialized tokenizer") -> "Tokenizer":
        """Builds a tokenizer from serialized model bytes (what `serialized()` returns).
        Bytes that are not a SentencePiece model raise a DataError naming `name`."""
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
        return cls(sp, bytes(model_proto), pad_id=pad_id)

    @classmethod
    def load(cls, path: str, *, pad_id: int | None = None) -> "Tokenizer":
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
        return cls.from_proto(proto, pad_id=pad_id, name=path)

    def serialized(self) -> bytes:
        """The model as bytes, to store next to a checkpoint."""
        return self._proto

    def save(self, path: str) -> None:
        """Writes the model as a `.model` file that `Tokenizer.load` and SentencePiece read."""
        with open(path, "wb") as f:
            f.write(self._proto)

    # -- pieces ---------------------------------------------------------------------------------
    def piece_to_id(self, piece: str) -> int:
        """Id of a piece (unk id when it is not in the vocabulary)."""
        return self.sp.piece_to_id(piece)

    def id_to_piece(self, idx: int) -> str:
        """The piece string of an id."""
        return self.sp.id_to_piece(int(idx))

    def has_piece(self, piece: str) -> bool:
        """True when `piece` is a single piece of the vocabulary (not mapped to unk)."""
        idx = self.sp.piece_to_id(piece)
        return idx != self.unk_id or piece == self.sp.id_to_piece(self.unk_id)

    # -- encode / decode ------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """One string -> list of ids."""
        # A str, not a one-element list: sentencepiece encodes a list on a thread pool, whose
        # start-up costs ~20x the encoding of one short string.
        return self.sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        """B strings -> B lists of ids (ragged; see `pad_batch` for a [B, T] array)."""
        return self.sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. Stops at the first eos and drops pad/bos, so sampled rows decode cleanly."""
        return self.decode_batch([ids])[0]

    def decode_batch(self, ids_bt) -> list[str]:
        """[B, T] ids (array or ragged lists) -> B strings, each cut at its first eos."""
        out = []
        for row in ids_bt:
            row = [int(i) for i in row]
            if self.eos_id in row:
                row = row[:row.index(self.eos_id)]
            row = [i for i in row if i not in (self.pad_id, self.bos_id)]
            out.append(self.sp.decode(row))
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

    # -- chat -----------------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict], *, loss_on: str = "all_assistant",
                    add_bos: bool = True, add_generation_prompt: bool = False,
                    chat: ChatFormat = DEFAULT_CHAT) -> tuple[np.ndarray, np.ndarray]:
        """Multi-turn conversation -> (ids [T] int32, loss_mask [T] int32).

        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
        loss_on: "all_assistant" puts the loss on every assistant turn, "last_assistant" only on
          the final one (e.g. the response of a preference pair), "none" on nothing (prompts).
        add_generation_prompt: append `<|assistant|>` so a sampler continues as the assistant.
        Role markers must be single pieces (true for models from `train_sentencepiece`); for a
        model without them (Llama 2, Gemma) the marker text is encoded as ordinary text instead.
        """
        if loss_on not in ("all_assistant", "last_assistant", "none"):
            raise ValueError(f"loss_on={loss_on!r}; expected all_assistant, last_assistant or none")
        last_asst = max((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                        default=-1)
        ids: list[int] = [self.bos_id] if add_bos else []
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
