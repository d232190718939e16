"""Rows -> token ids and target masks, one chunk of rows at a time (this runs in the preparation workers).

Formats: `text` (every token a target), `prompt_completion` (the completion and eos), `chat` (each
assistant reply and its end-of-turn marker, rendered with the tokenizer's chat template; located from
prefix renderings, else from the template's {% generation %} tags, or one row per assistant turn with
data.chat_turns: last — docs/design.md, "Chat masks"). Texts of a chunk
are tokenized in one batched fast-tokenizer call; a row's tokens are exactly those of tokenizing it alone.
Invariant: a row's first token is never a target (see ds_finetune/data/__init__.py).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np

from ds_finetune.errors import UserError


@dataclass
class ChunkArrays:
    """One chunk's kept rows, flat, ready to append to the cache's arrays."""
    input_ids: np.ndarray    # int32
    target_mask: np.ndarray  # bool
    lengths: np.ndarray      # int32, tokens per kept row
    row_targets: np.ndarray  # int32, targets per kept row
    row_ids: np.ndarray      # int64, dataset row index per kept row
    rows_read: int
    skipped: int


# ------------------------------------------------------------------------------------- worker process

_WORKER: dict = {}


def init_worker(tok, data_cfg) -> None:
    """Pool initializer: the tokenizer and settings arrive once per worker, not with every chunk."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    _WORKER.update(tok=tok, cfg=data_cfg)


def tokenize_chunk_in_worker(chunk) -> ChunkArrays:
    return tokenize_chunk(_WORKER["tok"], _WORKER["cfg"], chunk)


# ------------------------------------------------------------------------------------------------ rows

def _at(where: str, index: int) -> str:
    return f"{where} (row {index + 1})"


def decode_row(where: str, payload, index: int) -> dict:
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError as e:
            raise UserError(f"data error: {_at(where, index)}: not valid JSON ({getattr(e, 'msg', e)} at column "
                            f"{getattr(e, 'colno', '?')}); fix or remove the line") from None
    if not isinstance(payload, dict):
        raise UserError(f"data error: {_at(where, index)}: a row must be a JSON object, not "
                        f"{type(payload).__name__}")
    return payload


def _field(row: dict, name: str, at: str, fmt: str, setting: str, kind=str):
    value = row.get(name)
    if not isinstance(value, kind):
        what = "missing" if value is None else f"not a {kind.__name__}"
        needs = "a list of {role, content} messages" if fmt == "chat" else "it"
        raise UserError(f"data error: {at}: field {name!r} is {what} (format {fmt} needs {needs}; "
                        f"set data.{setting} if the column has another name)")
    return value


def tokenize_chunk(tok, cfg, chunk) -> ChunkArrays:
    first, items = chunk
    rows = [decode_row(where, payload, first + k) for k, (where, payload) in enumerate(items)]
    ats = [_at(where, first + k) for k, (where, _) in enumerate(items)]
    if cfg.format == "text":
        seqs = _text_seqs(tok, [_field(r, cfg.text_field, at, "text", "text_field") for r, at in zip(rows, ats)])
    elif cfg.format == "prompt_completion":
        prompts = [_field(r, cfg.prompt_field, at, cfg.format, "prompt_field") for r, at in zip(rows, ats)]
        completions = [_field(r, cfg.completion_field, at, cfg.format, "completion_field") for r, at in zip(rows, ats)]
        seqs = _prompt_completion_seqs(tok, prompts, completions)
    else:
        seqs = _chat_seqs(tok, [_field(r, cfg.messages_field, at, "chat", "messages_field", list)
                                for r, at in zip(rows, ats)], ats, cfg.chat_turns)
        return _keep_rows(seqs, cfg.max_length, first, len(items))
    return _keep_rows(((k, ids, mask) for k, (ids, mask) in enumerate(seqs)), cfg.max_length, first, len(items))


def _keep_rows(seqs, max_length: int, first: int, rows_read: int) -> ChunkArrays:
    """Truncate, clear each row's first target, drop rows left without targets; flatten. `seqs` yields
    (index of the dataset row in the chunk, ids, mask), in order; one dataset row may give several rows
    (data.chat_turns: last), and it is skipped when none of them is kept."""
    ids_parts, mask_parts, lengths, targets, kept = [], [], [], [], []
    for k, ids, mask in seqs:
        ids = np.asarray(ids[:max_length], dtype=np.int32)
        mask = np.array(mask[:max_length], dtype=bool)
        if len(mask):
            mask[0] = False  # a row's first token has nothing to be predicted from
        n_targets = int(mask.sum())
        if not n_targets:
            continue
        ids_parts.append(ids)
        mask_parts.append(mask)
        lengths.append(len(ids))
        targets.append(n_targets)
        kept.append(first + k)
    cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype))
    return ChunkArrays(cat(ids_parts, np.int32), cat(mask_parts, bool), np.asarray(lengths, np.int32),
                       np.asarray(targets, np.int32), np.asarray(kept, np.int64), rows_read,
                       rows_read - len(set(kept)))


