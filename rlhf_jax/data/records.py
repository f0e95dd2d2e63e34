"""Reading raw records, failing well on bad ones, and the HH-RLHF transcript format.

Every check names the file, the record index (0-based line number for JSON lines) and the field.
With `skip_invalid=True` the record is skipped instead and counted in a `SkipLog`, which the
builders store in their dataset metadata (`builder.info.metadata["skipped"]`).
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import re
from typing import Any, Iterator


class DataError(ValueError):
    """A bad input record: `file`, `index` and `field` say where, `reason` says what."""

    def __init__(self, *, file: str, index: int | None, field: str, reason: str):
        self.file, self.index, self.field, self.reason = file, index, field, reason
        where = f"{file}: record {index}" if index is not None else f"{file}"
        super().__init__(f"{where}: field {field!r}: {reason}")


class SkipLog:
    """Raises on the first bad record, or (skip_invalid=True) counts and remembers them."""

    MAX_EXAMPLES = 20

    def __init__(self, *, skip_invalid: bool):
        self.skip_invalid = skip_invalid
        self.count = 0
        self.by_reason: collections.Counter = collections.Counter()
        self.examples: list[str] = []
        self.filtered: collections.Counter = collections.Counter()

    def bad(self, err: DataError) -> None:
        """Raises `err`, or with skip_invalid counts and remembers it."""
        if not self.skip_invalid:
            raise err
        self.count += 1
        self.by_reason[err.reason] += 1
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(str(err))

    def filter(self, reason: str) -> None:
        """Counts a valid record left out on purpose (e.g. CNN/DM rows of the TL;DR files)."""
        self.filtered[reason] += 1

    def summary(self) -> dict:
        """The counts as a JSON-able dict, as stored in the dataset metadata."""
        return {"skipped": self.count, "by_reason": dict(self.by_reason),
                "examples": list(self.examples), "filtered": dict(self.filtered)}


def check_text(value: Any, *, file: str, index: int | None, field: str,
               max_chars: int | None = None, allow_empty: bool = False) -> str:
    """Returns `value` if it is usable text, else raises DataError naming the field.

    Undecodable text shows up as lone surrogates: invalid UTF-8 bytes read with
    "surrogateescape", or JSON escapes such as "\\ud800"; neither can be encoded back to UTF-8.
    """
    def fail(reason):
        raise DataError(file=file, index=index, field=field, reason=reason)

    if value is None:
        fail("missing")
    if not isinstance(value, str):
        fail(f"expected text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        fail("undecodable text (invalid UTF-8)")
    if not allow_empty and not value.strip():
        fail("empty")
    if max_chars is not None and len(value) > max_chars:
        fail(f"longer than the limit ({len(value)} > max_chars={max_chars})")
    return value


def get_field(record: Any, path: str, *, file: str, index: int) -> Any:
    """record["a"]["b"][0]... for path "a.b[0]"; a missing step is a DataError naming `path`."""
    cur = record
    for part in path.replace("[", ".[").split("."):
        if not part:
            continue
        if part.startswith("["):
            i = int(part[1:-1])
            if not isinstance(cur, list) or len(cur) <= i:
                raise DataError(file=file, index=index, field=path, reason="missing")
            cur = cur[i]
        else:
            if not isinstance(cur, dict) or part not in cur:
                raise DataError(file=file, index=index, field=path, reason="missing")
            cur = cur[part]
    return cur


def read_jsonl(path: str, *, display_name: str | None = None
               ) -> Iterator[tuple[int, dict | DataError]]:
    """Yields (index, record) per non-blank line of a .jsonl / .json / .gz file.

    Bytes are decoded as UTF-8 with "surrogateescape" so one bad byte does not hide which field
    it is in (`check_text` reports it); a line that is not a JSON object yields a DataError.
    """
    name = display_name or path
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for index, raw in enumerate(f):
            line = raw.decode("utf-8", errors="surrogateescape").strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield index, DataError(file=name, index=index, field="<record>",
                                       reason=f"not valid JSON ({e.msg})")
                continue
            if not isinstance(rec, dict):
                yield index, DataError(file=name, index=index, field="<record>",
                                       reason="not a JSON object")
                continue
            yield index, rec


def find_files(root: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files under `root` (recursively) ending in one of `suffixes`, sorted for determinism."""
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.join(dirpath, n) for n in names if n.endswith(suffixes)]
    return sorted(out)


# HH-RLHF transcripts ("\n\nHuman: ...\n\nAssistant: ...", Bai et al. 2022).

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_hh_conversation(text: str) -> tuple[str, str] | None:
    """Splits an HH transcript before its final assistant turn.

    "\\n\\nHuman: q\\n\\nAssistant: a" -> ("\\n\\nHuman: q\\n\\nAssistant:", "a"): the prompt
    keeps everything up to and including the last "\\n\\nAssistant:", the response loses the one
    space after it. None when there is no assistant turn.
    """
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        return None
    cut += len(HH_ASSISTANT)
    response = text[cut:]
    return text[:cut], response[1:] if response.startswith(" ") else response


def hh_to_messages(text: str) -> list[dict]:
    """HH text -> [{"role": "user" | "assistant", "content": str}, ...] for a chat format. A
    trailing empty "Assistant:" (a prompt) yields no final message."""
    parts = _HH_TURN.split(text)
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        content = content.strip()
        if content or role == "Human":
            messages.append({"role": "user" if role == "Human" else "assistant",
                             "content": content})
    return messages
