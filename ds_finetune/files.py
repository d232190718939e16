"""Durable files: content hashes, fsync, atomic writes (temp name, fsync, rename), and a file object that
hashes what is written through it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str, before_rename=None) -> None:
    """Replace `path` with `text` so a crash leaves the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if before_rename:
        before_rename()
    os.replace(tmp, path)
    fsync_dir(path.parent)


def hash_and_sync(path: Path) -> dict:
    """Size and sha256 of a file just written, and fsync it (the read comes from the page cache)."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path, fsync=True)}


class HashingFile:
    """What DeepSpeed's shards are written through: sha256 and size are computed as the bytes stream out
    (no second read of a multi-GB file), and the file is fsynced before it counts as written.
    `tear()` is called once, with the bytes so far on disk, after the first 4 KiB (the `torn_shard` fault)."""

    TEAR_AFTER = 4096

    def __init__(self, path: str, tear=None):
        self.file = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0
        self.tear = tear

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        written = self.file.write(data)
        if self.tear is not None and self.size >= self.TEAR_AFTER:
            self.file.flush()
            self.tear, tear = None, self.tear
            tear()
        return written

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"size": self.size, "sha256": self.sha.hexdigest()}
