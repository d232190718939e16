"""The tokenized-data cache: a folder of `.npy` arrays that every rank memory-maps, built by one process
while any others wait on a lock file (never in a collective, which would time out).

Layout of `<cache_dir>/tokenized/<key>/`: input_ids (int32), target_mask (bool), offsets (int64, rows+1),
lengths and row_targets (int32 per row), row_ids (int64 per row), meta.json; format prompt adds each row's
columns (columns.jsonl, one JSON line a row, and column_offsets.npy, int64 byte offsets, rows+1). It is written under a
temporary name, chunk by chunk, and committed by renaming the folder: a reader sees all of it or nothing.
Ranks open the arrays with mmap_mode="r", so they share one copy in the page cache and a rank's memory
does not grow with the dataset.

The lock `<key>.lock` names the builder's host and pid; the builder touches it after every chunk. A
waiter prints who it waits for every few seconds, reports the builder's data error (`<key>.error`) as its
own, and stops with a one-line error if the builder died.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import time
import uuid
from pathlib import Path

import numpy as np

from ds_finetune.data.parallel import tokenized_chunks
from ds_finetune.data.sources import check_not_blank
from ds_finetune.errors import UserError
from ds_finetune.files import new_folder, replace_file
from ds_finetune.hashing import default_cache_dir
from ds_finetune.messages import say_on_stderr

# Bump when tokenization or masking changes meaning: it is part of the cache key and of checkpoints.
# 2: chat targets end at the turn's end marker (whitespace the template puts after it is not a target).
DATA_FORMAT_VERSION = 2
ARRAYS = {"input_ids": np.int32, "target_mask": np.bool_, "offsets": np.int64, "lengths": np.int32,
          "row_targets": np.int32, "row_ids": np.int64}
# Per-row values some formats add, written only where the format has them (none of the older caches do):
# unpaired_preference's labels, preference's margins (data.margin_field).
ROW_VALUES = {"row_labels": np.bool_, "row_margins": np.float32}
NOT_IN_KEY = {"path", "cache_dir", "packing", "num_proc"}  # settings that do not change the tokens
WAIT_MESSAGE_EVERY_S = 10.0
STALE_LOCK_S = 300.0  # a builder on another host that has not touched its lock for this long is dead


class TokenizedData:
    """Memory-mapped tokenized rows: row i is input_ids[offsets[i]:offsets[i+1]]. Invariant: a row's first
    token is never a target, so a pack's target count is the sum of its rows' (docs/design.md, "Loss")."""

    def __init__(self, arrays: dict, content_hash: str, skipped_rows: int, truncated_pairs: int = 0,
                 path: Path | None = None, rows_per_unit: int = 1):
        self.input_ids, self.target_mask, self.offsets = arrays["input_ids"], arrays["target_mask"], arrays["offsets"]
        self.lengths, self.row_targets, self.row_ids = arrays["lengths"], arrays["row_targets"], arrays["row_ids"]
        self.content_hash, self.skipped_rows, self.truncated_pairs = content_hash, skipped_rows, truncated_pairs
        self.path = path  # the cache folder (a DPO run's precomputed reference lies beside it)
        self.rows_per_unit = rows_per_unit  # rows that form one unit of the order (a preference pair: 2)
        self.columns, self.column_offsets = arrays.get("columns"), arrays.get("column_offsets")  # format prompt
        self.row_labels = arrays.get("row_labels")    # unpaired_preference: True where desirable
        self.row_margins = arrays.get("row_margins")  # preference with data.margin_field: each row's pair's margin

    def row_columns(self, i: int) -> dict:
        """Format prompt: row i's columns (its prompt as given, and every other column)."""
        a, b = self.column_offsets[i], self.column_offsets[i + 1]
        return json.loads(bytes(self.columns[a:b]).decode("utf-8"))

    @property
    def num_rows(self) -> int:
        return len(self.row_ids)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.target_mask[a:b]


# -------------------------------------------------------------------------------------------------- key

def tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256(type(tok).__name__.encode())
    h.update(tok.backend_tokenizer.to_str().encode() if hasattr(tok, "backend_tokenizer") else str(tok.get_vocab()).encode())
    h.update(str(getattr(tok, "chat_template", "")).encode())
    h.update(str((tok.bos_token_id, tok.eos_token_id)).encode())
    return h.hexdigest()


def cache_root(data_cfg) -> Path:
    return Path(data_cfg.cache_dir) if data_cfg.cache_dir else default_cache_dir()


