"""Datasets: loading (local JSONL/JSON/Parquet file or folder, or a cached `datasets` name), the formats
text / prompt_completion / chat, label masks, the tokenization cache, and packing.

Tokenized rows live in three flat arrays (ids, target mask, row offsets), cached on disk under a key made
of the data's content hash, the tokenizer and every setting that changes tokens; a second start reads
the cache and never imports `datasets`. Invariant: a row's first token is never a target, so the number
of targets of a row (and of a pack of rows) is just the sum of its mask — every rank can compute the
global batch's target count without talking to the others (docs/design.md, "Loss").
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ds_finetune.errors import UserError
from ds_finetune.files import sha256_file
from ds_finetune.sampler import epoch_permutation

# Bump when tokenization or masking changes meaning: it is part of the cache key and of checkpoints.
# 2: chat targets end at the turn's end marker (whitespace the template puts after it is not a target).
DATA_FORMAT_VERSION = 2
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
IGNORE_INDEX = -100


@dataclass
class TokenizedData:
    input_ids: np.ndarray   # int32, all rows concatenated
    target_mask: np.ndarray  # bool, True where the token is a training target
    offsets: np.ndarray     # int64, row i is [offsets[i], offsets[i+1])
    row_ids: np.ndarray     # int64, dataset row index of each kept row (rows empty after masking are dropped)
    content_hash: str
    skipped_rows: int

    @property
    def num_rows(self) -> int:
        return len(self.row_ids)

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @functools.cached_property
    def row_targets(self) -> np.ndarray:
        """Target tokens per row (every kept row has at least one)."""
        return np.add.reduceat(self.target_mask.astype(np.int64), self.offsets[:-1])

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.target_mask[a:b]


# ---------------------------------------------------------------------------------------------- sources

def resolve_data_files(path: str) -> list[Path] | None:
    """Local files to read, or None when `path` is not on disk (then it is a `datasets` name)."""
    p = Path(path)
    if p.is_file():
        if p.suffix not in LOCAL_BUILDERS:
            raise UserError(f"data error: {p}: unsupported file type {p.suffix!r}; use .jsonl, .json or .parquet")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in LOCAL_BUILDERS)
        if not files:
            raise UserError(f"data error: {p}: folder holds no .jsonl/.json/.parquet files")
        kinds = {LOCAL_BUILDERS[f.suffix] for f in files}
        if len(kinds) > 1:
            raise UserError(f"data error: {p}: mixes JSON and Parquet files; keep one kind per folder")
        return files
    if p.suffix in LOCAL_BUILDERS or os.sep in path or path.startswith("."):
        raise UserError(f"data error: {path}: no such file or folder; check data.path")
    return None


def content_hash(files: list[Path] | None, dataset_name: str, split: str) -> str:
    h = hashlib.sha256()
    if files is None:
        h.update(f"datasets:{dataset_name}:{split}".encode())
        return h.hexdigest()
    for f in files:
        h.update(f"{f.name}:{sha256_file(f)}".encode())
    return h.hexdigest()


def load_rows(data_cfg, files: list[Path] | None):
    """The raw rows as a `datasets.Dataset`."""
    import datasets

    datasets.disable_progress_bars()
    if files is not None and all(_is_blank(f) for f in files):
        # Said here: `datasets` reports this as a bare StopIteration or "corresponds to no data".
        what = f"{files[0]}: the file is empty" if len(files) == 1 else f"{data_cfg.path}: every data file is empty"
        raise UserError(f"data error: {what}; the dataset needs at least one row")
    try:
        if files is not None:
            ds = datasets.load_dataset(LOCAL_BUILDERS[files[0].suffix], data_files=[str(f) for f in files],
                                       split="train")
        else:
            ds = datasets.load_dataset(data_cfg.path, split=data_cfg.split)
    except Exception as e:  # datasets raises many types for unreadable input; all are the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "corresponds to no data" in first:  # datasets' words for a split without rows (e.g. a JSON `[]`)
            raise UserError(f"data error: {data_cfg.path}: the dataset is empty; it needs at least one row")
        raise UserError(f"data error: cannot load {data_cfg.path!r}: {first[:300]}")
    if len(ds) == 0:
        raise UserError(f"data error: {data_cfg.path}: the dataset is empty; it needs at least one row")
    return ds


def _is_blank(f: Path) -> bool:
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 16), b""):
            if chunk.strip():
                return False
    return True


# ---------------------------------------------------------------------------------------------- formats

def _field(row: dict, name: str, index: int, fmt: str, setting: str, kind=str):
    value = row.get(name)
    if not isinstance(value, kind):
        what = "missing" if value is None else f"not a {kind.__name__}"
        needs = "a list of {role, content} messages" if fmt == "chat" else "it"
        raise UserError(f"data error: row {index + 1}: field {name!r} is {what} (format {fmt} needs {needs}; "
                        f"set data.{setting} if the column has another name)")
    return value


def _text_row(tok, text: str):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None:
        ids = [tok.bos_token_id] + ids
    ids = ids + [tok.eos_token_id]
    return ids, [True] * len(ids)


def _prompt_completion_row(tok, prompt: str, completion: str):
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if tok.bos_token_id is not None:
        p = [tok.bos_token_id] + p
    return p + c, [False] * len(p) + [True] * len(c)


def _chat_row(tok, messages: list, index: int):
    for j, m in enumerate(messages):
        bad = ("role", "content") if not isinstance(m, dict) else \
            [k for k in ("role", "content") if not isinstance(m.get(k), str)]
        if bad:
            raise UserError(f"data error: row {index + 1}, message {j + 1}: {' and '.join(map(repr, bad))} missing or "
                            f"not a string; each message needs string fields 'role' and 'content'")
    if not messages:
        return [], []  # nothing to train on: skipped and counted like any row without targets
    text = tok.apply_chat_template(messages, tokenize=False)
    # Assistant spans as character ranges: the rendering up to the generation prompt is a prefix of the
    # rendering that includes the reply. Tokenizing the whole text once keeps the tokenization exact.
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        upto = tok.apply_chat_template(messages[:i + 1], tokenize=False)
        if not text.startswith(upto):
            raise UserError(f"data error: row {index + 1}: the tokenizer's chat template does not render "
                            f"conversations prefix-stably, so assistant tokens cannot be located")
        # The turn ends at its end marker: a newline the template puts after it is layout, not reply.
        spans.append((start, max(start, len(upto.rstrip()))))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def tokenize_rows(ds, data_cfg, tok) -> tuple[list, list, list, int]:
    fmt = data_cfg.format
    if tok.eos_token_id is None:
        raise UserError("data error: the tokenizer has no eos token; set one in its tokenizer_config.json")
    all_ids, all_masks, kept, skipped = [], [], [], 0
    for index, row in enumerate(ds):
        if fmt == "text":
            ids, mask = _text_row(tok, _field(row, data_cfg.text_field, index, fmt, "text_field"))
        elif fmt == "prompt_completion":
            ids, mask = _prompt_completion_row(tok, _field(row, data_cfg.prompt_field, index, fmt, "prompt_field"),
                                               _field(row, data_cfg.completion_field, index, fmt, "completion_field"))
        else:
            ids, mask = _chat_row(tok, _field(row, data_cfg.messages_field, index, fmt, "messages_field", list), index)
        ids, mask = ids[:data_cfg.max_length], mask[:data_cfg.max_length]
        if mask:
            mask[0] = False  # a row's first token has nothing to be predicted from (see module docstring)
        if not any(mask):
            skipped += 1
            continue
        all_ids.append(ids)
        all_masks.append(mask)
        kept.append(index)
    return all_ids, all_masks, kept, skipped


# ------------------------------------------------------------------------------------------------ cache

def tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256(type(tok).__name__.encode())
    h.update(tok.backend_tokenizer.to_str().encode() if hasattr(tok, "backend_tokenizer") else str(tok.get_vocab()).encode())
    h.update(str(getattr(tok, "chat_template", "")).encode())
    h.update(str((tok.bos_token_id, tok.eos_token_id)).encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("DS_FINETUNE_CACHE", Path.home() / ".cache" / "ds-finetune"))


def cache_path(data_cfg, data_hash: str, tok) -> Path:
    key = json.dumps({"v": DATA_FORMAT_VERSION, "data": data_hash, "tok": tokenizer_fingerprint(tok),
                      **data_cfg.model_dump(mode="json", exclude={"path", "cache_dir", "packing"})}, sort_keys=True)
    root = Path(data_cfg.cache_dir) if data_cfg.cache_dir else default_cache_dir()
    return root / "tokenized" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".npz")


def build_cache(data_cfg, tok, files, data_hash: str, path: Path) -> None:
    ds = load_rows(data_cfg, files)
    ids, masks, kept, skipped = tokenize_rows(ds, data_cfg, tok)
    if not ids:
        raise UserError(f"data error: {data_cfg.path}: all {len(ds)} rows are empty after masking/truncation; "
                        f"nothing to train on (check data.format and data.max_length)")
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in ids])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.npz")  # unique: several nodes may build at once
    np.savez(tmp, input_ids=np.concatenate(ids).astype(np.int32),
             target_mask=np.concatenate(masks).astype(bool), offsets=offsets,
             row_ids=np.asarray(kept, dtype=np.int64), skipped_rows=np.int64(skipped))
    os.replace(tmp, path)


def read_cache(path: Path, data_hash: str) -> TokenizedData:
    with np.load(path) as z:
        return TokenizedData(z["input_ids"], z["target_mask"], z["offsets"], z["row_ids"], data_hash,
                             int(z["skipped_rows"]))


def prepare_data(data_cfg, tok, local_rank: int) -> TokenizedData:
    """Every rank's view of the tokenized data: each node's local rank 0 builds the cache if missing;
    every rank learns of a data error, so none waits for a cache that will not come."""
    from ds_finetune.dist import decide

    files = resolve_data_files(data_cfg.path)
    data_hash = content_hash(files, data_cfg.path, data_cfg.split)
    path = cache_path(data_cfg, data_hash, tok)
    decide(lambda: path.exists() or build_cache(data_cfg, tok, files, data_hash, path), runs_here=local_rank == 0)
    return read_cache(path, data_hash)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        raise UserError(f"model error: cannot load tokenizer {name_or_path!r} ({type(e).__name__}); "
                        f"check model.tokenizer (a local folder or a cached Hugging Face name)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------------------------------------- packing

def plan_units(data: TokenizedData, order: np.ndarray, packing: bool, max_length: int):
    """An epoch's training units in order (a sequence of row-index arrays): one row each, or greedy packs
    of consecutive rows of `order` with at most `max_length` tokens. Deterministic in `order`, so a
    resumed run plans the same packs."""
    if not packing or len(order) == 0:
        return order.reshape(-1, 1)  # rows of a 2-D array: one-row units without a Python object per row
    lengths = data.lengths[order]
    units, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if used + n > max_length and i > start:
            units.append(order[start:i])
            start, used = i, 0
        used += n
    units.append(order[start:])
    return units


class EpochOrder:
    """The units (rows or packs) of each epoch in order; planned once per epoch, O(1) to index after.
    `rows`: the rows trained on (all of them unless some are held out for evaluation)."""

    def __init__(self, data: TokenizedData, seed: int, packing: bool, max_length: int, rows: np.ndarray | None = None):
        self.data, self.seed, self.packing, self.max_length = data, seed, packing, max_length
        self.rows = rows
        self._epoch, self._units = None, None

    @property
    def num_rows(self) -> int:
        return self.data.num_rows if self.rows is None else len(self.rows)

    def units(self, epoch: int) -> list[np.ndarray]:
        if epoch != self._epoch:
            order = epoch_permutation(self.num_rows, self.seed, epoch)
            if self.rows is not None:
                order = self.rows[order]
            self._epoch, self._units = epoch, plan_units(self.data, order, self.packing, self.max_length)
        return self._units


def collate(data: TokenizedData, units: list[np.ndarray], pad_id: int):
    """Right-padded (input_ids, attention_mask, labels) tensors for the given units, plus their target count.
    Rows of a pack are concatenated; attention within a pack spans its rows (no cross-row masking)."""
    import torch

    seqs = []
    for unit in units:
        parts = [data.row(int(i)) for i in unit]
        seqs.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    width = max(len(ids) for ids, _ in seqs)
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    labels = np.full((len(seqs), width), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((len(seqs), width), dtype=np.int64)
    for j, (ids, mask) in enumerate(seqs):
        input_ids[j, :len(ids)] = ids
        labels[j, :len(ids)] = np.where(mask, ids, IGNORE_INDEX)
        attention[j, :len(ids)] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(attention), torch.from_numpy(labels)


def unit_targets(data: TokenizedData, units: list[np.ndarray]) -> int:
    return int(sum(int(data.row_targets[u].sum()) for u in units))


def unit_tokens(data: TokenizedData, units: list[np.ndarray]) -> int:
    return int(sum(int(data.lengths[u].sum()) for u in units))
