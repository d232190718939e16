"""Background checkpoint writes (`checkpoint.async_save`): DeepSpeed builds the save's state dicts as
usual, but instead of writing each file we keep it, and a thread copies its tensors into host memory (a
snapshot) and then writes, hashes and fsyncs the files while training goes on. The copy overlaps the next
step's forward and backward: only the optimizer step changes saved tensors, so the main loop waits for
the copy (`wait_until_copied`) just before it, and rarely has to. From a GPU the copy runs on a stream of
its own, on the saved tensors' device, into one page-locked host buffer that every save of the process
reuses (`PinnedHostPool`), starting from an event recorded when the save was taken: the compute stream
never waits for it.

The commit is not the thread's: committing needs every rank's file list (a collective), so the main loop
commits once every rank's writer has finished (the ranks learn it through the step's all-reduce), before
the next save starts, and before a stop or the end. A crash while files are being written leaves a tag
without a manifest: an unfinished save, skipped by --resume, removed at the next commit.

Cost: host memory for one save's state of this rank (at most one save is in flight), and the copy. That
memory is allocated once and kept (page-locked on a GPU): at most one save's bytes of this rank, capped at an
eighth of the node's memory shared among its ranks; past the cap the copy goes to fresh pageable memory
(slower, same bytes).
"""

from __future__ import annotations

from copy import deepcopy
import os
import threading
from pathlib import Path

import torch

from ds_finetune.checkpoint.commit import write_shard
from ds_finetune.dist import on_cuda
from ds_finetune.faults import fault_point


def snapshot(obj, memo: dict | None = None, host_buffer=None):
    """A host-memory copy of a state dict whose tensors no longer share memory with the live ones. Each
    storage is copied once and every tensor is rebuilt on the copy with its own offset, shape and stride,
    so torch.save writes exactly the bytes (and the sharing between tensors) it would have written; only
    GPU tensors are recorded as host tensors. `host_buffer(nbytes)` gives the uint8 host memory a storage
    is copied into (default: a fresh CPU tensor)."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in memo:
            memo[key] = copy_storage(storage, host_buffer)
        copy = torch.empty(0, dtype=obj.dtype)
        copy.set_(memo[key], obj.storage_offset(), obj.size(), obj.stride())
        if isinstance(obj, torch.nn.Parameter):
            return torch.nn.Parameter(copy, requires_grad=obj.requires_grad)
        return copy.requires_grad_(obj.requires_grad) if obj.is_leaf and obj.is_floating_point() else copy
    if isinstance(obj, dict):
        return type(obj)((k, snapshot(v, memo, host_buffer)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(snapshot(v, memo, host_buffer) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return obj
    # Any other object may be live training state: under fp16 ZeRO's state dicts hold the engine's own
    # DynamicLossScaler, which the next step changes while this thread would still be pickling it.
    return deepcopy(obj)


def copy_storage(storage: torch.UntypedStorage, host_buffer=None) -> torch.UntypedStorage:
    """A host-memory copy, made by a tensor op: those release the GIL (UntypedStorage.clone does not), so
    the training thread runs while the writer thread copies. With `host_buffer` (a GPU save: the pinned
    pool) the copy goes into the memory it gives, asynchronously on the current (the writer's) stream: the
    caller synchronizes that stream before it reads the copy (DeepSpeed loads every checkpoint file onto
    the CPU first, so where it was saved from does not matter)."""
    whole = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
    if host_buffer is None:
        return whole.to("cpu", copy=True).untyped_storage()
    host = host_buffer(whole.numel())
    host.copy_(whole, non_blocking=True)
    return host.untyped_storage()


def default_pinned_limit() -> int:
    """An eighth of the node's memory, shared among the node's ranks: what page-locked snapshot memory may
    take (locked pages are never swapped or reclaimed; the rest of the host needs its memory too)."""
    node = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return node // 8 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


class PinnedHostPool:
    """The page-locked host memory of a process's background saves: one buffer, registered with CUDA
    (cudaHostRegister, as torch's own checkpoint stager does) at its exact size and reused by every save,
    so the locked bytes stay at the largest save's size. torch's pinned tensors would go through its caching
    host allocator instead: blocks rounded up to a power of two and never returned, up to ~2x a save a rank.
    `reserve()` starts a save (the previous one is written: at most one is in flight); past `limit` the
    copies go to fresh pageable memory, synchronously.

    On the CPU (`pin=False`) the same pool, unregistered: a copy into fresh memory costs the kernel a page
    fault for every 4 KiB (here ~0.5 s a rank for a 400 MB save, 5x the memcpy), and the stall of a
    background save is that copy; reused pages are only copied into."""

    ALIGN = 4096  # each storage starts on a page boundary

    def __init__(self, limit: int | None = None, pin: bool = True):
        self.limit = default_pinned_limit() if limit is None else limit
        self.pin = pin
        self.buffer: torch.Tensor | None = None
        self.used = 0

    @property
    def pinned_bytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    def aligned(self, nbytes: int) -> int:
        return -(-nbytes // self.ALIGN) * self.ALIGN

    def reserve(self, storages: list[int]) -> None:
        """Start a save whose device storages have these sizes: grow the buffer to hold them all."""
        wanted = min(sum(self.aligned(n) for n in storages), self.limit)
        if wanted > self.pinned_bytes:
            self.release()
            buffer = torch.empty(wanted, dtype=torch.uint8)
            if self.pin:
                register_host_memory(buffer)
            self.buffer = buffer
        self.used = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of host memory: a slice of the pinned buffer while it lasts, else pageable."""
        start, self.used = self.used, self.used + self.aligned(nbytes)
        if start + nbytes <= self.pinned_bytes:
            # A tensor over exactly these bytes (a slice would carry the whole buffer as its storage, and
            # torch.save writes a tensor's whole storage), kept alive by the numpy view it wraps.
            return torch.from_numpy(self.buffer[start:start + nbytes].numpy())
        return torch.empty(nbytes, dtype=torch.uint8)

    def release(self) -> None:
        if self.buffer is not None:
            if self.pin:
                torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.buffer = None


def register_host_memory(buffer: torch.Tensor) -> None:
    if torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0) != 0:
        raise RuntimeError(f"cudaHostRegister of {buffer.numel()} bytes failed")


def storage_sizes(obj, seen: set | None = None) -> list[int]:
    """The byte sizes of the distinct storages in a state dict: what a snapshot copies into the pool (host
    tensors too, e.g. offloaded optimizer state; the cap bounds the pinned part)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen:
            return []
        seen.add(key)
        return [storage.nbytes()]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [n for v in obj for n in storage_sizes(v, seen)]
    return []


_pool: PinnedHostPool | None = None


def host_pool() -> PinnedHostPool:
    """The process's pool, made at its first background save (its limit reads the node's rank count):
    page-locked on a GPU, pageable on the CPU."""
    global _pool
    if _pool is None:
        _pool = PinnedHostPool(pin=on_cuda())
    return _pool


_copy_streams: dict = {}


def copy_stream(device: int):
    """The process's copy stream on `device`, made at its first background save. A new torch.cuda.Stream
    at every save would walk torch's round-robin pool of 32 streams and in time land on one that DeepSpeed
    reduces or gathers on, queueing the copy behind its collectives (and them behind the copy)."""
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device=device)
    return _copy_streams[device]


class DeviceCopy:
    """Where the snapshot's device-to-host copies run: on a GPU, a stream of the writer's own on the saved
    tensors' device, that starts once the compute stream has reached the save (an event recorded by the
    training thread), into the process's pinned pool; on the CPU, a plain memcpy into its pageable pool."""

    def __init__(self):
        self.stream = self.saved = self.device = None
        if on_cuda():
            self.device = torch.cuda.current_device()  # the training thread's: the saved tensors' device
            self.saved = torch.cuda.Event()
            self.saved.record()  # in the training thread, on the compute stream, at the save

    def run(self, copy, storages: list[int]):
        """`copy(host_buffer)` on the copy stream, returning once its copies are complete; `storages`: the
        sizes of the storages it will copy."""
        if self.saved is None:
            pool = host_pool()
            pool.reserve(storages)
            return copy(pool.take)
        # The current CUDA device is per thread and a new thread's is device 0: without this, on every
        # rank but the first, the stream would live on GPU 0, `torch.cuda.stream` would leave the saved
        # device's current stream unchanged, the copies would queue on its compute stream behind the next
        # forward, and synchronize() would wait on an empty stream: stale bytes, hashed as valid. (torch's
        # pin-memory thread sets its device the same way.)
        torch.cuda.set_device(self.device)
        self.stream = copy_stream(self.device)
        self.stream.wait_event(self.saved)
        pool = host_pool()
        pool.reserve(storages)
        try:
            with torch.cuda.stream(self.stream):
                return copy(pool.take)
        finally:
            self.stream.synchronize()  # after a failed copy too: none may still write into the pool


