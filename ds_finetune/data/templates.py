"""`data.chat_template`: a Jinja file or a template string that replaces the tokenizer's chat template, for
the data (renderings, masks) and for the run's tokenizer (so an export ships the template it trained with).

A value holding `{{` or `{%` is a template; anything else is a file path. Its identity in the cache key and
the fingerprint is the template's text (sha256), not the path: an edited file is a changed setting, a moved
one is not.
"""

from __future__ import annotations

import copy

from ds_finetune.data_config import chat_template_text


def with_chat_template(tok, value: str | None):
    """`tok` with data.chat_template as its chat template (a shallow copy: the caller's tokenizer keeps its
    own); `tok` itself when unset or already the same."""
    if value is None:
        return tok
    text = chat_template_text(value)
    if getattr(tok, "chat_template", None) == text:
        return tok
    tok = copy.copy(tok)
    tok.chat_template = text
    return tok
