"""Durable files: content hashes, fsync, atomic writes (a unique temp name, fsync, rename; for a file or a
whole folder), and a file object that hashes what is written through it."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import shutil
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np


def sha256_file(path: Path, fsync: bool = False, progress=None) -> str:
    """The file's sha256; `progress(n)` is called after each chunk of n bytes. The next chunks are read
    while this one is hashed (`read_ahead`): a cold file costs about the longer of its read and its hashing,
    not their sum."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        for chunk in read_ahead(f):
            h.update(chunk)  # releases the GIL: the reader thread reads meanwhile
            if progress:
                progress(len(chunk))
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def read_ahead(f: BinaryIO, chunk: int = 4 << 20, depth: int = 2) -> Iterator[memoryview]:
    """The rest of the unbuffered file `f` in chunks, up to `depth` of them read ahead by a thread while the
    caller uses the current one (a read waits on the device with the GIL released). A chunk is valid only
    until the next one is taken."""
    free: queue.Queue = queue.Queue()
    full: queue.Queue = queue.Queue()
    for _ in range(depth + 1):
        free.put(bytearray(chunk))
    stop = threading.Event()

    def read_chunks() -> None:
        try:
            while not stop.is_set():
                buf = free.get()
                n = f.readinto(buf)
                full.put((buf, n))
                if not n:
                    return
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            full.put((e.with_traceback(None), 0))

    reader = threading.Thread(target=read_chunks, name="file-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            buf, n = full.get()
            if isinstance(buf, BaseException):
                raise buf
            if not n:
                return
            yield memoryview(buf)[:n]
            free.put(buf)
    finally:
        stop.set()
        free.put(bytearray(0))  # wakes a reader waiting for a buffer; it reads nothing and returns
        reader.join()


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

    `direct=True` (checkpoint files) opens the file with O_DIRECT where the file system allows it: the
    bytes are hashed in the caller's thread and copied into one of `DEPTH` page-aligned buffers of `CHUNK`
    bytes, which a writer thread writes, so the device works while the next chunk is hashed (hashlib, the
    copy and os.write all release the GIL: a background save's thread leaves training's Python alone), and
    the kernel spends no CPU on copying into and flushing the page cache (~1.5 s of CPU a GB here, more than
    the hashing). Otherwise (or where O_DIRECT is refused, EINVAL) the bytes are hashed and written
    straight through the page cache by the caller. `tear()` is called once, with the bytes so far on disk,
    after the first 4 KiB (the `torn_shard` fault)."""

    TEAR_AFTER = 4096
    ALIGN = 4096       # O_DIRECT: buffer address, file offset and length multiples of the block size
    CHUNK = 8 << 20    # large writes: a device's full bandwidth needs MBs per request
    DEPTH = 3          # one buffer filling, up to two being written

    def __init__(self, path: str, tear=None, direct: bool = False, truncate: bool = True):
        self.fd, self.direct = open_for_writing(path, direct, truncate)
        self.sha = hashlib.sha256()
        self.size = 0
        self.offset = 0  # where in the file the current buffer's bytes (or, unbuffered, the next bytes) go
        self.tear = tear
        self.free: queue.Queue = queue.Queue()
        self.full: queue.Queue = queue.Queue()
        self.buf, self.fill = None, 0
        self.error: BaseException | None = None
        self.writer: threading.Thread | None = None
        if self.direct:
            for _ in range(self.DEPTH):
                self.free.put(mmap.mmap(-1, self.CHUNK))  # anonymous mmap: page-aligned
            self.buf = self.free.get()
            self.writer = threading.Thread(target=self._write_chunks, name="ckpt-file-writer", daemon=True)
            self.writer.start()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)  # releases the GIL on large buffers: the writer thread runs meanwhile
        self.size += len(view)
        if self.direct:
            self._buffer(view)
        else:
            write_all(self.fd, view, self.offset)
            self.offset += len(view)
        if self.tear is not None and self.size >= self.TEAR_AFTER:
            if self.direct:
                self._write_through()
            self.tear, tear = None, self.tear
            tear()
        return len(view)

    def _buffer(self, view: memoryview) -> None:
        while len(view):
            n = min(len(view), self.CHUNK - self.fill)
            copy_into(self.buf, self.fill, view[:n])
            self.fill += n
            view = view[n:]
            if self.fill == self.CHUNK:
                self._submit(self.CHUNK)

    def _submit(self, n: int) -> None:
        """Hand the first `n` bytes of the current buffer to the writer; its rest (< ALIGN) starts the next."""
        if self.error is not None:
            raise self.error
        nxt = self.free.get()
        rest = self.fill - n
        if rest:
            nxt[:rest] = self.buf[n:self.fill]
        self.full.put((self.buf, n, self.offset))
        self.buf, self.fill, self.offset = nxt, rest, self.offset + n

    def _write_chunks(self) -> None:
        """The writer thread: full buffers to the file, in order; after an error it only returns them."""
        while True:
            buf, n, offset = self.full.get()
            if buf is None:
                return
            try:
                if self.error is None:
                    write_all(self.fd, memoryview(buf)[:n], offset)
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread at its next write/close
                self.error = e.with_traceback(None)  # its frames would keep views of the buffer alive
            finally:
                self.free.put(buf)
                self.full.task_done()

    def _drain(self) -> None:
        """Wait until every handed-over buffer is written; raise the writer's error."""
        self.full.join()
        if self.error is not None:
            raise self.error

    def _write_through(self) -> None:
        """Everything written so far on disk but the unaligned tail."""
        self._submit(self.fill - self.fill % self.ALIGN)
        self._drain()

    def flush(self) -> None:
        """Nothing to do: full chunks go out as they fill, the rest at close."""

    def close(self) -> dict:
        try:
            self._write_tail()
            if self.direct:
                os.ftruncate(self.fd, self.size)  # the padding cut off
            os.fsync(self.fd)
        finally:
            self.abandon()
        return {"size": self.size, "sha256": self.sha.hexdigest()}

    def _write_tail(self) -> None:
        """What is buffered (O_DIRECT: padded to a whole block) on disk."""
        if self.direct:
            padded = -(-self.fill // self.ALIGN) * self.ALIGN
            self.buf[self.fill:padded] = bytes(padded - self.fill)
            self.fill = padded
            self._submit(padded)
            self._drain()

    def abandon(self) -> None:
        """Close without writing the rest (the file is being given up)."""
        if self.writer is not None and self.writer.is_alive():
            self.full.put((None, 0, 0))
            self.writer.join()
        os.close(self.fd)
        buffers = [self.buf] if self.buf is not None else []
        while not self.free.empty():
            buffers.append(self.free.get())
        for buf in buffers:
            try:
                buf.close()
            except BufferError:  # a view of it still lives (an exception's frame): freed with that view
                pass


def copy_into(buffer, offset: int, view: memoryview) -> None:
    """buffer[offset:offset + len(view)] = view, with the GIL released: numpy copies without it, where a
    slice assignment holds it for the whole memcpy (8 MiB at a time in a background save, during which the
    training thread could not run any Python)."""
    np.frombuffer(buffer, np.uint8, len(view), offset)[:] = np.frombuffer(view, np.uint8)


def open_for_writing(path: str, direct: bool, truncate: bool = True) -> tuple[int, bool]:
    """(fd, direct): the file created (and truncated, if asked), with O_DIRECT if asked and the file system
    takes it."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0)
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT
                raise
    return os.open(path, flags, 0o644), False


def write_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
