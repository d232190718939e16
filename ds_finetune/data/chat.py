"""Chat masks: where each assistant reply and its end-of-turn marker lie in a conversation rendered with the
tokenizer's chat template, as character spans, and the tokens those spans cover (docs/design.md, "Chat masks").

A conversation's replies are located by the first of three ways that finds all of them:

1. markers (the usual way): the conversation rendered again with a unique marker in place of each reply's
   content. The rendering must be that text with each marker put back as the content (or the content less
   surrounding whitespace, for templates that trim it); the generation prompt plays no part, so templates
   whose generation prompt has whitespace the assistant turn lacks are located too;
2. prefixes: the reply is what follows the generation prompt in the rendering that ends with it, unchanged
   once later turns follow (templates that rewrite the last reply, e.g. reformat its reasoning);
3. the template's own {% generation %} tags.

A span starts at the reply's content (whitespace the template writes before it is not the reply) and
ends after the template's end-of-turn text: what it writes after the reply when the reply ends the
conversation, as far as the full rendering has it too, less trailing whitespace (a newline after the end
marker is layout). What follows the last turn (such as an eos) belongs to the last reply.
"""

from __future__ import annotations

import re

import numpy as np

from ds_finetune.errors import UserError

# (start, end, cut_inside_token) of a reply in the text; the flag: the end-of-turn text the reply has when
# it ends the conversation and the full rendering parted at `end`, maybe inside a token (`<|` of `<|eos|>`
# against `<|user|>`), so a token straddling `end` is not part of the reply.
Span = tuple[int, int, bool]

MARK = "\ue000"  # a private-use character: no template trims, escapes or splits it, and text has none


# ---------------------------------------------------------------------------------------------- rendering

def plain(messages: list) -> bool:
    return all(len(m) == 2 for m in messages)  # only role and content (already checked to be strings)


