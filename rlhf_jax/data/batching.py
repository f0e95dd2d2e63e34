"""Fixed-shape batches from a random-access source, with a checkpointable iterator state.

    it = batching.make_iterator(builder.as_data_source(split="train"), kind="pairs",
                                tokenizer=tok, config=batching.BatchConfig(batch_size=8))
    batch = next(it)            # numpy dict, shapes below
    state = it.get_state()      # small JSON-able dict: store it in the checkpoint
    it.set_state(state)         # continue at exactly the next example

The pipeline is a Grain `MapDataset`: range(N) -> per-epoch shuffle by seed -> repeat -> batch of
indices -> fetch, tokenize and pad. Its state is the index of the next batch, so restoring continues
at exactly the next example, also across an epoch boundary.

Batches (B batch, T a length from `config.buckets`, the smallest that fits the batch):

kind="sft":      tokens [B, T] right-padded prompt+completion; mask [B, T] 1 on real tokens;
                 loss_mask [B, T] 1 on completion tokens only; prompt_lens [B]; valid [B];
                 truncated [B] (1 where the truncation rule cut the example) and skipped [B]
                 (1 where overlong="skip" left it out), in every kind.
kind="chat":     multi-turn conversations ("messages"): as "sft", with loss_mask on the
                 assistant turns only (all of them, or the last with chat_loss_on).
kind="prompts":  tokens [B, T] left-padded (generation appends on the right); mask [B, T];
                 positions [B, T] (0 at the first real token); lengths [B]; valid [B].
kind="pairs":    tokens [2B, T] with the B chosen sequences first, then the B rejected ones,
                 so one forward pass scores both; mask, loss_mask [2B, T]; prompt_lens [2B];
                 valid [B]; plus any `extra_fields` as [B] float32 (e.g. gold_chosen).
kind="unpaired": KTO's rows, each a prompt, one completion and a desirable flag: tokens, mask,
                 loss_mask [B, T] and prompt_lens [B] as "sft"; desirable [B] float32 (1 or 0);
                 valid [B]; and the mismatched rows of KTO's reference point: kl_tokens,
                 kl_mask, kl_loss_mask [B, T] (row b: prompt b with the completion of the real
                 row before it, the first real row taking the last one's), kl_valid [B] (0 on
                 padding, and on every row when fewer than 2 rows are real). Records are
                 {prompt, completion, desirable}, or pairs read with split_pairs=True: pair j
                 of N is row j (its chosen completion, desirable) and row N + j (its rejected
                 one, undesirable), so rows before a shuffle are all chosen ones, then all
                 rejected ones, and the mismatched rows hold another prompt's completion.

Packed batches (`config.packing`, kinds "sft", "chat" and "pairs"; `collate_packed`): the
same examples as the unpacked batch, each sequence (for pairs: the B chosen and the B rejected
ones, N = 2B; else N = B) kept whole, placed first-fit in stream order into rows of max(buckets)
tokens: tokens, mask, loss_mask [R, T]; segment_ids [R, T] (1, 2, ... per sequence in a row, 0
on padding); positions [R, T] (0 at each sequence's first token); seq_index [R, T] (the
sequence's index in the unpacked order, N on padding); read_at [N] (flat index row * T + t of
each sequence's last token, 0 for a sequence left out); seq_lengths, prompt_lens [N]; valid,
truncated, skipped and extra fields [B] as unpacked. R is the number of rows the sequences fill,
rounded up to a multiple of pack_rows_multiple (each R compiles the step once; batches of the
same size fill about as many rows, so a run sees a few); T is the smallest bucket that fits the
fullest row. Examples with valid=0 (skipped, or padding of a partial batch) get no segment.

`loss_mask[b, t]` marks token t as a target: with logits[:, :-1] predicting tokens[:, 1:], weight
the loss by loss_mask[:, 1:]. Rows of a final partial batch (num_epochs set, no drop) are
padding with valid=0.

Truncation rule (over-long examples, `overlong="truncate"`): keep the *end* of the prompt (at
most max_prompt_len tokens, the tokenizer's prefix_ids, e.g. bos, kept in front) and the
*start* of the response (up to max(buckets) tokens in all), so the context nearest the
response and the beginning of the response survive. `overlong="error"` raises an
`OverlongError` (a DataError) naming the source, record and field; `overlong="skip"` leaves
the example out: its row is empty with valid=0 and skipped=1, so shapes and the iterator
position stay as they were and the count is in the batch.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from rlhf_jax.data import records
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.data.records import DataError
from rlhf_jax.errors import CheckpointError, ConfigError

KINDS = ("sft", "prompts", "pairs", "chat", "unpaired")
CHAT_LOSS_ON = ("all_assistant", "last_assistant")
FIX_RECORD = "fix the record in the source"


def _is_int(value) -> bool:
    """An integer that is not a bool (True is an int to Python, never a size here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class OverlongError(DataError):
    """An example longer than the limits, with `overlong="error"`."""

    FIX = ("raise the largest bucket or max_prompt_len, or set overlong='truncate' or 'skip' "
           "(see docs/data.md)")

    def __init__(self, *, fix: str | None = None, **where_and_reason):
        super().__init__(fix=fix or self.FIX, **where_and_reason)


DEFAULT_FIELDS = {
    "chat": {"messages": "messages"},
    "sft": {"prompt": "prompt", "completion": "completion"},
    "prompts": {"prompt": "prompt"},
    "pairs": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
    "unpaired": {"prompt": "prompt", "completion": "completion", "desirable": "desirable"},
}


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Batching knobs. buckets: allowed sequence lengths T (sorted); the largest is the hard
    limit. max_prompt_len: prompt budget in tokens. num_epochs=None repeats forever."""

    batch_size: int
    buckets: tuple[int, ...] = (64,)
    max_prompt_len: int = 32
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    drop_remainder: bool = True
    overlong: str = "truncate"
    # Sequence packing (`collate_packed`): several examples per row of max(buckets) tokens,
    # in a number of rows that is a multiple of pack_rows_multiple (the batch shards of the
    # mesh times the micro-batches, so a packed batch splits as an unpacked one does).
    packing: bool = False
    pack_rows_multiple: int = 1
    # Batches read ahead by one background thread (0: read in the caller's thread). Grain's own
    # default (16 threads, 500 elements) would read hundreds of batches ahead at start-up,
    # competing with the training step for the CPU, and far more than an evaluation needs.
    prefetch: int = 2

    def __post_init__(self):
        def bad(field, fix):
            raise ConfigError(f"batching: {field}={getattr(self, field)!r} is invalid; {fix}")

        if not _is_int(self.batch_size) or self.batch_size < 1:
            bad("batch_size", "use an integer >= 1")
        buckets = self.buckets
        if (not isinstance(buckets, (tuple, list)) or not buckets
                or not all(_is_int(b) and b >= 1 for b in buckets)
                or any(a > b for a, b in zip(buckets, buckets[1:]))):
            bad("buckets", "use a non-empty sorted tuple of positive integers, e.g. (64, 128)")
        # A list from a config file is fine; stored as a tuple so the config stays hashable.
        object.__setattr__(self, "buckets", tuple(int(b) for b in buckets))
        if not _is_int(self.max_prompt_len) or not 0 < self.max_prompt_len < self.max_len:
            bad("max_prompt_len", f"use an integer in [1, max(buckets)={self.max_len}) to "
                                  f"leave room for a response")
        if not _is_int(self.seed) or not 0 <= self.seed < 2 ** 32:
            bad("seed", "use an integer in [0, 2**32)")
        for flag in ("shuffle", "drop_remainder", "packing"):
            if not isinstance(getattr(self, flag), bool):
                bad(flag, "use True or False")
        if self.num_epochs is not None and (not _is_int(self.num_epochs)
                                            or self.num_epochs < 1):
            bad("num_epochs", "use an integer >= 1, or None to repeat forever")
        if not _is_int(self.pack_rows_multiple) or self.pack_rows_multiple < 1:
            bad("pack_rows_multiple", "use an integer >= 1")
        if self.packing and self.batch_size % self.pack_rows_multiple:
            bad("pack_rows_multiple", f"use a divisor of batch_size={self.batch_size}")
        if not _is_int(self.prefetch) or self.prefetch < 0:
            bad("prefetch", "use an integer >= 0 (0 reads in the caller's thread)")
        if self.overlong not in ("truncate", "error", "skip"):
            bad("overlong", "use 'truncate', 'error' or 'skip'")

    @property
    def max_len(self) -> int:
        """The hard length limit: the largest bucket."""
        return max(self.buckets)


# ---------------------------------------------------------------------------------------------
# Text -> ids
# ---------------------------------------------------------------------------------------------

class TextEncoder:
    """Turns prompt and response text into ids.

    format="plain": prompt = prefix_ids + encode(prompt) (prefix_ids is [bos], or [] for a
    tokenizer that puts nothing before a text, e.g. Qwen's); response = encode(response) + [eos].
    format="chat": the prompt is parsed as an HH-style conversation ("\\n\\nHuman: ..."; other
    text is one user turn) and encoded with the tokenizer's chat format, ending in what opens
    an assistant turn. response: with the tokenizer's chat_template, the reply as the template
    closes an assistant turn (e.g. "text<|im_end|>\\n"), so prompt + response ids are the
    template's rendering of the whole conversation; without one, encode(response) + [<|end|>,
    eos].
    """

    def __init__(self, tokenizer: tokenizer_lib.BaseTokenizer, *, format: str = "plain",
                 chat: tokenizer_lib.ChatFormat = tokenizer_lib.DEFAULT_CHAT):
        if format not in ("plain", "chat"):
            raise ConfigError(f"batching: format={format!r} is invalid; use 'plain' or 'chat'")
        self.tok, self.format, self.chat = tokenizer, format, chat

    def prompt(self, text: str) -> list[int]:
        """Prompt text -> ids, starting with the tokenizer's prefix_ids (or the template's
        opening)."""
        if self.format == "plain":
            return list(self.tok.prefix_ids) + self.tok.encode(text)
        messages = records.hh_to_messages(text) if "\n\nHuman:" in text else [
            {"role": "user", "content": text}]
        ids, _ = self.tok.encode_chat(messages, loss_on="none", add_generation_prompt=True,
                                      chat=self.chat)
        return ids.tolist()

    def response(self, text: str) -> list[int]:
        """Response text -> ids, ending with eos (or the template's end of turn).

        With a chat template the reply is closed the template's way and cut after its first
        stop id (`<|im_end|>`, `<end_of_turn>`): generation stops there too, so a reward model
        reads a trained response and a sampled one at the same token. Whatever the template
        writes after it (ChatML's newline) belongs to the next turn's text."""
        if self.format == "chat" and self.tok.chat_template is not None:
            ids = self.tok.chat_response_ids(text)
            stops = [i for i, t in enumerate(ids) if t in self.tok.stop_ids]
            return ids[:stops[0] + 1] if stops else ids
        ids = self.tok.encode(text)
        if self.format == "chat":
            ids += self.tok.marker_ids(self.chat.end)
        return ids + [self.tok.eos_id]


def truncate(prompt: Sequence[int], response: Sequence[int], *, max_prompt_len: int,
             max_len: int, prefix: Sequence[int] = (), bos_id: int | None = None
             ) -> tuple[list[int], list[int]]:
    """The truncation rule: keep the end of the prompt (<= max_prompt_len tokens, a leading
    `prefix` kept: the tokenizer's prefix_ids) and the start of the response (so that
    prompt + response <= max_len). `bos_id=b` is the older spelling of `prefix=[b]`."""
    prompt, response = list(prompt), list(response)
    keep = list(prefix) if bos_id is None else [bos_id]
    if len(prompt) > max_prompt_len:
        if keep and prompt[:len(keep)] == keep and len(keep) <= max_prompt_len:
            prompt = keep + prompt[len(prompt) - max_prompt_len + len(keep):]
        else:
            prompt = prompt[len(prompt) - max_prompt_len:]
    return prompt, response[:max(0, max_len - len(prompt))]


def as_text(value: Any, *, name: str, index: int, field: str) -> str:
    """A text field (str, or UTF-8 bytes as TFDS returns them) as str, else a DataError."""
    if value is None:
        raise DataError(file=name, index=index, field=field, reason="missing (null)",
                        fix=FIX_RECORD)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(file=name, index=index, field=field,
                            reason="undecodable text (invalid UTF-8)", fix=FIX_RECORD) from None
    if not isinstance(value, str):
        raise DataError(file=name, index=index, field=field,
                        reason=f"expected text, got {type(value).__name__}", fix=FIX_RECORD)
    return value


def _messages(value: Any, *, name: str, index: int, field: str) -> list[dict]:
    """A conversation as a list of {"role", "content"} dicts, a TFDS Sequence of such dicts
    (a dict of lists), or HH-style text."""
    def fail(where, reason):
        raise DataError(file=name, index=index, field=where, reason=reason, fix=FIX_RECORD)

    if isinstance(value, (str, bytes)):
        return records.hh_to_messages(as_text(value, name=name, index=index, field=field))
    if isinstance(value, Mapping):
        # The TFDS Sequence form: {"role": [...], "content": [...]}, one entry per turn.
        for key in ("role", "content"):
            if key not in value:
                fail(f"{field}.{key}", "missing")
            if not isinstance(value[key], (list, tuple, np.ndarray)):
                fail(f"{field}.{key}", f"expected a list, got {type(value[key]).__name__}")
        if len(value["role"]) != len(value["content"]):
            fail(field, f"{len(value['role'])} roles but {len(value['content'])} contents")
        value = [dict(role=r, content=c) for r, c in zip(value["role"], value["content"])]
    if not isinstance(value, (list, tuple, np.ndarray)):
        fail(field, f"expected a list of {{role, content}} messages or HH text, got "
                    f"{type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, Mapping):
            fail(where, f"expected a {{role, content}} message, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                fail(f"{where}.{key}", "missing")
        role = as_text(m["role"], name=name, index=index, field=f"{where}.role")
        if role not in ("system", "user", "assistant"):
            fail(f"{where}.role", f"unknown role {records.short(role)}; expected system, user "
                                  f"or assistant")
        out.append(dict(role=role, content=as_text(m["content"], name=name, index=index,
                                                    field=f"{where}.content")))
    if not any(m["role"] == "assistant" for m in out):
        fail(field, "no assistant turn")
    return out


def _number(record: Mapping, key: str, *, name: str, index: int) -> np.float32:
    """A finite numeric field (an `extra_fields` entry) as float32, else a DataError."""
    def fail(reason):
        raise DataError(file=name, index=index, field=key, reason=reason,
                        fix=f"{FIX_RECORD}, or leave {key!r} out of extra_fields")

    if key not in record:
        fail("missing")
    value = record[key]
    arr = np.asarray(value) if not isinstance(value, (str, bytes)) else None
    if arr is None or arr.dtype.kind not in "biuf" or arr.size != 1:
        fail(f"expected a number, got {records.short(value)}")
    number = np.float32(arr.reshape(()))
    if not np.isfinite(number):
        # A NaN reward or label would turn every loss it touches into NaN, steps later.
        fail(f"not a finite number ({records.short(value)})")
    return number


def _flag(record: Mapping, key: str, *, name: str, index: int) -> np.float32:
    """A desirable/undesirable flag: true/false or the integer 0/1 (Python or numpy), as 1.0
    or 0.0; anything else (0.5, "yes", null) is a DataError, never guessed at: a wrong guess
    would teach the model to prefer what the data marks as bad."""
    def fail(reason):
        raise DataError(file=name, index=index, field=key, reason=reason, fix=FIX_RECORD)

    if key not in record:
        fail("missing")
    value = record[key]
    if value is None:
        fail("missing (null)")
    arr = np.asarray(value) if not isinstance(value, (str, bytes)) else None
    if arr is None or arr.shape != () or arr.dtype.kind not in "biu" or arr.item() not in (0, 1):
        fail(f"expected true/false or 0/1, got {records.short(value)} ({type(value).__name__})")
    return np.float32(bool(arr.item()))


def _encode_chat_record(index: int, record: dict, *, fields: dict, enc: TextEncoder,
                        config: BatchConfig, name: str, loss_on: str) -> dict:
    """A multi-turn conversation -> the same prompt/completion split as "sft", where the
    "prompt" is everything before the first loss token and "completion_mask" marks which of
    the rest carry loss (other turns in between do not). The truncation rule applies to that
    split unchanged."""
    key = fields["messages"]
    if key not in record:
        raise DataError(file=name, index=index, field=key, reason="missing", fix=FIX_RECORD)
    messages = _messages(record[key], name=name, index=index, field=key)
    ids, mask = enc.tok.encode_chat(messages, loss_on=loss_on, chat=enc.chat)
    ids, mask = ids.tolist(), mask.tolist()
    if enc.tok.chat_template is None:
        # The markers close a turn with <|end|>; eos ends the sequence. A template writes
        # its own end of turn, which is among the tokenizer's stop ids.
        ids, mask = ids + [enc.tok.eos_id], mask + [mask[-1]]
    first = mask.index(1) if 1 in mask else len(ids)
    prompt, completion, cmask = ids[:first], ids[first:], mask[first:]
    limit = min(config.max_prompt_len, config.max_len)
    if config.overlong != "truncate" and (len(prompt) > limit or len(ids) > config.max_len):
        raise OverlongError(file=name, index=index, field=key,
                        reason=f"{len(ids)} tokens ({len(prompt)} before the first loss token), "
                               f"longer than the limits {config.max_len} ({limit})")
    p, c = truncate(prompt, completion, max_prompt_len=limit, max_len=config.max_len,
                    prefix=enc.tok.prefix_ids)
    return {"prompt": p, "completion": c, "completion_mask": cmask[:len(c)],
            "truncated": int(len(p) + len(c) < len(ids))}


def _encode_record(index: int, record: dict, **how) -> dict:
    """One source record -> {"prompt": ids, ("completion" | "chosen"/"rejected"): ids, ...}.
    A chat template that refuses the record's conversation is a DataError naming it."""
    try:
        return _encode_fields(index, record, **how)
    except tokenizer_lib.ChatTemplateError as e:
        raise DataError(file=how["name"], index=index, field="<conversation>", reason=str(e),
                        fix=f"{FIX_RECORD}, or use a tokenizer whose template accepts it"
                        ) from None


def _encode_fields(index: int, record: dict, *, kind: str, fields: dict, enc: TextEncoder,
                   config: BatchConfig, name: str, extra_fields: Sequence[str],
                   text_fields: Sequence[str] = (),
                   chat_loss_on: str = "all_assistant", desirable: bool | None = None) -> dict:
    if not isinstance(record, Mapping):
        raise DataError(file=name, index=index, field="<record>",
                        reason=f"expected a record (a dict of fields), got "
                               f"{type(record).__name__}", fix=FIX_RECORD)
    if kind == "chat":
        return _encode_chat_record(index, record, fields=fields, enc=enc, config=config,
                                   name=name, loss_on=chat_loss_on)

    def get(role):
        key = fields[role]
        if key not in record:
            raise DataError(file=name, index=index, field=key, reason="missing",
                            fix=FIX_RECORD)
        return as_text(record[key], name=name, index=index, field=key)

    prompt = enc.prompt(get("prompt"))
    limit = min(config.max_prompt_len, config.max_len)
    if config.overlong != "truncate" and len(prompt) > limit:
        raise OverlongError(file=name, index=index, field=fields["prompt"],
                        reason=f"{len(prompt)} tokens, longer than the limit {limit}")
    if kind == "prompts":
        kept = truncate(prompt, [], max_prompt_len=limit, max_len=config.max_len,
                        prefix=enc.tok.prefix_ids)[0]
        out = {"prompt": kept, "truncated": int(len(kept) < len(prompt))}
        for key in text_fields:       # what a reward reads of the record (an answer, say)
            if key not in record:
                raise DataError(file=name, index=index, field=key, reason="missing (a reward "
                                "reads it)", fix=FIX_RECORD)
            out[key] = as_text(record[key], name=name, index=index, field=key)
        return out
    out = {}
    roles = ("completion",) if kind in ("sft", "unpaired") else ("chosen", "rejected")
    for role in roles:
        response = enc.response(get(role))
        if config.overlong != "truncate" and len(prompt) + len(response) > config.max_len:
            raise OverlongError(file=name, index=index, field=fields[role],
                            reason=f"prompt + response = {len(prompt) + len(response)} tokens, "
                                   f"longer than the limit {config.max_len}")
        p, out[role] = truncate(prompt, response, max_prompt_len=limit,
                                max_len=config.max_len, prefix=enc.tok.prefix_ids)
        cut = len(p) < len(prompt) or len(out[role]) < len(response)
        out["truncated"] = int(out.get("truncated", 0) or cut)
    out["prompt"] = p
    if kind == "unpaired":
        # A row split from a pair knows its flag; a record of unpaired rows carries it.
        out["desirable"] = (np.float32(desirable) if desirable is not None else
                            _flag(record, fields["desirable"], name=name, index=index))
    for key in extra_fields:
        out[key] = _number(record, key, name=name, index=index)
    return out


# ---------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------

def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length (length is already truncated to max(buckets))."""
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")


def _right_pad(prompts, responses, length, pad_id, response_masks=None):
    n = len(prompts)
    tokens = np.full((n, length), pad_id, np.int32)
    mask = np.zeros((n, length), np.int32)
    loss_mask = np.zeros((n, length), np.int32)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        tokens[b, :len(p) + len(r)] = p + r
        mask[b, :len(p) + len(r)] = 1
        loss_mask[b, len(p):len(p) + len(r)] = 1 if response_masks is None else response_masks[b]
    return tokens, mask, loss_mask, np.array([len(p) for p in prompts], np.int32)


def collate(examples: Sequence[dict | None], *, kind: str, batch_size: int,
            buckets: Sequence[int], pad_id: int, extra_fields: Sequence[str] = (),
            text_fields: Sequence[str] = ()) -> dict:
    """Encoded examples -> one fixed-shape numpy batch (see the module docstring). `None`
    entries (skipped examples) and a short list are filled with empty rows marked valid=0."""
    valid = np.zeros(batch_size, np.int32)
    skipped = np.zeros(batch_size, np.int32)
    for b, ex in enumerate(examples):
        valid[b], skipped[b] = int(ex is not None), int(ex is None)
    # An empty row: a lone pad as prompt keeps shapes and masks well-defined.
    blank = {"prompt": [pad_id], "completion": [], "chosen": [], "rejected": [],
             "completion_mask": [], "truncated": 0, "desirable": np.float32(0),
             **{k: np.float32(0) for k in extra_fields},
             **{k: "" for k in text_fields}}
    rows = [blank if ex is None else ex for ex in examples]
    rows += [blank] * (batch_size - len(rows))
    truncated = np.array([r["truncated"] for r in rows], np.int32)
    if kind == "prompts":
        prompts = [r["prompt"] for r in rows]
        length = bucket_length(max(len(p) for p in prompts), buckets)
        tokens = np.full((batch_size, length), pad_id, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for b, p in enumerate(prompts):
            tokens[b, length - len(p):] = p
            mask[b, length - len(p):] = 1
        mask[valid == 0] = 0
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        return dict(tokens=tokens, mask=mask, positions=positions,
                    lengths=mask.sum(1).astype(np.int32), valid=valid, truncated=truncated,
                    skipped=skipped, **{k: np.array([r[k] for r in rows], object)
                                        for k in text_fields})
    response_masks = None
    if kind == "unpaired":
        return _collate_unpaired(rows, valid, truncated, skipped, buckets=buckets,
                                 pad_id=pad_id, extra_fields=extra_fields)
    if kind in ("sft", "chat"):
        prompts, responses = [r["prompt"] for r in rows], [r["completion"] for r in rows]
        if kind == "chat":
            response_masks = [r["completion_mask"] for r in rows]
    else:
        prompts = [r["prompt"] for r in rows] * 2
        responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    length = bucket_length(max(len(p) + len(r) for p, r in zip(prompts, responses)), buckets)
    tokens, mask, loss_mask, prompt_lens = _right_pad(prompts, responses, length, pad_id,
                                                      response_masks)
    row_valid = valid if kind != "pairs" else np.concatenate([valid, valid])
    mask[row_valid == 0] = 0
    out = dict(tokens=tokens, mask=mask, loss_mask=loss_mask, prompt_lens=prompt_lens,
               valid=valid, truncated=truncated, skipped=skipped)
    for key in extra_fields:
        out[key] = np.array([r[key] for r in rows], np.float32)
    return out


PACKABLE_KINDS = ("sft", "chat", "pairs")


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sequences (by index) into rows of `capacity` tokens: each goes to the first row with
    room, in stream order, else opens a row. Deterministic; every length must be <= capacity."""
    rows, free = [], []
    for i, n in enumerate(lengths):
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def packed_row_count(needed: int, n: int, multiple: int = 1) -> int:
    """The row count of a packed batch of n sequences: the rows it needs, rounded up to a
    multiple of `multiple` (at least one such multiple, at most n, which is one)."""
    return min(n, max(1, -(-needed // multiple)) * multiple)


def collate_packed(examples: Sequence[dict | None], *, kind: str, batch_size: int,
                   buckets: Sequence[int], pad_id: int, extra_fields: Sequence[str] = (),
                   rows_multiple: int = 1) -> dict:
    """Encoded examples -> one packed numpy batch (the module docstring, "Packed batches").
    The examples are the ones `collate` would put in the batch; no sequence is split, dropped
    (unless its row is padding, valid=0) or reordered within itself."""
    if kind not in PACKABLE_KINDS:
        raise ConfigError(f"batching: packing is for kinds {PACKABLE_KINDS}, not {kind!r}")
    valid = np.zeros(batch_size, np.int32)
    skipped = np.zeros(batch_size, np.int32)
    truncated = np.zeros(batch_size, np.int32)
    for b, ex in enumerate(examples):
        valid[b], skipped[b] = int(ex is not None), int(ex is None)
        truncated[b] = 0 if ex is None else ex["truncated"]
    # (index in the unpacked order, prompt ids, response ids, response loss mask or None)
    seqs = []
    for b, ex in enumerate(examples):
        if ex is None:
            continue
        if kind == "pairs":   # a pair's two sequences side by side, so they tend to share a row
            seqs += [(b, ex["prompt"], ex["chosen"], None),
                     (batch_size + b, ex["prompt"], ex["rejected"], None)]
        else:
            seqs.append((b, ex["prompt"], ex["completion"],
                         ex["completion_mask"] if kind == "chat" else None))
    n = 2 * batch_size if kind == "pairs" else batch_size
    lengths = [len(p) + len(r) for _, p, r, _ in seqs]
    groups = first_fit(lengths, max(buckets))
    n_rows = packed_row_count(len(groups), n, rows_multiple)
    length = bucket_length(max([sum(lengths[i] for i in g) for g in groups] + [1]), buckets)
    tokens = np.full((n_rows, length), pad_id, np.int32)
    mask, loss_mask, segment_ids, positions = (np.zeros((n_rows, length), np.int32)
                                               for _ in range(4))
    seq_index = np.full((n_rows, length), n, np.int32)
    read_at, seq_lengths, prompt_lens = (np.zeros(n, np.int32) for _ in range(3))
    for r, group in enumerate(groups):
        start = 0
        for segment, i in enumerate(group, 1):
            index, p, resp, resp_mask = seqs[i]
            end = start + lengths[i]
            tokens[r, start:end] = p + resp
            mask[r, start:end] = 1
            loss_mask[r, start + len(p):end] = 1 if resp_mask is None else resp_mask
            loss_mask[r, start] = 0     # a sequence's first token is never a target
            segment_ids[r, start:end] = segment
            positions[r, start:end] = np.arange(lengths[i])
            seq_index[r, start:end] = index
            read_at[index] = r * length + end - 1
            seq_lengths[index], prompt_lens[index] = lengths[i], len(p)
            start = end
    out = dict(tokens=tokens, mask=mask, loss_mask=loss_mask, segment_ids=segment_ids,
               positions=positions, seq_index=seq_index, read_at=read_at,
               seq_lengths=seq_lengths, prompt_lens=prompt_lens, valid=valid,
               truncated=truncated, skipped=skipped)
    for key in extra_fields:
        out[key] = np.array([np.float32(0) if ex is None else ex[key] for ex in examples]
                            + [np.float32(0)] * (batch_size - len(examples)), np.float32)
    return out


class PaddingStats:
    """The share of padding tokens in packed batches and in the unpacked batches of the same
    examples (each padded to the smallest bucket that fits its longest sequence), summed over
    the batches added: what packing saves."""

    def __init__(self, buckets: Sequence[int]):
        self.buckets = tuple(buckets)
        self.real = self.unpacked = self.packed = self.batches = 0

    def add(self, batch: dict) -> None:
        """Counts a packed batch (one with seq_lengths)."""
        lengths = np.asarray(batch["seq_lengths"])
        real = int(lengths.sum())
        unpacked = lengths.size * bucket_length(max(int(lengths.max()), 1), self.buckets)
        self.real += real
        self.unpacked += unpacked
        self.packed += int(np.asarray(batch["mask"]).size)
        self.batches += 1

    def fractions(self) -> tuple[float, float]:
        """(padding share unpacked, padding share packed) over the batches added."""
        return (1 - self.real / max(self.unpacked, 1), 1 - self.real / max(self.packed, 1))

    def metrics(self) -> dict:
        before, after = self.fractions()
        return {"data/padding_unpacked": before, "data/padding_packed": after}

    def line(self, stage: str) -> str:
        """"sft: packing: padding 61.2% of tokens unpacked -> 4.3% packed (3 batches)"."""
        before, after = self.fractions()
        return (f"{stage}: packing: padding {100 * before:.1f}% of tokens unpacked -> "
                f"{100 * after:.1f}% packed ({self.batches} batch{'es' if self.batches != 1 else ''})")


def mismatched_rows(valid: np.ndarray) -> np.ndarray:
    """For each row b, the row whose completion its mismatched (KL) row takes: the real row
    before it, the first real row taking the last one's (KTO's estimate of KL(pi || pi_ref),
    Ethayarajh et al. 2024; TRL rolls the batch the same way). Padding rows point at
    themselves. Real rows are paired with another row only when there are at least two."""
    real = np.flatnonzero(valid)
    source = np.arange(len(valid))
    source[real] = np.roll(real, 1)
    return source


def _collate_unpaired(rows, valid, truncated, skipped, *, buckets, pad_id, extra_fields):
    prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    max_len = max(buckets)
    # Row b's prompt with another row's completion, cut to fit as the truncation rule cuts a
    # response (its prompt is already within max_prompt_len).
    other = mismatched_rows(valid)
    kl_completions = [completions[o][:max(0, max_len - len(p))]
                      for p, o in zip(prompts, other)]
    length = bucket_length(max(len(p) + len(c) for p, c in
                               zip(prompts * 2, completions + kl_completions)), buckets)
    tokens, mask, loss_mask, prompt_lens = _right_pad(prompts, completions, length, pad_id)
    kl_tokens, kl_mask, kl_loss_mask, _ = _right_pad(prompts, kl_completions, length, pad_id)
    kl_valid = valid * int(np.sum(valid) >= 2)
    mask[valid == 0] = 0
    kl_mask[kl_valid == 0] = 0
    out = dict(tokens=tokens, mask=mask, loss_mask=loss_mask, prompt_lens=prompt_lens,
               desirable=np.array([r["desirable"] for r in rows], np.float32), valid=valid,
               kl_tokens=kl_tokens, kl_mask=kl_mask, kl_loss_mask=kl_loss_mask,
               kl_valid=kl_valid.astype(np.int32), truncated=truncated, skipped=skipped)
    for key in extra_fields:
        out[key] = np.array([r[key] for r in rows], np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# The iterator
# ---------------------------------------------------------------------------------------------

class BatchIterator:
    """Iterator over batches with `get_state()` / `set_state()` for checkpoints.

    The state is {"next_batch": int, "fingerprint": {...}}; restoring into an iterator built with
    a different seed, batch size, kind or source length is refused with what differs.
    num_batches: the number of batches when finite (num_epochs set), else None.
    """

    def __init__(self, dataset: grain.MapDataset, *, fingerprint: dict, num_examples: int,
                 batch_size: int, prefetch: int = 2, num_batches: int | None = None):
        self._it = iter(dataset.to_iter_dataset(grain.ReadOptions(
            num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)))
        self.fingerprint = fingerprint
        self.num_examples, self.batch_size = num_examples, batch_size
        self.num_batches = num_batches

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> dict:
        """The position as a small JSON-able dict, for a checkpoint."""
        return {"next_batch": int(self._it.get_state()["next_index"]),
                "fingerprint": dict(self.fingerprint)}

    def set_state(self, state: dict) -> None:
        """Continues from a `get_state()` result, after checking it.

        A state that is not what `get_state()` returns is a CheckpointError (a damaged or
        foreign checkpoint); one saved with a different pipeline (fingerprint) is a ConfigError
        that lists the settings that differ.
        """
        if (not isinstance(state, Mapping) or not isinstance(state.get("fingerprint"), Mapping)
                or not _is_int(state.get("next_batch")) or state["next_batch"] < 0):
            raise CheckpointError(
                f"data iterator state {records.short(state)} is not a saved position (expected "
                "{'next_batch': int >= 0, 'fingerprint': {...}} from get_state()); resume from "
                "a checkpoint written by this version, or start afresh in a new workdir")
        theirs = state["fingerprint"]
        diff = {k: (theirs.get(k), v) for k, v in self.fingerprint.items() if theirs.get(k) != v}
        if diff:
            raise ConfigError(f"data iterator state was saved with a different pipeline "
                              f"(saved, current): {diff}; restore it with the saved data and "
                              "batch settings, or start afresh in a new workdir")
        if self.num_batches is not None and state["next_batch"] > self.num_batches:
            raise CheckpointError(
                f"data iterator state next_batch={state['next_batch']} is past the end of this "
                f"pipeline ({self.num_batches} batches); resume from a checkpoint of this run, "
                "or start afresh in a new workdir")
        self._it.set_state({"next_index": int(state["next_batch"])})

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (fractional)."""
        return self._it.get_state()["next_index"] * self.batch_size / self.num_examples


def make_iterator(source, *, kind: str, tokenizer: tokenizer_lib.BaseTokenizer,
                  config: BatchConfig, fields: dict | None = None, format: str = "plain",
                  extra_fields: Sequence[str] = (), text_fields: Sequence[str] = (),
                  name: str = "source",
                  encoder: Callable | None = None,
                  chat_loss_on: str = "all_assistant",
                  split_pairs: bool = False) -> BatchIterator:
    """Batches from any random-access source (a TFDS `as_data_source()` split, a list of dicts).

    kind: "sft", "prompts", "pairs", "chat" or "unpaired". fields: record keys for the roles of
    `kind` (defaults: prompt / completion / chosen / rejected / messages / desirable).
    split_pairs: with kind="unpaired", `source` holds pairs (fields: their roles), read as 2N
    unpaired rows (module docstring); errors name the pair record. format: see `TextEncoder`.
    chat_loss_on: for kind="chat", "all_assistant" or "last_assistant" turns carry the loss.
    extra_fields: numeric record fields passed through as [B] float32 (pairs, sft).
    text_fields: text record fields passed through as [B] object arrays of str (prompts: the
      fields a reward reads, such as a verifier's answer; "" on padding rows).
    name: used in error messages (e.g. "rlhf_hh_pairs/train").
    """
    if kind not in KINDS:
        raise ConfigError(f"batching: kind={kind!r} is invalid; use one of {KINDS}")
    if chat_loss_on not in CHAT_LOSS_ON:
        raise ConfigError(f"batching: chat_loss_on={chat_loss_on!r} is invalid; use one of "
                          f"{CHAT_LOSS_ON}")
    if split_pairs and kind != "unpaired":
        raise ConfigError(f"batching: split_pairs=True makes unpaired rows, not kind={kind!r}; "
                          "use kind='unpaired'")
    roles = DEFAULT_FIELDS["pairs" if split_pairs else kind]
    unknown = sorted(set(fields or {}) - set(roles))
    if unknown:
        raise ConfigError(f"batching: fields {unknown} are not roles of kind={kind!r}"
                          f"{' with split_pairs' if split_pairs else ''}; use {sorted(roles)}")
    fields = {**roles, **(fields or {})}
    enc = encoder or TextEncoder(tokenizer, format=format)
    n = len(source)
    if n == 0:
        raise DataError(file=name, reason="has no records",
                        fix="prepare the dataset with records in this split, or pick another "
                            "split")

    def encode(index, record, row_fields=fields, desirable=None):
        try:
            return _encode_record(index, record, kind=kind, fields=row_fields, enc=enc,
                                  config=config, name=name, extra_fields=extra_fields,
                                  text_fields=text_fields, chat_loss_on=chat_loss_on,
                                  desirable=desirable)
        except OverlongError:
            if config.overlong == "skip":
                return None   # collate turns it into an empty row with skipped=1
            raise

    if config.packing and (kind not in PACKABLE_KINDS or split_pairs):
        raise ConfigError(f"batching: packing is for kinds {PACKABLE_KINDS}, not {kind!r}"
                          f"{' with split_pairs' if split_pairs else ''}; set packing=False")

    def batch_of(examples):
        if config.packing:
            return collate_packed(examples, kind=kind, batch_size=config.batch_size,
                                  buckets=config.buckets, pad_id=tokenizer.pad_id,
                                  extra_fields=extra_fields,
                                  rows_multiple=config.pack_rows_multiple)
        return collate(examples, kind=kind, batch_size=config.batch_size,
                       buckets=config.buckets, pad_id=tokenizer.pad_id,
                       extra_fields=extra_fields, text_fields=text_fields)

    if split_pairs:
        # Row i < n is pair i's chosen completion (desirable), row n + j pair j's rejected one.
        sides = {True: {"prompt": fields["prompt"], "completion": fields["chosen"]},
                 False: {"prompt": fields["prompt"], "completion": fields["rejected"]}}
        return index_batches(
            _SplitPairs(source), kind="unpaired (split pairs)", config=config,
            to_batch=lambda indices, records: batch_of(
                [encode(i % n, r, sides[i < n], i < n) for i, r in zip(indices, records)]))
    return index_batches(source, kind=kind, config=config, to_batch=lambda indices, records:
                         batch_of([encode(i, r) for i, r in zip(indices, records)]))


class _SplitPairs:
    """A source of N pair records as 2N unpaired rows: row i reads pair i mod N (which of its
    completions the row takes is decided where it is encoded, in `make_iterator`)."""

    def __init__(self, pairs):
        self.pairs, self.n = pairs, len(pairs)

    def __len__(self):
        return 2 * self.n

    def __getitems__(self, indices):
        return read(self.pairs, [i % self.n for i in indices])


def read(source, indices: list[int]) -> list:
    """The records at `indices`: one read for all of them where the source supports it
    (a TFDS array_record source does, ~3x faster than record by record).

    A prepared dataset whose files were damaged after it was written (truncated, overwritten)
    fails here, in the middle of training: the error names its directory and split."""
    info = getattr(source, "dataset_info", None)
    try:
        if hasattr(source, "__getitems__"):
            return list(source.__getitems__(indices))
        return [source[i] for i in indices]
    except Exception as e:  # noqa: BLE001  (array_record/Riegeli raise RuntimeError, OSError...)
        if info is None:
            raise           # an in-memory source: not a file problem
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            file=f"{info.data_dir} (split {getattr(source, 'split', '?')})",
            reason=f"cannot read records {indices[:3]}{'...' if len(indices) > 3 else ''}: "
                   f"{type(e).__name__}: {first[:300]}",
            fix="its files are damaged; delete that directory so the next run prepares it "
                "again (the testbed) or prepare it again (docs/data.md)") from None


def index_batches(source, *, kind: str, config: BatchConfig,
                  to_batch: Callable[[list[int], list], dict]) -> BatchIterator:
    """The pipeline under every iterator: the indices of `source` shuffled per epoch from
    config.seed, repeated, cut into batches; `to_batch(indices, records)` makes each batch."""
    n = len(source)
    ds = grain.MapDataset.range(n)
    if config.shuffle:
        # A fresh permutation every epoch, all derived from config.seed.
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(config.num_epochs).batch(config.batch_size,
                                            drop_remainder=config.drop_remainder, batch_fn=list)

    def fetch(indices):
        indices = [int(i) for i in indices]
        return to_batch(indices, read(source, indices))

    fingerprint = dict(kind=kind, num_examples=n, batch_size=config.batch_size,
                       seed=config.seed, shuffle=config.shuffle, buckets=list(config.buckets))
    if config.packing:     # the same examples per batch; a packed batch is laid out otherwise
        fingerprint["packing"] = True
    return BatchIterator(ds.map(fetch), fingerprint=fingerprint, num_examples=n,
                         batch_size=config.batch_size, prefetch=config.prefetch,
                         num_batches=None if config.num_epochs is None else len(ds))
