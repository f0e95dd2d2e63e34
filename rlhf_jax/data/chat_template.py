"""Chat templates: a checkpoint's Jinja template rendered as transformers renders it, with the
character spans of the assistant's text for loss masks.

`compile_template(source)` compiles a template in a sandboxed environment (trim_blocks,
lstrip_blocks, the `raise_exception` and `strftime_now` globals, and the `{% generation %}`
tag); rendering wraps each generation block in marks that `strip_generation_marks` turns into
(start, end) character spans, and `span_mask` maps spans to the tokens that overlap them.
`BaseTokenizer.encode_chat` (tokenizer.py) puts these together.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from typing import Sequence

import numpy as np


class ChatTemplateError(ValueError):
    """A chat template that fails on a conversation (its own `raise_exception`, a Jinja error),
    or renders it in a way loss masks cannot be read from."""


# ---------------------------------------------------------------------------------------------
# Chat templates (Jinja, rendered the way transformers renders them)
# ---------------------------------------------------------------------------------------------

# `{% generation %}` output is wrapped in two Unicode noncharacters, which never occur in
# interchanged text, and their positions become the spans after rendering. Marking the text
# rather than counting what was rendered so far keeps the spans right also where a template
# captures output in a `{% set %}` block and prints it later.
_GEN_OPEN, _GEN_CLOSE = "\ufdd0", "\ufdd1"
_GEN_SPLIT = re.compile(f"([{_GEN_OPEN}{_GEN_CLOSE}])")
HAS_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@functools.lru_cache(maxsize=None)
def _jinja_env():
    """The sandboxed environment chat templates run in: trim_blocks and lstrip_blocks, the
    `raise_exception` and `strftime_now` globals, a `tojson` that does not HTML-escape, loop
    controls, and the `generation` tag (the conventions of transformers' templates)."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: text the assistant generates."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body
                                          ).set_lineno(lineno)

        def _mark(self, caller):
            return _GEN_OPEN + caller() + _GEN_CLOSE

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    return env


@functools.lru_cache(maxsize=32)
def compile_template(source: str):
    import jinja2

    try:
        return _jinja_env().from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from None


def strip_generation_marks(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text with generation marks -> (text, [(start, end) character spans])."""
    out, spans, length, depth, start = [], [], 0, 0, 0
    for part in _GEN_SPLIT.split(text):
        if part == _GEN_OPEN:
            start = length if depth == 0 else start
            depth += 1
        elif part == _GEN_CLOSE:
            depth -= 1
            if depth < 0:
                break
            if depth == 0:
                spans.append((start, length))
        else:
            out.append(part)
            length += len(part)
    if depth != 0:
        raise ChatTemplateError("the conversation contains the characters U+FDD0/U+FDD1, "
                                "which mark generated text while rendering; remove them")
    return "".join(out), spans


def span_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
               ) -> np.ndarray:
    """1 on each token whose characters overlap a span (as transformers' assistant masks)."""
    se = np.asarray(offsets, np.int64).reshape(-1, 2)
    mask = np.zeros(len(se), bool)
    for a, b in spans:
        mask |= (se[:, 1] > a) & (se[:, 0] < b)
    return mask.astype(np.int32)
