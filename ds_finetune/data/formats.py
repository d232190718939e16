"""Rows -> token ids and target masks, one chunk of rows at a time (this runs in the preparation workers).

Formats: `text` (every token a target), `prompt_completion` (the completion and eos), `prompt` (a prompt
to generate from and its columns, prompts.py), `chat` (each
assistant reply and its end-of-turn marker, rendered with the tokenizer's chat template and located by
chat.py; one row per conversation, or per assistant turn with data.chat_turns: last). Texts of a chunk
are tokenized in one batched fast-tokenizer call; a row's tokens are exactly those of tokenizing it alone.
Invariant: a row's first token is never a target (see ds_finetune/data/__init__.py).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from ds_finetune.data.chat import ChatRenderer, check_messages, reply_spans, span_mask
from ds_finetune.data.completions import prompt_completion_texts
from ds_finetune.data.encoding import encode
from ds_finetune.data.layouts import normalise_rows
from ds_finetune.data.preference import preference_seqs
from ds_finetune.data.prompts import prompt_rows
from ds_finetune.data.row_text import check_line_is_utf8, check_row_text
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
    truncated_pairs: int = 0  # format preference: pairs that truncation cut (format prompt: prompts)
    columns: list | None = None  # format prompt: each kept row's columns, one JSON line each
    row_values: dict = field(default_factory=dict)  # cache.ROW_VALUES name -> one value per kept row


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
    at, line = _at(where, index), payload if isinstance(payload, str) else None
    if line is not None:
        check_line_is_utf8(line, at)
        payload = _parse_line(line.removeprefix("\ufeff"), at)  # a BOM inside: files joined with `cat`
    if not isinstance(payload, dict):
        raise UserError(f"data error: {at}: a row must be a JSON object, not {type(payload).__name__}")
    check_row_text(payload, at, line)
    return payload


def _parse_line(line: str, at: str):
    try:
        return json.loads(line)
    except RecursionError:
        raise UserError(f"data error: {at}: nested too deeply to read; fix or remove the line") from None
    except ValueError as e:  # also an int past Python's digit limit, which has no position
        where = f" at column {e.colno}" if hasattr(e, "colno") else ""
        raise UserError(f"data error: {at}: not valid JSON ({getattr(e, 'msg', e)}{where}); fix or remove the "
                        f"line") from None


def _field(row: dict, name: str, at: str, fmt: str, setting: str, kind=str):
    value = row.get(name)
    if not isinstance(value, kind):
        what = "missing" if value is None else f"not a {kind.__name__}"
        needs = "a list of {role, content} messages" if fmt == "chat" else "it"
        raise UserError(f"data error: {at}: field {name!r} is {what} (format {fmt} needs {needs}; "
                        f"set data.{setting} if the column has another name)")
    return value


def _label(row: dict, name: str, at: str) -> bool:
    """An unpaired_preference row's label: a JSON true (desirable) or false (undesirable), as TRL's KTO reads it."""
    value = row.get(name)
    if not isinstance(value, bool):
        what = "missing" if value is None else f"{json.dumps(value)[:40]}, not true or false"
        raise UserError(f"data error: {at}: field {name!r} is {what} (format unpaired_preference needs a label, true "
                        f"for a desirable completion, false for an undesirable one; set data.label_field if the "
                        f"column has another name)")
    return value


def _margin(row: dict, name: str, at: str) -> float:
    value = row.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        what = "missing" if value is None else f"{json.dumps(value)[:40]}, not a finite number"
        raise UserError(f"data error: {at}: field {name!r} (data.margin_field) is {what}; give every pair a "
                        f"number, or unset data.margin_field")
    return float(value)


def tokenize_chunk(tok, cfg, chunk) -> ChunkArrays:
    first, items = chunk
    rows = []
    for k, (where, payload) in enumerate(items):
        try:
            rows.append(decode_row(where, payload, first + k))
        except UserError:
            _tokenize_rows(tok, cfg, first, items[:k], rows)  # an earlier row's error first: it is the first bad row
            raise
    return _tokenize_rows(tok, cfg, first, items, rows)


def _tokenize_rows(tok, cfg, first: int, items: list, rows: list[dict]) -> ChunkArrays:
    ats = [_at(where, first + k) for k, (where, _) in enumerate(items)]
    # Columns beside the text, read before the layout keeps only the text's.
    labels = ([_label(r, cfg.label_field, at) for r, at in zip(rows, ats)]
              if cfg.format == "unpaired_preference" else None)
    margins = ([_margin(r, cfg.margin_field, at) for r, at in zip(rows, ats)]
               if cfg.format == "preference" and cfg.margin_field is not None else None)
    rows = normalise_rows(cfg, rows, ats)  # the layout users bring -> the one read below (layouts.py)
    if cfg.format == "text":
        seqs = _text_seqs(tok, [_field(r, cfg.text_field, at, "text", "text_field") for r, at in zip(rows, ats)])
    elif cfg.format == "preference":
        seqs, cut = preference_seqs(tok, cfg, rows, ats)
        kept = _keep_rows(seqs, cfg.max_length, first, len(items))
        kept.truncated_pairs = cut
        if margins is not None:
            kept.row_values = {"row_margins": np.asarray(margins, np.float32)[kept.row_ids - first]}
        return kept
    elif cfg.format == "unpaired_preference":
        seqs = _prompt_completion_seqs(tok, *prompt_completion_texts(tok, cfg, rows, ats))
        kept = _keep_rows(((k, ids, mask) for k, (ids, mask) in enumerate(seqs)), cfg.max_length, first, len(items))
        kept.row_values = {"row_labels": np.asarray(labels, dtype=bool)[kept.row_ids - first]}
        return kept
    elif cfg.format == "prompt":
        seqs, columns, cut = prompt_rows(tok, cfg, rows, ats)  # every row kept (each has a target)
        kept = _keep_rows(seqs, cfg.max_length, first, len(items))
        kept.truncated_pairs, kept.columns = cut, columns
        return kept
    elif cfg.format == "prompt_completion":
        seqs = _prompt_completion_seqs(tok, *prompt_completion_texts(tok, cfg, rows, ats))
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

def _text_seqs(tok, texts: list[str]):
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for ids in encode(tok, texts)["input_ids"]:
        seq = bos + ids + [tok.eos_token_id]
        yield seq, [True] * len(seq)


def _prompt_completion_seqs(tok, prompts: list[str], completions: list[str], templated: list[bool]):
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    encoded = zip(encode(tok, prompts)["input_ids"], encode(tok, completions)["input_ids"], templated)
    for p, c, chat in encoded:
        p, c = (p, c) if chat else (bos + p, c + [tok.eos_token_id])  # a template writes its own
        yield p + c, [False] * len(p) + [True] * len(c)


def _chat_seqs(tok, conversations: list[list], ats: list[str], turns: str = "all"):
    """(index in the chunk, ids, mask) of each row: one per conversation (`turns` "all"), or one per assistant
    turn ("last": the conversation up to that turn, as the model sees it when it generates the turn,
    trained on that turn only). The texts of the chunk are tokenized in one batched call."""
    render, rows = ChatRenderer(tok), []  # (k, text, spans)
    for k, (messages, at) in enumerate(zip(conversations, ats)):
        check_messages(messages, at)
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if turns == "last":
            rows += [(k, *reply_spans(tok, render, messages[:i + 1], [i], at, turns)) for i in replies]
        else:
            rows.append((k, *reply_spans(tok, render, messages, replies, at, turns)))
    encoded = encode(tok, [text for _, text, _ in rows], offsets=True)
    for (k, text, spans), ids, encoding in zip(rows, encoded["input_ids"], encoded["encodings"]):
        yield k, ids, span_mask(text, encoding, len(ids), spans)
