"""Where rows come from: local JSONL/JSON/Parquet files or folders, or a dataset in the `datasets` cache;
their content hash (computed once per file version and remembered); and reading them as a stream of
chunks so that no process ever holds the whole dataset.

A chunk is `(first_row_index, items)`, each item `(where, payload)`: `where` names the file and line (or
the file / dataset) for error messages, `payload` is a raw JSONL line (parsed by the worker, in parallel)
or an already decoded row dict. JSONL is read line by line with `json`, so each row keeps its own types
(no column typing across rows, unlike `datasets`) and a broken line is reported with its number.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ds_finetune.data.selection import load_dataset_kwargs, slice_rows
from ds_finetune.errors import UserError, first_line
from ds_finetune.hashing import remembered_sha256
from ds_finetune.messages import say_on_stderr

LOCAL_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark


# ---------------------------------------------------------------------------------------------- resolve

def resolve_data_files(path: str) -> list[Path] | None:
    """Local files to read, or None when `path` is not on disk (then it is a `datasets` name)."""
    p = Path(path)
    if p.is_file():
        if p.suffix not in LOCAL_KINDS:
            raise UserError(f"data error: {p}: unsupported file type {p.suffix!r}; use .jsonl, .json or .parquet")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in LOCAL_KINDS)
        if not files:
            raise UserError(f"data error: {p}: folder holds no .jsonl/.json/.parquet files")
        if len({LOCAL_KINDS[f.suffix] for f in files}) > 1:
            raise UserError(f"data error: {p}: mixes JSON and Parquet files; keep one kind per folder")
        return files
    if not _looks_like_dataset_name(path):
        raise UserError(f"data error: {path}: no such file or folder; check data.path, data.sources, eval.path "
                        f"or eval.sources")
    return None


def _looks_like_dataset_name(path: str) -> bool:
    """`name` or `owner/name`, as on the hub; anything else that is not on disk is a mistyped path."""
    parts = path.split("/")
    return Path(path).suffix not in LOCAL_KINDS and len(parts) <= 2 and all(parts) and not path.startswith(
        (".", "~")) and "\\" not in path


def check_dataset_name(name: str) -> None:
    """A bare name must be in the `datasets` cache, or the hub must be reachable: otherwise `datasets`
    retries for half a minute before failing with a message that does not say what to do."""
    if _hub_reachable():
        return
    if _in_datasets_cache(name):
        say_on_stderr(f"data: {name}: the hub is unreachable (or HF_HUB_OFFLINE is set); reading the dataset from "
                      f"the `datasets` cache")
        return
    raise UserError(f"data error: {name}: not a file or folder here, and not a dataset in the `datasets` cache "
                    f"(the hub is unreachable); check data.path, or download it first on a machine online with "
                    f"`datasets.load_dataset({name!r})` and the same HF_DATASETS_CACHE")


def _in_datasets_cache(name: str) -> bool:
    import datasets.config as dc
    from huggingface_hub import constants

    flat = name.replace("/", "___").lower()
    roots = [Path(dc.HF_DATASETS_CACHE)]
    if any(r.is_dir() and any(c.name.lower() == flat for c in r.iterdir()) for r in roots):
        return True
    return (Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}").is_dir()


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=2).close()
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------- hash

def content_hash(files: list[Path] | None, dataset_name: str, split: str, memo_dir: Path | None = None) -> str:
    """sha256 over the files' names and contents (the data's identity in the cache key and the fingerprint).
    With `memo_dir`, each file's hash is remembered by (path, size, mtime, inode): ranks and restarts do not
    read the data again unless it changed."""
    h = hashlib.sha256()
    if files is None:
        h.update(f"datasets:{dataset_name}:{split}".encode())
        return h.hexdigest()
    for f in files:
        h.update(f"{f.name}:{remembered_sha256(f, memo_dir)}".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- read

def check_not_blank(data_path: str, files: list[Path] | None) -> None:
    if files is not None and all(_is_blank(f) for f in files):
        what = f"{files[0]}: the file is empty" if len(files) == 1 else f"{data_path}: every data file is empty"
        raise UserError(f"data error: {what}; the dataset needs at least one row")


def _is_blank(f: Path) -> bool:
    if f.suffix == ".parquet":
        return False
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 16), b""):
            if chunk.replace(BOM, b"").strip():  # a file saved empty by a Windows tool holds a BOM only
                return False
    return True


def iter_chunks(data_cfg, files: list[Path] | None, chunk_rows: int):
    """The dataset's rows in order, `chunk_rows` at a time (see the module docstring)."""
    items, first = [], 0
    rows = _iter_items(data_cfg, files, chunk_rows)
    if files is not None:  # `datasets` cuts its own splits' slices
        rows = slice_rows(data_cfg.split, rows, lambda: sum(1 for _ in _iter_items(data_cfg, files, chunk_rows)))
    for item in rows:
        items.append(item)
        if len(items) == chunk_rows:
            yield first, items
            first, items = first + len(items), []
    if items:
        yield first, items


