"""Rows whose text no tokenizer can take, refused in one line naming the file and line before they reach it.

JSONL lines are read with `surrogateescape` (sources.py), so a byte that is not UTF-8 (`\\xff`, `\\xc3\\x28`,
an encoded surrogate `\\xed\\xa0\\x80`) arrives as one of the characters U+DC80..U+DCFF; and valid JSON can
spell a lone UTF-16 surrogate as an escape (`"\\ud800"`). Either way the row holds a string that is not
text: the fast tokenizers refuse it with a TypeError ("TextEncodeInput must be Union[...]") that names
neither the row nor the problem.
"""

from __future__ import annotations

import re

from ds_finetune.errors import UserError

# A JSON escape of a surrogate (\uD800-\uDFFF). Pairs (an emoji written as two escapes) match too; the walk
# below then finds nothing, since json joins a pair into one character.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_ESCAPED_BYTES = range(0xDC80, 0xDD00)  # where surrogateescape puts the bytes 0x80..0xff


def check_line_is_utf8(line: str, at: str) -> None:
    """A one-line data error unless the raw line decoded as UTF-8 (see the module docstring)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(line[e.start])
        what = f"byte 0x{char - 0xDC00:02x}" if char in _ESCAPED_BYTES else f"character U+{char:04X}"
        raise UserError(f"data error: {at}: not valid UTF-8 ({what} at character {e.start + 1}); save the file as "
                        f"UTF-8 or fix the line") from None


def check_row_text(row: dict, at: str, line: str | None = None) -> None:
    """A one-line data error naming the field when any key or string of the row (nested in lists and
    objects too) holds a lone surrogate. `line`: the valid UTF-8 JSON line the row was decoded from, if any;
    without a surrogate escape in it (most lines) the row cannot hold one and is not walked."""
    if line is not None and _SURROGATE_ESCAPE.search(line) is None:
        return
    field = _first_field_with_surrogate(row)
    if field is not None:
        raise UserError(f"data error: {at}: {field} holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                        f"that is half of a character, not text); fix the escape or remove the row")


def _first_field_with_surrogate(row: dict) -> str | None:
    """Where the first broken string is (`field 'messages'[1].content`), or None."""
    stack = [("", row)]  # iterative: a row nested as deep as json allows must not overflow the stack here
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _broken(value):
                return f"field {_bounded(path)}"
        elif isinstance(value, dict):
            for key in value:
                if isinstance(key, str) and _broken(key):
                    return f"a key of field {_bounded(path)}" if path else "a column name"
            children = [(f"{path}.{_name(k)}" if path else repr(k), v) for k, v in value.items()]
            stack += reversed(children)
        elif isinstance(value, list):
            stack += reversed([(f"{path}[{i}]", v) for i, v in enumerate(value)])
    return None


def _broken(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _name(key) -> str:
    return key if isinstance(key, str) and key.isidentifier() else repr(key)


def _bounded(path: str, limit: int = 80) -> str:
    return path if len(path) <= limit else path[:limit - 3] + "..."