class ChatRenderer:
    """render(messages, generation_prompt) -> str. The compiled template called directly (a fifth of
    apply_chat_template's cost, which converts every message on every call) for plain messages, once it has
    rendered the first plain conversation exactly as apply_chat_template does; apply_chat_template otherwise."""

    def __init__(self, tok):
        self.tok, self._fast, self._checked = tok, None, False

    def __call__(self, messages: list, generation_prompt: bool) -> str:
        if not messages:
            return ""  # apply_chat_template refuses an empty conversation
        if plain(messages):
            if not self._checked:
                self._fast, self._checked = self._compiled(messages), True
            if self._fast is not None:
                return self._fast(messages, generation_prompt)
        return self.slow(messages, generation_prompt)

    def slow(self, messages: list, generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _compiled(self, sample: list):
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template
            template = _compile_jinja_template(self.tok.chat_template)
            context = {**self.tok.special_tokens_map, "tools": None, "documents": None}

            def fast(messages, generation_prompt):
                return template.render(messages=messages, add_generation_prompt=generation_prompt, **context)
            if all(fast(sample[:n], g) == self.slow(sample[:n], g) for n in (1, len(sample)) for g in (False, True)):
                return fast
        except Exception:  # a private helper of transformers: any change there only costs speed
            pass
        return None


# ------------------------------------------------------------------------------------------- the replies

def reply_spans(tok, render: ChatRenderer, messages: list, targets: list[int], at: str,
                turns: str = "all") -> tuple[str, list[Span]]:
    """(rendering of `messages`, spans of the replies `targets` (message indices) in it). Refuses in one
    line when the replies cannot be located; `turns` only shapes that line's advice."""
    text = render(messages, False)
    if not targets:
        return text, []
    spans = marker_spans(render, messages, targets, text)
    if spans is None:
        spans = prefix_spans(render, messages, targets, text)
    if spans is None and has_generation_tags(tok):
        text, spans = tagged_spans(tok, messages, only_last=turns == "last")
    if spans is None:
        raise UserError(_refusal(tok, render, messages, targets, at, turns))
    return text, spans


def marker_spans(render, messages: list, targets: list[int], text: str) -> list[Span] | None:
    """The replies' spans when `text` is the rendering with markers in place of their contents and each
    marker put back as its content (or the content less surrounding whitespace); None otherwise."""
    if MARK in text:
        return None
    markers = {j: f"{MARK}{n}{MARK}" for n, j in enumerate(targets)}
    marked = [dict(m, content=markers[j]) if j in markers else m for j, m in enumerate(messages)]
    pieces = _split(render(marked, False), [markers[j] for j in targets])
    if pieces is None:
        return None
    spans, pos = [], 0
    for n, j in enumerate(targets):
        if not text.startswith(pieces[n], pos):
            return None
        pos += len(pieces[n])
        content = _rendered_content(text, pos, messages[j]["content"], pieces[n + 1], n + 1 == len(targets))
        if content is None:
            return None
        start, pos = pos, pos + len(content)
        ending = pieces[-1] if j + 1 == len(messages) else _ending(render, marked[:j + 1], markers[j])
        shared = _common_prefix_len(ending, text[pos:pos + len(ending)])
        spans.append((start, pos + len(ending[:shared].rstrip()), shared < len(ending)))
    return spans


def _split(rendered: str, markers: list[str]) -> list[str] | None:
    """The template's text between the markers (len(markers) + 1 pieces), if each is there once, in order."""
    pieces, pos = [], 0
    for marker in markers:
        at = rendered.find(marker, pos)
        if at < 0 or rendered.find(marker, at + len(marker)) >= 0:
            return None
        pieces.append(rendered[pos:at])
        pos = at + len(marker)
    return pieces + [rendered[pos:]] if MARK not in rendered[pos:] else None


def _rendered_content(text: str, pos: int, content: str, following: str, last: bool) -> str | None:
    """The content as the template wrote it at `pos`, followed by the template's next piece of text."""
    for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
        after = pos + len(candidate)
        if text.startswith(candidate, pos) and text.startswith(following, after) \
                and (not last or after + len(following) == len(text)):
            return candidate
    return None


def _ending(render, marked: list, marker: str) -> str:
    """What the template writes after a reply that ends the conversation (its end-of-turn marker, an eos)."""
    rendered = render(marked, False)
    return rendered[rendered.index(marker) + len(marker):]


def prefix_spans(render, messages: list, targets: list[int], text: str) -> list[Span] | None:
    """The replies' spans when each reply is what follows the generation prompt (up to whitespace) in the
    rendering that ends with the reply, and the full rendering still has it; None otherwise."""
    spans = []
    for i in targets:
        upto = text if i + 1 == len(messages) else render(messages[:i + 1], False)
        prompt = render(messages[:i], True)
        start = _common_prefix_len(prompt, upto)
        if prompt[start:].strip():
            return None  # the generation prompt is not where the reply's turn starts
        end = _common_prefix_len(upto, text)
        if end < len(upto) and messages[i]["content"].strip() not in text[start:end]:
            return None  # the reply is rendered differently once later turns follow
        spans.append((start, max(start, len(text[:end].rstrip())), end < len(upto)))
    return spans


def has_generation_tags(tok) -> bool:
    return bool(re.search(r"\{%-?\s*generation\s*-?%\}", str(getattr(tok, "chat_template", "") or "")))


def tagged_spans(tok, messages: list, only_last: bool = False) -> tuple[str, list[Span]]:
    """(rendering, the spans its {% generation %} tags mark, or the last one). As for the other ways,
    whitespace at the end of a tagged span is layout (a newline after the end marker), not reply."""
    from transformers.utils.chat_template_utils import render_jinja_template
    texts, indices = render_jinja_template([messages], chat_template=tok.chat_template,
                                           return_assistant_tokens_mask=True, **tok.special_tokens_map)
    text = texts[0]
    spans = [(a, a + len(text[a:b].rstrip()), False) for a, b in indices[0] if text[a:b].strip()]
    return text, spans[-1:] if only_last else spans


def _refusal(tok, render, messages: list, targets: list[int], at: str, turns: str) -> str:
    """The one-line refusal; it names data.chat_turns: last where one row per turn would be located."""
    head = f"data error: {at}: the chat template rewrites an assistant reply (its content is not in the " \
           f"rendered conversation, e.g. a reasoning part dropped once later turns follow)"
    tags = "" if has_generation_tags(tok) else " and has no {% generation %} tags"
    if turns == "all" and all(marker_spans(render, messages[:i + 1], [i], render(messages[:i + 1], False))
                              or prefix_spans(render, messages[:i + 1], [i], render(messages[:i + 1], False))
                              for i in targets):
        return f"{head}{tags}, so its tokens cannot be located in one rendering; set data.chat_turns: last " \
               f"(one row per assistant turn)"
    return f"{head}{tags}, so its tokens cannot be located; add {{% generation %}} tags around each reply " \
           f"in the template (tokenizer.chat_template)"


def _common_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ------------------------------------------------------------------------------------------------- masks

def span_mask(text: str, encoding, n: int, spans: list[Span]) -> np.ndarray:
    """The tokens with a character in a span (a reply's first token always is one), from a few
    character<->token lookups per span: cheaper than every token's offsets, a Python tuple per token."""
    mask = np.zeros(n, dtype=bool)
    for a, b, cut_inside_token in spans:
        if cut_inside_token and b < len(text):
            t = encoding.char_to_token(b)  # a token straddling the end is the next turn's
            start = encoding.token_to_chars(t)[0] if t is not None else b
            b = len(text[:start].rstrip()) if start < b else b
        first, last = _token_at(encoding, range(a, b)), _token_at(encoding, range(b - 1, a - 1, -1))
        if first is None or last is None:
            continue  # no token has a character of the span
        while first > 0 and encoding.token_to_chars(first - 1)[1] > a:  # several tokens of one character
            first -= 1
        while last + 1 < n and encoding.token_to_chars(last + 1)[0] < b:
            last += 1
        mask[first:last + 1] = True
    return mask


def _token_at(encoding, chars: range) -> int | None:
    """The token of the first character in `chars` that has one (a normalizer may drop characters)."""
    for c in chars:
        t = encoding.char_to_token(c)
        if t is not None:
            return t
    return None