def _iter_items(data_cfg, files, chunk_rows):
    if files is None:
        yield from _dataset_rows(data_cfg, chunk_rows)
        return
    for f in files:
        if f.suffix == ".parquet":
            yield from _parquet_rows(f, chunk_rows)
        elif f.suffix == ".json" and _starts_with_array(f):
            yield from _json_array_rows(f)
        else:  # .jsonl, and .json files holding JSON lines (as `datasets` reads them)
            yield from _jsonl_lines(f)


def _jsonl_lines(f: Path):
    # utf-8-sig: Windows tools start files with a BOM. surrogateescape: a line that is not UTF-8 is refused
    # by the worker that parses it, naming the line (row_text.py), not by this reader.
    with open(f, encoding="utf-8-sig", errors="surrogateescape") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                yield f"{f}:{number}", line


def _starts_with_array(f: Path) -> bool:
    with open(f, "rb") as fh:
        return fh.read(4096).removeprefix(BOM).lstrip().startswith(b"[")


def _json_array_rows(f: Path):
    raw = f.read_bytes()  # one JSON document: it has to be read whole
    try:
        rows = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"data error: {f}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as "
                        f"UTF-8 or fix the line") from None
    except RecursionError:
        raise UserError(f"data error: {f}: nested too deeply to read; fix the file") from None
    except ValueError as e:
        raise UserError(f"data error: {f}:{getattr(e, 'lineno', '?')}: not valid JSON ({getattr(e, 'msg', e)}); "
                        f"fix the file") from None
    for i, row in enumerate(rows, start=1):
        yield f"{f}: item {i}", row


def _parquet_rows(f: Path, chunk_rows: int):
    import pyarrow.parquet as pq
    try:
        batches = pq.ParquetFile(f).iter_batches(batch_size=chunk_rows)
        for batch in batches:
            for row in batch.to_pylist():
                yield str(f), row
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid and UnicodeDecodeError are ValueErrors
        raise UserError(f"data error: {f}: cannot read it as Parquet ({first_line(e)})") from None


def _dataset_rows(data_cfg, chunk_rows: int):
    import datasets

    check_dataset_name(data_cfg.path)
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(**load_dataset_kwargs(data_cfg))
    except Exception as e:  # datasets raises many types for unusable input; all are the user's to fix
        raise UserError(f"data error: cannot load {data_cfg.path!r}: {first_line(e, 300)}") from None
    for batch in ds.iter(batch_size=chunk_rows):  # Arrow-backed: memory-mapped, read a batch at a time
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield data_cfg.path, dict(zip(columns, values))


def estimate_rows(data_cfg) -> int | None:
    """About how many rows the data has (for a progress bar's ETA), or None when it is costly to know."""
    files = resolve_data_files(data_cfg.path)
    if files is None:
        return None
    total = 0
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq
            total += pq.ParquetFile(f).metadata.num_rows
        elif f.suffix == ".json" and _starts_with_array(f):
            return None
        else:
            with open(f, "rb") as fh:  # newlines count fast (GB/s); blank lines make it a slight overestimate
                total += sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 24), b""))
    return total
