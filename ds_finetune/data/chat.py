"""Chat masks: where each assistant reply and its end-of-turn marker lie in a conversation rendered with the
tokenizer's chat template, as character spans, and the tokens those spans cover (docs/design.md, "Chat masks").

Each reply is located by the first of three ways that finds it:

1. prefixes (the usual way): the reply is what follows the generation prompt in the rendering that ends
   with the reply, the same once later turns follow. A generation prompt with whitespace the assistant
   turn lacks (an extra newline, indentation) is matched without its whitespace;
2. markers: the conversation rendered again with a unique marker in place of each reply's content; the
   rendering must be that text with the marker put back as the content (or the content less surrounding
   whitespace, for templates that trim it). For replies the prefixes miss: a template that renders a reply
   differently once it is no longer the last turn, or whose generation prompt is not its turn's header;
3. the template's own {% generation %} tags, for the whole conversation.

A span starts where the model starts generating: after the generation prompt, or at the content (whitespace
the template writes before it is not the reply) where the prompt does not say; it ends after the template's
end-of-turn text: what it writes after the reply when the reply ends the conversation, as far as the full
rendering has it too, less trailing whitespace (a newline after the end marker is layout). What follows
the last turn (such as an eos) belongs to the last reply.
"""

from __future__ import annotations

import re

import jinja2
import numpy as np

from ds_finetune.errors import UserError

# (start, end, cut_inside_token) of a reply in the text; the flag: the end-of-turn text the reply has when
# it ends the conversation and the full rendering parted at `end`, maybe inside a token (`<|` of `<|eos|>`
# against `<|user|>`), so a token straddling `end` is not part of the reply.
Span = tuple[int, int, bool]

MARK = "\ue000"  # a private-use character: no template trims, escapes or splits it, and text has none


# ---------------------------------------------------------------------------------------------- rendering

def check_messages(messages: list, at: str) -> None:
    """A one-line data error unless every message is a dict with string `role` and `content`."""
    for j, m in enumerate(messages):
        bad = ("role", "content") if not isinstance(m, dict) else \
            [k for k in ("role", "content") if not isinstance(m.get(k), str)]
        if bad:
            raise UserError(f"data error: {at}, message {j + 1}: {' and '.join(map(repr, bad))} missing or "
                            f"not a string; each message needs string fields 'role' and 'content'")


def plain(messages: list) -> bool:
    return all(len(m) == 2 for m in messages)  # only role and content (already checked to be strings)


class ChatRenderer:
    """for_conversation(messages) -> render(messages, generation_prompt) -> str, for that conversation and
    its parts. The compiled template called directly (a fifth of apply_chat_template's cost, which converts
    every message on every call) for plain messages, once it has rendered the first plain conversation
    exactly as apply_chat_template does; apply_chat_template otherwise."""

    def __init__(self, tok):
        self.tok, self._fast, self._checked = tok, None, False

    def for_conversation(self, messages: list):
        if messages and plain(messages) and not self._checked:
            self._fast, self._checked = self._compiled(messages), True
        return self._fast if self._fast is not None and plain(messages) else self.slow

    def slow(self, messages: list, generation_prompt: bool) -> str:
        if not messages:  # apply_chat_template refuses an empty conversation; the prompt of a reply that opens one
            from transformers.utils.chat_template_utils import render_jinja_template
            return render_jinja_template([[]], chat_template=self.tok.chat_template,
                                         add_generation_prompt=generation_prompt, **self.tok.special_tokens_map)[0][0]
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

def reply_spans(tok, renderer: ChatRenderer, messages: list, targets: list[int], at: str,
                turns: str = "all") -> tuple[str, list[Span]]:
    """(rendering of `messages`, spans of the replies `targets` (message indices) in it). Refuses in one
    line when the replies cannot be located; `turns` only shapes that line's advice."""
    if not messages:
        return "", []
    render = renderer.for_conversation(messages)
    try:
        text = render(messages, False)
        spans = locate(render, messages, targets, text)
        if None not in spans:
            return text, spans
        if has_generation_tags(tok):
            return tagged_spans(tok, messages, only_last=turns == "last")
        message = _refusal(render, messages, targets, at, turns)
    except jinja2.TemplateError as e:  # the template's raise_exception(...): a row it does not accept
        message = f"data error: {at}: the chat template refuses this conversation: {e}"
    raise UserError(message)


def locate(render, messages: list, targets: list[int], text: str) -> list[Span | None]:
    """Each reply's span from the prefix renderings, else from the markers; None where neither finds it.
    Prefixes first: they give what the model generates after the generation prompt (a space the turn has
    after its header and the prompt lacks is generated, so a target), as the masks were before markers."""
    spans = [prefix_span(render, messages, j, text) for j in targets]
    if None in spans:
        try:
            marked = marker_spans(render, messages, targets, text)
        except jinja2.TemplateError:  # a template that inspects the content refuses a marker: not this way
            marked = [None] * len(targets)
        spans = [span or by_marker for span, by_marker in zip(spans, marked)]
    return spans


