"""Reading raw records, failing well on bad ones, and the HH-RLHF transcript format.

Every check names the file, the record index (0-based line number for JSON lines) and the field.
With `skip_invalid=True` the record is skipped instead and counted in a `SkipLog`, which the
builders store in their dataset metadata (`builder.info.metadata["skipped"]`). A whole file that
cannot be read (truncated or corrupt archive, an HTML page saved under the data's name) is a
`DataError` naming the file; with `skip_invalid=True` it is left out and named in the log.
Files that a builder does not read are listed in the log too: nothing is ignored silently.
"""

from __future__ import annotations

import bz2
import collections
import gzip
import json
import lzma
import os
import re
import tarfile
import zlib
from typing import Any, Iterator

from rlhf_jax.errors import UserError

# What fixing a bad record or file takes, appended to the message of the error that is raised.
FIX_RECORD = "fix or remove the record, or prepare with skip_invalid=True to skip and count it"
FIX_FILE = ("download the file again or remove it; or prepare with skip_invalid=True to "
            "leave it out and name it in builder.skipped")

# JSON-lines files, plain or compressed; the compression is read from the last suffix.
JSON_SUFFIXES = tuple(base + comp for base in (".jsonl", ".json")
                      for comp in ("", ".gz", ".bz2", ".xz"))
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}

# What reading a damaged file raises: truncated streams (EOFError), a file that is not in the
# format its name says (gzip.BadGzipFile, an OSError), corrupt compressed bodies (zlib.error,
# lzma.LZMAError), broken archives (tarfile.TarError), unreadable paths (OSError).
READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError)