def cache_path(data_cfg, data_hash: str, tok) -> Path:
    key = json.dumps({"v": DATA_FORMAT_VERSION, "data": data_hash, "tok": tokenizer_fingerprint(tok),
                      **data_cfg.settings(exclude=NOT_IN_KEY)}, sort_keys=True)
    return cache_root(data_cfg) / "tokenized" / hashlib.sha256(key.encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------------- write

class NpyAppender:
    """A 1-D .npy file written in pieces: a fixed-size header with a placeholder length first, the final
    length written over it at the end (the .npy header is plain text padded with spaces)."""
    HEADER_BYTES = 128

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.count = path, np.dtype(dtype), 0
        self.file = open(path, "wb")
        self.file.write(self._header(0))

    def _header(self, n: int) -> bytes:
        body = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)})
        pad = self.HEADER_BYTES - 10 - len(body) - 1
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", self.HEADER_BYTES - 10) + body.encode("latin1") + b" " * pad + b"\n"

    def append(self, values: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.count += len(values)

    def finish(self) -> None:
        self.file.seek(0)
        self.file.write(self._header(self.count))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def build_cache(data_cfg, tok, files, data_hash: str, path: Path, progress=None, heartbeat=None) -> None:
    """Tokenize the dataset into the cache folder `path`, streaming: memory is bounded by a few chunks."""
    check_not_blank(data_cfg.path, files)
    if tok.eos_token_id is None:
        raise UserError("data error: the tokenizer has no eos token; set one in its tokenizer_config.json")
    _injected_delay(heartbeat)
    with new_folder(path) as tmp:  # the rename is the commit; several nodes may build at once
        meta = _write_arrays(data_cfg, tok, files, tmp, progress, heartbeat)
        (tmp / "meta.json").write_text(json.dumps({**meta, "content_sha256": data_hash,
                                                   "data_format_version": DATA_FORMAT_VERSION}))


def _injected_delay(heartbeat) -> None:
    """DS_FINETUNE_PREPARE_DELAY=seconds: a slow preparation, for the test that ranks wait for it longer
    than DeepSpeed's collective timeout."""
    delay = float(os.environ.get("DS_FINETUNE_PREPARE_DELAY", "0") or 0)
    if delay:
        print(f"[fault injection] sleeping {delay:g} s while preparing the data (pid {os.getpid()})", flush=True)
    end = time.time() + delay
    while time.time() < end:
        time.sleep(min(1.0, end - time.time()))
        if heartbeat:
            heartbeat()


def _write_arrays(data_cfg, tok, files, folder: Path, progress, heartbeat) -> dict:
    out = {name: NpyAppender(folder / f"{name}.npy", dtype) for name, dtype in ARRAYS.items()}
    out["offsets"].append(np.zeros(1, np.int64))
    columns = _ColumnWriter(folder) if data_cfg.format == "prompt" else None
    tokens, rows, skipped, truncated = 0, 0, 0, 0
    for chunk in tokenized_chunks(data_cfg, tok, files):
        if columns is not None:
            columns.append(chunk.columns)
        for name in ("input_ids", "target_mask", "lengths", "row_targets", "row_ids"):
            out[name].append(getattr(chunk, name))
        for name, values in chunk.row_values.items():
            if name not in out:
                out[name] = NpyAppender(folder / f"{name}.npy", ROW_VALUES[name])
            out[name].append(values)
        out["offsets"].append(tokens + np.cumsum(chunk.lengths, dtype=np.int64))
        tokens += len(chunk.input_ids)
        rows += chunk.rows_read
        skipped += chunk.skipped
        truncated += chunk.truncated_pairs
        if progress:
            progress(rows, tokens)
        if heartbeat:
            heartbeat()
    if rows == 0:
        raise UserError(f"data error: {data_cfg.path}: the dataset is empty; it needs at least one row")
    if rows == skipped:
        raise UserError(f"data error: {data_cfg.path}: all {rows} rows are empty after masking/truncation; "
                        f"nothing to train on (check data.format and data.max_length)")
    for writer in out.values():
        writer.finish()
    if columns is not None:
        columns.finish()
    return {"rows_read": rows, "rows": rows - skipped, "skipped_rows": skipped, "tokens": tokens,
            **({"truncated_pairs": truncated} if data_cfg.format in ("preference", "prompt") else {})}


class _ColumnWriter:
    """Format prompt: each row's columns as one JSON line of `columns.jsonl`, and their byte offsets."""

    def __init__(self, folder: Path):
        self.file = open(folder / "columns.jsonl", "wb")
        self.offsets = NpyAppender(folder / "column_offsets.npy", np.int64)
        self.offsets.append(np.zeros(1, np.int64))
        self.size = 0

    def append(self, lines: list[str]) -> None:
        encoded = [(line + "\n").encode("utf-8") for line in lines]
        self.file.write(b"".join(encoded))
        self.offsets.append(self.size + np.cumsum([len(e) for e in encoded], dtype=np.int64))
        self.size += sum(len(e) for e in encoded)

    def finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.offsets.finish()


def read_cache(path: Path, data_hash: str, rows_per_unit: int = 1) -> TokenizedData:
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    if (path / "columns.jsonl").exists():  # format prompt
        arrays["column_offsets"] = np.load(path / "column_offsets.npy", mmap_mode="r")
        arrays["columns"] = np.memmap(path / "columns.jsonl", dtype=np.uint8, mode="r") \
            if (path / "columns.jsonl").stat().st_size else np.zeros(0, np.uint8)
    arrays |= {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ROW_VALUES
               if (path / f"{name}.npy").exists()}
    meta = json.loads((path / "meta.json").read_text())
    return TokenizedData(arrays, data_hash, int(meta["skipped_rows"]), int(meta.get("truncated_pairs", 0)), path,
                         rows_per_unit)


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


# -------------------------------------------------------------------------------------------------- lock

def ensure_cache(build, path: Path, say=None) -> bool:
    """Make sure the cache folder `path` exists: build it (`build(heartbeat)`) holding its lock, or wait
    for the process that holds it. Returns True when this process built it."""
    say = say or say_on_stderr
    lock, error_file = path.with_name(path.name + ".lock"), path.with_name(path.name + ".error")
    seen_alive, last_message, waited = None, 0.0, time.time()
    while not path.is_dir():
        failed = _read_json(error_file)
        if seen_alive and failed and failed.get("token") == seen_alive:
            raise UserError(failed["message"])  # the builder's data error is this process's too
        token = _try_lock(lock)
        if token is not None:
            return _build_holding(build, path, lock, error_file, token)
        owner = _read_json(lock)
        if owner is None:  # just released, or created and not yet written: look again
            time.sleep(0.2)
            continue
        if _builder_is_dead(owner, lock):
            _remove_if_same(lock, owner)
            if seen_alive == owner.get("token"):
                raise UserError(f"data error: the process preparing the data (host {owner.get('host')}, pid "
                                f"{owner.get('pid')}) died before finishing; start again (the next start prepares it) "
                                f"or run `ds-finetune data prepare CONFIG` first")
            continue  # a lock left by a crash before we came: take over
        seen_alive = owner.get("token")
        if time.time() - last_message >= WAIT_MESSAGE_EVERY_S:
            last_message = time.time()
            say(f"waiting {time.time() - waited:.0f} s for {owner.get('host')} pid {owner.get('pid')} "
                f"to prepare the data ({path.parent.parent})")
        time.sleep(0.5)
    return False


def _build_holding(build, path, lock, error_file, token) -> bool:
    try:
        if path.is_dir():  # committed by another process between our check and our lock
            return False
        build(lambda: os.utime(lock))
        return True
    except UserError as e:
        _write_json(error_file, {"token": token, "message": e.message})  # for the waiters, before the lock goes
        raise
    finally:
        _remove_if_same(lock, {"token": token})


def _try_lock(lock: Path) -> str | None:
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    token = uuid.uuid4().hex
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
                   "token": token}, f)
    return token


def _start_time(pid: int) -> float | None:
    import psutil
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _builder_is_dead(owner: dict, lock: Path) -> bool:
    if owner.get("host") == socket.gethostname():
        started = _start_time(int(owner.get("pid", -1)))
        return started is None or (owner.get("started") is not None and abs(started - owner["started"]) > 1)
    try:
        return time.time() - lock.stat().st_mtime > STALE_LOCK_S
    except FileNotFoundError:
        return False


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict) -> None:
    replace_file(path, lambda f: f.write(json.dumps(value).encode()), durable=False)


def _remove_if_same(lock: Path, owner: dict) -> None:
    current = _read_json(lock)
    if current is not None and current.get("token") == owner.get("token"):
        try:
            lock.unlink()
        except FileNotFoundError:
            pass