# --------------------------------------------------------------------------------------------- formats

def _encode(tok, texts: list[str], offsets: bool = False):
    """Batched tokenization without special tokens. The Rust tokenizer directly where the wrapper would
    only add Python overhead (no truncation or padding configured); the same ids either way."""
    backend = getattr(tok, "backend_tokenizer", None)
    if not texts:
        return {"input_ids": [], "encodings": []}
    if backend is None or backend.truncation or backend.padding:
        out = tok(texts, add_special_tokens=False)
        return {"input_ids": out["input_ids"], "encodings": out.encodings}
    if not offsets:
        return {"input_ids": [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]}
    # The Encoding objects, not their offsets: a Python tuple per token costs more than the tokenizing.
    encs = backend.encode_batch(texts, add_special_tokens=False)
    return {"input_ids": [e.ids for e in encs], "encodings": encs}


def _text_seqs(tok, texts: list[str]):
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for ids in _encode(tok, texts)["input_ids"]:
        seq = bos + ids + [tok.eos_token_id]
        yield seq, [True] * len(seq)


def _prompt_completion_seqs(tok, prompts: list[str], completions: list[str]):
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for p, c in zip(_encode(tok, prompts)["input_ids"], _encode(tok, completions)["input_ids"]):
        p, c = bos + p, c + [tok.eos_token_id]
        yield p + c, [False] * len(p) + [True] * len(c)


def _check_messages(messages: list, at: str) -> None:
    for j, m in enumerate(messages):
        bad = ("role", "content") if not isinstance(m, dict) else \
            [k for k in ("role", "content") if not isinstance(m.get(k), str)]
        if bad:
            raise UserError(f"data error: {at}, message {j + 1}: {' and '.join(map(repr, bad))} missing or "
                            f"not a string; each message needs string fields 'role' and 'content'")


def chat_renderer(tok, sample: list):
    """render(messages, add_generation_prompt) -> str. The compiled template called directly (a fifth of
    apply_chat_template's cost, which converts every message on every call) when it renders `sample`
    exactly as apply_chat_template does; apply_chat_template otherwise."""
    def slow(messages, generation_prompt):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        template = _compile_jinja_template(tok.chat_template)
        context = {**tok.special_tokens_map, "tools": None, "documents": None}

        def fast(messages, generation_prompt):
            return template.render(messages=messages, add_generation_prompt=generation_prompt, **context)
        if sample and all(fast(sample[:n], g) == slow(sample[:n], g) for n in (1, len(sample)) for g in (False, True)):
            return fast
    except Exception:  # a private helper of transformers: any change there only costs speed
        pass
    return slow


def _plain(messages: list) -> bool:
    return all(len(m) == 2 for m in messages)  # only role and content (already checked to be strings)


class NotPrefixStable(Exception):
    """An earlier turn renders differently once later turns follow (e.g. its reasoning is dropped)."""


def _chat_seqs(tok, conversations: list[list], ats: list[str], turns: str = "all"):
    """(index in the chunk, ids, mask) of each row: one per conversation (`turns` "all"), or one per assistant
    turn ("last": the conversation up to that turn, as the model sees it when it generates the turn,
    trained on that turn only). The texts of the chunk are tokenized in one batched call."""
    entries, fast = [], None  # (k, text, spans) to tokenize, or (k, ids, mask) already tokenized
    for k, (messages, at) in enumerate(zip(conversations, ats)):
        _check_messages(messages, at)
        if fast is None and messages and _plain(messages):
            fast = chat_renderer(tok, messages)
        render = fast if fast is not None and _plain(messages) else chat_renderer(tok, [])
        if turns == "last":
            for i in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
                text = render(messages[:i + 1], False)
                entries.append((k, text, [reply_span(render, messages[:i + 1], i, text, text, at)]))
            continue
        text = render(messages, False) if messages else ""
        try:
            entries.append((k, text, reply_spans(render, messages, text, at)))
        except NotPrefixStable:
            if not has_generation_tags(tok):
                raise UserError(f"data error: {at}: the tokenizer's chat template does not render conversations "
                                f"prefix-stably (an earlier turn renders differently once later turns follow) and "
                                f"has no {{% generation %}} tags, so assistant tokens cannot be located in one "
                                f"rendering; set data.chat_turns: last (one row per assistant turn)") from None
            entries.append((k, *generation_masked(tok, messages)))
    texts = [e[1] for e in entries if isinstance(e[1], str)]
    encoded = _encode(tok, texts, offsets=True)
    encoded = iter(zip(encoded["input_ids"], encoded["encodings"]))
    for k, text, spans in entries:
        if not isinstance(text, str):
            yield k, text, spans  # generation-tag rows: (ids, mask) already
            continue
        ids, encoding = next(encoded)
        yield k, ids, _span_mask(text, encoding, len(ids), spans)