class BackgroundWrite:
    """One save's files of this rank: collected as DeepSpeed hands them over, then written by a thread."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step
        self.files: list[tuple[str, object]] = []
        self.written: dict[str, dict] = {}
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.copied = threading.Event()  # the snapshot is taken: training may change the live tensors
        self.device_copy: DeviceCopy | None = None

    def collect(self, state_dict, path) -> None:
        """DeepSpeed's `checkpoint_engine.save`: keep the state dict (live tensors); nothing is written yet."""
        self.files.append((str(path), state_dict))

    def start(self) -> None:
        self.device_copy = DeviceCopy()  # here, in the training thread: marks where the saved state is final
        # A daemon: a job that dies with a write in flight must not wait for it (the save never commits).
        self.thread = threading.Thread(target=self._write_all, name=f"ckpt-write-step{self.step}", daemon=True)
        self.thread.start()

    def _write_all(self) -> None:
        try:
            try:
                memo: dict = {}  # one copy of a storage that several files share
                self.files = self.device_copy.run(
                    lambda host_buffer: [(path, snapshot(state, memo, host_buffer)) for path, state in self.files],
                    storage_sizes([state for _, state in self.files]))
            finally:
                self.copied.set()  # also on failure: the error is reported at the commit
            for i, (path, state) in enumerate(self.files):
                self.written[path] = write_shard(state, path, self.rank, self.step, direct=True)
                self.files[i] = (path, None)  # the snapshot's memory goes as soon as its file is durable
                fault_point("async_write", self.rank, self.step)
            fault_point("async_written", self.rank, self.step)
        except BaseException as e:  # noqa: BLE001 - reported to every rank at the commit
            self.error = e

    def wait_until_copied(self) -> None:
        """Block until the snapshot is taken; before anything changes the saved tensors."""
        self.copied.wait()

    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def wait(self) -> dict[str, dict]:
        """Block until written; {path: size/sha256}, or the write's error (raised)."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.written

    def relative(self, tag_dir: Path) -> dict[str, dict]:
        return {str(Path(p).relative_to(tag_dir)): meta for p, meta in self.wait().items()}
