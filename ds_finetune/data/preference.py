"""The `preference` format: rows of (prompt, chosen, rejected) for the pair objectives (dpo, orpo, simpo, cpo).

A row is either strings (`prompt`, `chosen`, `rejected`) or TRL's conversational layout: `prompt` a list of
messages, `chosen`/`rejected` the assistant messages that answer it, rendered with the chat template (the
prompt with the generation prompt; a completion is what the rendering of prompt + completion adds to it).
Each pair becomes two consecutive rows of the cache, chosen at an even index and rejected right after it,
both sharing the pair's `row_ids` entry, so pair p is rows 2p and 2p+1. The targets are the completion's
tokens only (string completions end with eos, as prompt_completion's do).

Truncation keeps the prompt's end: a prompt is cut to its last `data.max_prompt_length` tokens, then each
completion to what `data.max_length` leaves after the prompt; the pairs that lost any token are counted.
A prompt that leaves no room for a completion, a missing field, an empty completion or chosen identical
to rejected is a one-line error naming the row.

KTO takes the pairs as unpaired rows (`UnpairedRows`): chosen desirable, rejected not, in the order TRL's
`unpair_preference_dataset` gives them (its batched map of 1,000 pairs: the block's chosen rows, then its
rejected ones), so KTO's KL rows pair each prompt with the completions TRL's would.
"""

from __future__ import annotations

import numpy as np

from ds_finetune.data.chat import ChatRenderer
from ds_finetune.data.completions import render_completions
from ds_finetune.data.encoding import encode
from ds_finetune.errors import UserError


def _strings_or_messages(row: dict, name: str, setting: str, at: str, chat: bool):
    value = row.get(name)
    kind = list if chat else str
    if not isinstance(value, kind):
        what = "missing" if value is None else f"not a {'list of messages' if chat else 'string'}"
        layout = "message lists" if chat else "strings"
        raise UserError(f"data error: {at}: field {name!r} is {what} (format preference needs prompt, chosen and "
                        f"rejected, all {layout}; set data.{setting} if the column has another name)")
    return value


def preference_seqs(tok, cfg, rows: list[dict], ats: list[str]):
    """(index in the chunk, ids, mask) for each row of the chunk's pairs (chosen, then rejected), already
    truncated; and the number of pairs truncation cut."""
    fields = [(cfg.prompt_field, "prompt_field"), (cfg.chosen_field, "chosen_field"),
              (cfg.rejected_field, "rejected_field")]
    prompts, chosens, rejecteds = [], [], []
    renderer = ChatRenderer(tok)
    for row, at in zip(rows, ats):
        chat = isinstance(row.get(cfg.prompt_field), list)
        p, c, r = (_strings_or_messages(row, name, setting, at, chat) for name, setting in fields)
        if chat:
            p, (c, r) = render_completions(renderer, p, [c, r], at)
        if not c.strip() or not r.strip():
            raise UserError(f"data error: {at}: {'chosen' if not c.strip() else 'rejected'} is empty; a pair needs "
                            f"two non-empty completions")
        if c == r:
            raise UserError(f"data error: {at}: chosen and rejected are identical; a pair must differ")
        prompts.append(p)
        chosens.append((c, chat))
        rejecteds.append((r, chat))
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id]
    prompt_ids = encode(tok, prompts)["input_ids"]
    chosen_ids = encode(tok, [c for c, _ in chosens])["input_ids"]
    rejected_ids = encode(tok, [r for r, _ in rejecteds])["input_ids"]
    out, cut = [], 0
    for k, (p, c, r) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids)):
        chat = chosens[k][1]
        p = list(p) if chat else bos + list(p)
        c, r = (list(x) if chat else list(x) + eos for x in (c, r))
        keep_prompt = len(p) if cfg.max_prompt_length is None else min(len(p), cfg.max_prompt_length)
        room = cfg.max_length - keep_prompt
        if keep_prompt == 0 or room < 1:
            what = "empty" if keep_prompt == 0 else f"{keep_prompt} tokens, leaving no room for a completion"
            hint = "" if keep_prompt == 0 else (f" in data.max_length={cfg.max_length}; set data.max_prompt_length "
                                                f"below it (the prompt's end is kept) or raise data.max_length")
            raise UserError(f"data error: {ats[k]}: the prompt is {what}{hint}")
        cut += keep_prompt < len(p) or len(c) > room or len(r) > room
        p = p[len(p) - keep_prompt:]
        for completion in (c, r):
            completion = completion[:room]
            out.append((k, np.asarray(p + completion, dtype=np.int32),
                        np.asarray([False] * len(p) + [True] * len(completion), dtype=bool)))
    return out, cut


UNPAIR_BLOCK = 1000  # datasets' default batch size of Dataset.map, the blocks TRL's unpairing runs in


class UnpairedRows:
    """A preference cache's rows one by one for KTO, in TRL's unpaired order (see the module's doc): row i of
    the view is cache row `order[i]`, desirable where that is a chosen row. Per-row arrays are copied in that
    order (a few bytes a row); the tokens stay memory-mapped."""
    rows_per_unit = 1
    row_margins = None
    columns = None

    def __init__(self, pairs):
        self.pairs, self.path, self.content_hash = pairs, pairs.path, pairs.content_hash
        self.skipped_rows, self.truncated_pairs = pairs.skipped_rows, pairs.truncated_pairs
        n = pairs.num_rows // 2
        blocks = [np.arange(start, min(n, start + UNPAIR_BLOCK)) for start in range(0, n, UNPAIR_BLOCK)]
        self.order = np.concatenate([np.concatenate([2 * b, 2 * b + 1]) for b in blocks] or [np.zeros(0, np.int64)])
        self.lengths, self.row_targets = pairs.lengths[self.order], pairs.row_targets[self.order]
        self.row_ids, self.row_labels = pairs.row_ids[self.order], self.order % 2 == 0

    @property
    def num_rows(self) -> int:
        return len(self.order)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.pairs.row(int(self.order[i]))