def _span_mask(text: str, encoding, n: int, spans) -> np.ndarray:
    """The tokens with a character in a span, from a few character<->token lookups per span; from every
    token's offsets where a lookup finds no token (the same mask either way)."""
    mask = np.zeros(n, dtype=bool)
    for a, b, cut_inside_token in spans:
        tokens = _span_tokens(text, encoding, n, a, b, cut_inside_token)
        if tokens is None:
            return _span_mask_from_offsets(text, encoding.offsets, spans)
        mask[tokens[0]:tokens[1]] = True
    return mask


def _span_tokens(text: str, encoding, n: int, a: int, b: int, cut_inside_token: bool) -> tuple[int, int] | None:
    """[first, end) of the tokens that _span_mask_from_offsets marks for the span [a, b), or None. Offsets
    are in text order; several tokens may share a character (bytes of one character), hence the widening."""
    if cut_inside_token and b < len(text):
        t = encoding.char_to_token(b)
        if t is None:
            return None
        start = encoding.token_to_chars(t)[0]
        b = len(text[:start].rstrip()) if start < b else b
    if b <= a:
        return None
    first, last = encoding.char_to_token(a), encoding.char_to_token(b - 1)
    if first is None or last is None:
        return None
    while first > 0 and encoding.token_to_chars(first - 1)[1] > a:
        first -= 1
    while last + 1 < n and encoding.token_to_chars(last + 1)[0] < b:
        last += 1
    return first, last + 1


def _span_mask_from_offsets(text: str, offs, spans) -> np.ndarray:
    o = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(o), dtype=bool)
    for a, b, cut_inside_token in spans:
        if cut_inside_token:  # the renderings parted inside a token (`<|` of `<|eos|>` vs `<|user|>`)
            straddling = o[(o[:, 0] < b) & (o[:, 1] > b), 0]
            b = len(text[:int(straddling.min())].rstrip()) if len(straddling) else b
        # A token is a target if any of its characters is, so a reply's first token always is.
        mask |= (o[:, 0] < b) & (o[:, 1] > a)
    return mask


def has_generation_tags(tok) -> bool:
    return bool(re.search(r"\{%-?\s*generation\s*-?%\}", str(getattr(tok, "chat_template", "") or "")))


def generation_masked(tok, messages: list) -> tuple[list[int], np.ndarray]:
    """(ids, mask) of a conversation from the template's own {% generation %} masks (for templates that are
    not prefix-stable). As on the prefix path, whitespace the template puts after a reply's end marker
    inside the tags is layout, not reply: trailing whitespace-only tokens of each masked run are dropped."""
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), np.array(out["assistant_masks"], dtype=bool)
    j = len(mask) - 1
    while j >= 0:
        if mask[j] and (j + 1 == len(mask) or not mask[j + 1]):  # the last token of a masked run
            while j >= 0 and mask[j] and not tok.decode([ids[j]]).strip():
                mask[j], j = False, j - 1
        j -= 1
    return ids, mask


def reply_spans(render, messages: list, text: str, at: str) -> list[tuple[int, int, bool]]:
    """Character ranges of the assistant replies in `text`, the rendering of the whole conversation."""
    return [reply_span(render, messages, i, text if i + 1 == len(messages) else render(messages[:i + 1], False),
                       text, at)
            for i, m in enumerate(messages) if m["role"] == "assistant"]


def reply_span(render, messages: list, i: int, upto: str, text: str, at: str) -> tuple[int, int, bool]:
    """The character range of reply `i` in `text`, from where the reply starts to its end-of-turn marker;
    `upto` is the rendering of the conversation up to and including the reply. Templates differ in the
    whitespace around a turn (most have no whitespace control): the generation prompt may end with a
    newline the full rendering does not have at that point, and a conversation rendered up to a reply may
    end with text (an eos) that the full rendering does not. So a reply starts where the rendering up to
    the generation prompt and `upto` part, and ends where `upto` and the full rendering part (less
    trailing whitespace; the third value says they parted before the end of `upto`, maybe inside a token).
    Raises NotPrefixStable when the reply is not where `upto` puts it in `text`."""
    prompt = render(messages[:i], True)
    start = _common_prefix_len(prompt, upto)
    if prompt[start:].strip():
        raise UserError(f"data error: {at}: the chat template's generation prompt ends with "
                        f"{prompt[start:][-40:]!r}, which its rendering of an assistant turn does not have; "
                        f"assistant tokens cannot be located (fix the template's add_generation_prompt part)")
    end = _common_prefix_len(upto, text)
    if end < len(upto) and messages[i]["content"].strip() not in text[start:end]:
        raise NotPrefixStable()
    # The turn ends at its end marker: a newline the template puts after it is layout, not reply.
    return start, max(start, len(text[:end].rstrip())), end < len(upto)


def _common_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
