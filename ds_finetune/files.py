"""Durable files: content hashes, fsync, atomic writes (a unique temp name, fsync, rename; for a file or a
whole folder), and a file object that hashes what is written through it."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def sha256_file(path: Path, fsync: bool = False, progress=None) -> str:
    """The file's sha256; `progress(n)` is called after each chunk of n bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            if progress:
                progress(len(chunk))
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A hidden name beside `path` to write it under before the rename. Unique (a uuid): several processes,
    or nodes on a shared file system, may write the same path at once, and must not write into one file."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def replace_file(path: Path, write: Callable[[BinaryIO], None], before_rename=None, durable: bool = True) -> None:
    """Replace `path` with what `write(f)` writes into a binary file, so that a crash leaves the old or the
    new content, never a mix: written under `temp_name`, renamed onto `path`. `durable`: the file and the
    folder are fsynced, so the new content survives a power loss too (off for lock files, rewritten every
    few seconds and worthless after a reboot). A failed write removes its temp file."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if before_rename:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_atomic(path: Path, text: str, before_rename=None) -> None:
    """Replace `path` with `text` (UTF-8), crash-safely and durably (`replace_file`)."""
    replace_file(path, lambda f: f.write(text.encode("utf-8")), before_rename)


def rename_folder(tmp: Path, path: Path) -> None:
    """Commit a folder written under a temp name: its entries fsynced, renamed to `path` (a reader sees all
    of it or nothing), the rename fsynced."""
    fsync_dir(tmp)
    os.rename(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def new_folder(path: Path) -> Iterator[Path]:
    """Write the folder `path` in one go: the block fills the temp folder it is given (`temp_name`), which is
    renamed to `path` when the block ends without error (`rename_folder`). When `path` appeared meanwhile,
    another process committed the same content first and this copy is dropped. The temp folder never
    outlives the block, whatever happens in it."""
    tmp = temp_name(path)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        try:
            rename_folder(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hash_and_sync(path: Path) -> dict:
    """Size and sha256 of a file just written, and fsync it (the read comes from the page cache)."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path, fsync=True)}


class HashingFile:
    """What checkpoint files are written through: sha256 and size are computed as the bytes stream out
    (no second read of a multi-GB file), and the file is fsynced before it counts as written.

    `direct=True` (background saves) writes with O_DIRECT where the file system allows it, from one
    page-aligned buffer: a buffered write costs the kernel ~1.5 s of CPU a GB to copy into and flush the
    page cache, CPU a background save takes from training (here 0.5 s vs 0.05 s for 320 MB). A synchronous
    save stays buffered: there the kernel's write-back overlapping our hashing is faster (1.04 vs 0.81 of
    a dd-style write of the same bytes). Where O_DIRECT is refused (EINVAL) it falls back to ordinary writes.
    `tear()` is called once, with the bytes so far on disk, after the first 4 KiB (the `torn_shard` fault)."""

    TEAR_AFTER = 4096
    ALIGN = 4096       # O_DIRECT: buffer address, file offset and length multiples of the block size
    CHUNK = 8 << 20

    def __init__(self, path: str, tear=None, direct: bool = False):
        self.fd, self.direct = open_for_writing(path, direct)
        self.buf = mmap.mmap(-1, self.CHUNK) if self.direct else None  # anonymous mmap: page-aligned
        self.fill = 0
        self.sha = hashlib.sha256()
        self.size = 0
        self.tear = tear

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)  # releases the GIL on large buffers
        self.size += len(view)
        if self.direct:
            self._buffer(view)
        else:
            write_all(self.fd, view)
        if self.tear is not None and self.size >= self.TEAR_AFTER:
            if self.direct:
                self._write_aligned()
            self.tear, tear = None, self.tear
            tear()
        return len(view)

    def _buffer(self, view: memoryview) -> None:
        while len(view):
            n = min(len(view), self.CHUNK - self.fill)
            self.buf[self.fill:self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == self.CHUNK:
                self._write_aligned()

    def flush(self) -> None:
        """Nothing to do: bytes go straight to the file, or with O_DIRECT in aligned chunks and at close."""

    def _write_aligned(self) -> None:
        """Write the buffer's largest block-aligned prefix; keep the rest (< ALIGN bytes) at its start."""
        n = self.fill - self.fill % self.ALIGN
        write_all(self.fd, memoryview(self.buf)[:n])
        rest = self.fill - n
        if rest:
            self.buf[:rest] = self.buf[n:self.fill]
        self.fill = rest

    def close(self) -> dict:
        try:
            if self.fill:  # O_DIRECT's tail: padded to a whole block, then the file cut to its true size
                padded = -(-self.fill // self.ALIGN) * self.ALIGN
                self.buf[self.fill:padded] = bytes(padded - self.fill)
                write_all(self.fd, memoryview(self.buf)[:padded])
                os.ftruncate(self.fd, self.size)
                self.fill = 0
            os.fsync(self.fd)
        finally:
            self.abandon()
        return {"size": self.size, "sha256": self.sha.hexdigest()}

    def abandon(self) -> None:
        """Close without writing the rest (the file is being given up)."""
        os.close(self.fd)
        if self.buf is not None:
            self.buf.close()


def open_for_writing(path: str, direct: bool) -> tuple[int, bool]:
    """(fd, direct): the file created or truncated, with O_DIRECT if asked and the file system takes it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT
                raise
    return os.open(path, flags, 0o644), False


def write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view):]
