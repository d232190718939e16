"""Format `prompt` (train.objective: grpo): rows with a prompt to generate from, a string or a message list
rendered with the chat template and its generation prompt, and any other columns (an `answer`, say), which
the reward functions get.

`data.system_prompt` puts a system message before every prompt (a string prompt then becomes [system, user]
messages, rendered), as TRL's GRPO recipes map their datasets. A row's tokens are its prompt's as TRL's
GRPOTrainer tokenizes it: a string prompt by the tokenizer with its
special tokens (`tok(text)`: a bos where the tokenizer adds one), a rendered one as the template writes it
(no special tokens added). `data.max_prompt_length` (else data.max_length) keeps the prompt's last tokens, and
the rows it cut are counted. A prompt row has no completion to train on: its target mask marks the prompt's
tokens but the first (the invariant every row keeps: a row's first token is never a target, and it has
some), which only the token counts read; GRPO's targets are the completions it samples.

The row's columns (the prompt as given, string or messages, and every other column) are kept as one JSON
line a row in the cache (`columns.jsonl`, with `column_offsets.npy`), read back by row
(`TokenizedData.row_columns`).
"""

from __future__ import annotations

import json

import numpy as np

from ds_finetune.data.chat import ChatRenderer, check_messages
from ds_finetune.data.encoding import encode
from ds_finetune.errors import UserError


def with_system_prompt(prompt, system: str | None):
    """The prompt with data.system_prompt before it: a string becomes [system, user] messages; a message list
    that has no system message of its own gets it first."""
    if system is None or not isinstance(prompt, (str, list)):
        return prompt
    if isinstance(prompt, str):
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    has_own = bool(prompt) and isinstance(prompt[0], dict) and prompt[0].get("role") == "system"
    return prompt if has_own else [{"role": "system", "content": system}, *prompt]


def prompt_rows(tok, cfg, rows: list[dict], ats: list[str]):
    """((index in the chunk, ids, mask) of each kept row, its columns as JSON lines, prompts cut). The
    columns hold the prompt the model is given (with data.system_prompt), as TRL hands it to the rewards."""
    renderer, texts, templated, columns = ChatRenderer(tok), [], [], []
    for row, at in zip(rows, ats):
        prompt = with_system_prompt(row.get(cfg.prompt_field), cfg.system_prompt)
        if isinstance(prompt, list):
            check_messages(prompt, at)
            text = renderer.for_conversation(prompt)(prompt, True)
        elif isinstance(prompt, str):
            text = prompt
        else:
            what = "missing" if prompt is None else "not a string or a list of messages"
            raise UserError(f"data error: {at}: field {cfg.prompt_field!r} is {what} (format prompt needs a prompt "
                            f"string or message list; set data.prompt_field if the column has another name)")
        if not text.strip():
            raise UserError(f"data error: {at}: the prompt is empty; give each row a prompt to generate from")
        texts.append(text)
        templated.append(isinstance(prompt, list))
        others = {k: v for k, v in row.items() if k != cfg.prompt_field}
        columns.append(_json_line({"prompt": prompt, **others}, at))
    keep = min(cfg.max_prompt_length or cfg.max_length, cfg.max_length)
    out, cut = [], 0
    for k, ids in enumerate(_token_ids(tok, texts, templated)):
        cut += len(ids) > keep
        ids = ids[len(ids) - keep:] if len(ids) > keep else ids
        if len(ids) < 2:
            raise UserError(f"data error: {ats[k]}: the prompt is a single token; give each row a prompt to "
                            f"generate from")
        out.append((k, np.asarray(ids, dtype=np.int32), np.asarray([False] + [True] * (len(ids) - 1), dtype=bool)))
    return out, columns, cut


def _token_ids(tok, texts: list[str], templated: list[bool]) -> list[list[int]]:
    plain = [t for t, chat in zip(texts, templated) if not chat]
    rendered = [t for t, chat in zip(texts, templated) if chat]
    plain_ids = iter(tok(plain)["input_ids"] if plain else [])
    rendered_ids = iter(encode(tok, rendered)["input_ids"])
    return [list(next(rendered_ids) if chat else next(plain_ids)) for chat in templated]


def _json_line(value: dict, at: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UserError(f"data error: {at}: a column holds a value with no JSON form ({e}); the reward functions "
                        f"get the row's columns as JSON values") from None
