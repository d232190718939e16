"""Background checkpoint writes (`checkpoint.async_save`): DeepSpeed builds the save's state dicts as
usual, but instead of writing each file we keep it, and a thread copies its tensors into host memory (a
snapshot) and then writes, hashes and fsyncs the files while training goes on. The copy overlaps the next
step's forward and backward: only the optimizer step changes saved tensors, so the main loop waits for
the copy (`wait_until_copied`) just before it, and rarely has to. From a GPU the copy runs on a stream of
its own into pinned host memory (torch's caching host allocator reuses those blocks save after save),
starting from an event recorded when the save was taken: the compute stream never waits for it.

The commit is not the thread's: committing needs every rank's file list (a collective), so the main loop
commits once every rank's writer has finished (the ranks learn it through the step's all-reduce), before
the next save starts, and before a stop or the end. A crash while files are being written leaves a tag
without a manifest: an unfinished save, skipped by --resume, removed at the next commit.

Cost: host memory for one save's state of this rank (at most one save is in flight), and the copy.
"""

from __future__ import annotations

from copy import deepcopy
import threading
from pathlib import Path

import torch

from ds_finetune.checkpoint.commit import write_shard
from ds_finetune.dist import on_cuda
from ds_finetune.faults import fault_point


def snapshot(obj, memo: dict | None = None):
    """A host-memory copy of a state dict whose tensors no longer share memory with the live ones. Each
    storage is copied once and every tensor is rebuilt on the copy with its own offset, shape and stride,
    so torch.save writes exactly the bytes (and the sharing between tensors) it would have written; only
    GPU tensors are recorded as host tensors."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in memo:
            memo[key] = copy_storage(storage)
        copy = torch.empty(0, dtype=obj.dtype)
        copy.set_(memo[key], obj.storage_offset(), obj.size(), obj.stride())
        if isinstance(obj, torch.nn.Parameter):
            return torch.nn.Parameter(copy, requires_grad=obj.requires_grad)
        return copy.requires_grad_(obj.requires_grad) if obj.is_leaf and obj.is_floating_point() else copy
    if isinstance(obj, dict):
        return type(obj)((k, snapshot(v, memo)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(snapshot(v, memo) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return obj
    # Any other object may be live training state: under fp16 ZeRO's state dicts hold the engine's own
    # DynamicLossScaler, which the next step changes while this thread would still be pickling it.
    return deepcopy(obj)


def copy_storage(storage: torch.UntypedStorage) -> torch.UntypedStorage:
    """A host-memory copy, made by a tensor op: those release the GIL (UntypedStorage.clone does not), so
    the training thread runs while the writer thread copies. A GPU storage is copied to pinned host memory
    on the current (the writer's) stream, asynchronously: the caller synchronizes that stream before it
    reads the copy (DeepSpeed loads every checkpoint file onto the CPU first, so where it was saved from
    does not matter)."""
    whole = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
    if whole.device.type == "cpu":
        return whole.to("cpu", copy=True).untyped_storage()
    host = torch.empty(whole.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(whole, non_blocking=True)
    return host.untyped_storage()


class DeviceCopy:
    """Where the snapshot's device-to-host copies run: on a GPU, a stream of the writer's own that starts
    once the compute stream has reached the save (an event recorded by the training thread); on the CPU,
    where the copy is a plain memcpy, nothing."""

    def __init__(self):
        self.stream = self.saved = None
        if on_cuda():
            self.saved = torch.cuda.Event()
            self.saved.record()  # in the training thread, on the compute stream, at the save

    def run(self, copy):
        """`copy()` on the copy stream, returning once its copies are complete."""
        if self.saved is None:
            return copy()
        self.stream = torch.cuda.Stream()
        self.stream.wait_event(self.saved)
        with torch.cuda.stream(self.stream):
            result = copy()
        self.stream.synchronize()
        return result


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
                self.files = self.device_copy.run(lambda: [(path, snapshot(state, memo)) for path, state in self.files])
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