def marker_spans(render, messages: list, targets: list[int], text: str) -> list[Span | None]:
    """The replies' spans where `text` is the rendering with markers in place of their contents, each marker
    put back as its content (or the content less surrounding whitespace). A reply the template rewrites
    (e.g. reformats its reasoning) is None, and the walk picks up again at the template's text after it."""
    if MARK in text:
        return [None] * len(targets)
    markers = {j: f"{MARK}{n}{MARK}" for n, j in enumerate(targets)}
    marked = [dict(m, content=markers[j]) if j in markers else m for j, m in enumerate(messages)]
    pieces = _split(render(marked, False), [markers[j] for j in targets])
    if pieces is None:
        return [None] * len(targets)
    spans, pos = [], 0  # pos: where pieces[n] is in text; None once lost
    for n, j in enumerate(targets):
        last = n + 1 == len(targets)
        span = None
        if pos is not None and text.startswith(pieces[n], pos):
            ending = pieces[-1] if j + 1 == len(messages) else _ending(render, marked[:j + 1], markers[j])
            span = _marked_reply(text, pos + len(pieces[n]), messages[j]["content"], ending, pieces[n + 1], last)
        spans.append(span)
        if not last:
            found = text.find(pieces[n + 1], pos) if span is None and pos is not None else -1
            pos = span[3] if span is not None else (found if found >= 0 else None)
    return [span[:3] if span is not None else None for span in spans]


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


def _marked_reply(text: str, pos: int, content: str, ending: str, following: str, last: bool):
    """(start, end, cut_inside_token, where its content ends) of the reply whose content the template wrote
    at `pos`, followed by its end-of-turn text (what `ending` and `following` share), or None. The last
    reply's `following` text must end the rendering."""
    shared = _common_prefix_len(ending, following)
    for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
        after = pos + len(candidate)
        if text.startswith(candidate, pos) and text.startswith(following[:shared], after) \
                and (not last or text[after:] == following):
            return pos, after + len(ending[:shared].rstrip()), shared < len(ending), after
    return None


def _ending(render, marked: list, marker: str) -> str:
    """What the template writes after a reply that ends the conversation (its end-of-turn marker, an eos)."""
    rendered = render(marked, False)
    return rendered[rendered.index(marker) + len(marker):]


def prefix_span(render, messages: list, i: int, text: str) -> Span | None:
    """Reply i's span when it is what follows the generation prompt (compared without its whitespace) in
    the rendering that ends with the reply, and the full rendering still has it there; else None."""
    upto = text if i + 1 == len(messages) else render(messages[:i + 1], False)
    start = _after_prompt(render(messages[:i], True), upto)
    if start is None:
        return None  # the generation prompt is not how the reply's turn starts
    end = _common_prefix_len(upto, text)
    if end < len(upto) and messages[i]["content"].strip() not in text[start:end]:
        return None  # the reply is rendered differently once later turns follow
    return start, max(start, len(text[:end].rstrip())), end < len(upto)


def _after_prompt(prompt: str, upto: str) -> int | None:
    """Where the reply starts in `upto`, the rendering that ends with it: after the generation prompt, if
    the prompt is a prefix of it up to trailing whitespace (the prompt's newline may be missing in the turn);
    else after the prompt's text matched without whitespace (templates put more or less of it in the
    prompt than in the turn) and, where the prompt ends with whitespace, after the turn's whitespace there
    too (the model is given it). None if the texts differ."""
    pos = _common_prefix_len(prompt, upto)
    if not prompt[pos:].strip():
        return pos
    for c in prompt[pos:]:
        if c.isspace():
            continue
        while pos < len(upto) and upto[pos].isspace():
            pos += 1
        if pos == len(upto) or upto[pos] != c:
            return None
        pos += 1
    return len(upto) - len(upto[pos:].lstrip()) if prompt[-1].isspace() else pos


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


def _refusal(render, messages: list, targets: list[int], at: str, turns: str) -> str:
    """The one-line refusal; it names data.chat_turns: last where one row per turn would be located."""
    head = f"data error: {at}: the chat template rewrites an assistant reply (its content is not in the " \
           f"rendered conversation where the template's own text puts it, e.g. reasoning dropped once later " \
           f"turns follow) and has no {{% generation %}} tags, so its tokens cannot be located"
    if turns == "all" and all(None not in locate(render, messages[:i + 1], [i], render(messages[:i + 1], False))
                              for i in targets):
        return f"{head} in one rendering; set data.chat_turns: last (one row per assistant turn)"
    return f"{head}; add {{% generation %}} tags around each reply in the template (tokenizer.chat_template)"


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