def short(value: Any, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, for one-line messages about bad values."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class DataError(UserError):
    """A bad input file or record: `file`, `index` and `field` say where (index and field are
    None for a whole file), `reason` says what, `fix` (optional) how to fix it. One line."""

    def __init__(self, *, file: str, index: int | None = None, field: str | None = None,
                 reason: str, fix: str | None = None):
        self.file, self.index, self.field, self.reason, self.fix = file, index, field, reason, fix
        where = f"{file}: record {index}" if index is not None else f"{file}"
        if field is not None:
            where += f": field {field!r}"
        # One line whatever the inputs: a reason quoting a value never breaks the line.
        message = " ".join(f"{where}: {reason}".split())
        super().__init__(f"{message}; {fix}" if fix else message)

    def with_fix(self, fix: str) -> "DataError":
        """The same error with `fix` as its advice, unless it already has some."""
        if self.fix:
            return self
        return type(self)(file=self.file, index=self.index, field=self.field,
                          reason=self.reason, fix=fix)


def unreadable(path: str, exc: BaseException, *, name: str | None = None) -> DataError:
    """The DataError for a file that cannot be opened or decompressed, with what it holds
    instead when that is recognisable (nothing, or an HTML page from a failed download)."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        head = None
    if head == b"":
        detail = "the file is empty"
    elif head is not None and head.lstrip()[:1] == b"<" and b"html" in head.lower():
        detail = "it is an HTML page, not the data: a failed download?"
    return DataError(file=name or path, reason=f"cannot be read ({detail})", fix=FIX_FILE)


class SkipLog:
    """Raises on the first bad record or file, or (skip_invalid=True) counts and remembers
    them; also lists the files that were not read (`ignore`)."""

    MAX_EXAMPLES = 20
    MAX_IGNORED = 50

    def __init__(self, *, skip_invalid: bool):
        self.skip_invalid = skip_invalid
        self.count = 0
        self.by_reason: collections.Counter = collections.Counter()
        self.examples: list[str] = []
        self.filtered: collections.Counter = collections.Counter()
        self.bad_files: list[str] = []
        self.ignored: list[str] = []
        self.ignored_count = 0

    def bad(self, err: DataError) -> None:
        """Raises `err`, or with skip_invalid counts and remembers it."""
        if not self.skip_invalid:
            raise err.with_fix(FIX_RECORD)
        self.count += 1
        self.by_reason[err.reason] += 1
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(str(err))

    def bad_file(self, err: DataError) -> None:
        """A file that cannot be read: raises `err`, or with skip_invalid names it."""
        if not self.skip_invalid:
            raise err.with_fix(FIX_FILE)
        self.bad_files.append(f"{err.file}: {err.reason}")

    def filter(self, reason: str) -> None:
        """Counts a valid record left out on purpose (e.g. CNN/DM rows of the TL;DR files)."""
        self.filtered[reason] += 1

    def ignore(self, name: str) -> None:
        """Notes a file that the builder does not read (its name or extension says it is not
        data of this builder); the first MAX_IGNORED are listed, all are counted."""
        self.ignored_count += 1
        if len(self.ignored) < self.MAX_IGNORED:
            self.ignored.append(name)

    def summary(self) -> dict:
        """The counts as a JSON-able dict, as stored in the dataset metadata."""
        return {"skipped": self.count, "by_reason": dict(self.by_reason),
                "examples": list(self.examples), "filtered": dict(self.filtered),
                "bad_files": list(self.bad_files), "ignored_files": list(self.ignored),
                "ignored_files_count": self.ignored_count}

    def files_note(self) -> str:
        """"2 damaged files skipped: a, b; 1 file not read: c" (empty when there are none)."""
        notes = []
        if self.bad_files:
            notes.append(f"{plural(len(self.bad_files), 'damaged file')} skipped: "
                         + ", ".join(self.bad_files))
        if self.ignored_count:
            more = self.ignored_count - len(self.ignored)
            notes.append(f"{plural(self.ignored_count, 'file')} not read: "
                         + ", ".join(self.ignored) + (f" and {more} more" if more else ""))
        return "; ".join(notes)


def plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


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
    """record["a"]["b"][0]... for path "a.b[0]"; a missing step, or a step into something that
    is not an object / list, is a DataError naming `path`."""
    cur, done = record, ""
    for part in path.replace("[", ".[").split("."):
        if not part:
            continue
        if part.startswith("["):
            i = int(part[1:-1])
            if not isinstance(cur, list):
                raise DataError(file=file, index=index, field=path,
                                reason=f"expected a list at {done!r}, got "
                                       f"{type(cur).__name__}")
            if len(cur) <= i:
                raise DataError(file=file, index=index, field=path, reason="missing")
            cur = cur[i]
        else:
            if not isinstance(cur, dict):
                raise DataError(file=file, index=index, field=path,
                                reason=f"expected an object at {done!r}, got "
                                       f"{type(cur).__name__}")
            if part not in cur:
                raise DataError(file=file, index=index, field=path, reason="missing")
            cur = cur[part]
        done = f"{done}{part}" if part.startswith("[") or not done else f"{done}.{part}"
    return cur


def open_data_file(path: str):
    """Opens a plain, .gz, .bz2 or .xz file for binary reading (by its last suffix)."""
    return _OPENERS.get(os.path.splitext(path)[1], open)(path, "rb")


def read_jsonl(path: str, *, display_name: str | None = None
               ) -> Iterator[tuple[int, dict | DataError]]:
    """(index, record) per non-blank line of a .jsonl / .json file, plain or .gz, .bz2, .xz
    compressed.

    The whole file is read by this call, before any record is parsed, so a file that cannot be
    read or decompressed, or holds no line at all, raises one DataError naming it here and
    contributes no records, wherever the damage is. Bytes are decoded as UTF-8 with
    "surrogateescape" so one bad byte does not hide which field it is in (`check_text` reports
    it); a line that is not a JSON object yields a DataError in place of the record.
    """
    name = display_name or path
    try:
        with open_data_file(path) as f:
            lines = f.readlines()
    except READ_ERRORS as e:
        raise unreadable(path, e, name=name) from None
    if not any(line.strip() for line in lines):
        # An empty file among the data is a failed download or copy, not an empty dataset.
        raise DataError(file=name, reason="holds no records (the file is empty)", fix=FIX_FILE)
    return _parse_lines(lines, name)


def _parse_lines(lines: list[bytes], name: str) -> Iterator[tuple[int, dict | DataError]]:
    for index, raw in enumerate(lines):
        line = raw.decode("utf-8", errors="surrogateescape").strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            yield index, DataError(file=name, index=index, field="<record>",
                                   reason=f"not valid JSON ({e.msg})")
            continue
        except RecursionError:
            # json's parser recurses once per nesting level; no real record nests this deep.
            yield index, DataError(file=name, index=index, field="<record>",
                                   reason="JSON nested too deeply to read")
            continue
        if not isinstance(rec, dict):
            yield index, DataError(file=name, index=index, field="<record>",
                                   reason=f"not a JSON object (got {type(rec).__name__})")
            continue
        yield index, rec


def list_files(root: str, suffixes: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(files under `root` ending in one of `suffixes`, all other files), recursively, sorted.

    Names starting with "." (.git, .DS_Store, editor files) are neither data nor listed.
    """
    found, other = [], []
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for n in names:
            if not n.startswith("."):
                (found if n.endswith(suffixes) else other).append(os.path.join(dirpath, n))
    return sorted(found), sorted(other)


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


def hh_prompt_problem(prompt: str) -> str | None:
    """Why an HH prompt (the text before the final assistant turn) cannot be used, or None.

    It needs at least one human turn, and every human turn needs text: without them the
    preference is over a response to nothing, which teaches a reward model only noise.
    """
    parts = _HH_TURN.split(prompt)
    human = [content for role, content in zip(parts[1::2], parts[2::2]) if role == "Human"]
    if not human:
        return "no human turn before the final assistant turn"
    for k, content in enumerate(human):
        if not content.strip():
            return f"empty human turn (human turn {k} of the conversation)"
    return None


def same_up_to_whitespace(a: str, b: str) -> bool:
    """True when `a` and `b` are the same text once all whitespace is removed: a pair that
    differs only in spacing or line breaks carries no preference worth learning."""
    return "".join(a.split()) == "".join(b.split())
