"""The host-memory snapshot behind background checkpoint writes (checkpoint.async_save), in-process."""
import io

import pytest
import torch

from ds_finetune.checkpoint.async_save import BackgroundWrite, snapshot


def saved_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def state_like_deepspeeds():
    flat = torch.arange(12, dtype=torch.float32)  # a flat buffer with views into it, as ZeRO keeps them
    return flat, {"module": {"a": flat[:4].view(2, 2), "b": flat[4:]}, "master": torch.nn.Parameter(flat.clone()),
                  "optimizer": {"state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(5.0)}}},
                  "groups": [{"lr": 0.1, "params": [0]}], "version": "0.19", "counts": (1, 2)}


def test_a_snapshot_is_written_as_the_live_state_would_be_and_no_longer_follows_it():
    flat, state = state_like_deepspeeds()
    before = saved_bytes(state)
    copy = snapshot(state)
    assert saved_bytes(copy) == before  # the same bytes, views and sharing included
    flat.add_(100)                      # training goes on
    state["optimizer"]["state"][0]["exp_avg"].mul_(3)
    assert saved_bytes(copy) == before
    assert saved_bytes(state) != before
    assert isinstance(copy["master"], torch.nn.Parameter) and copy["master"].requires_grad


def test_background_write_writes_hashes_and_reports_errors(tmp_path):
    from ds_finetune.files import sha256_file

    _, state = state_like_deepspeeds()
    writer = BackgroundWrite(rank=0, step=1)
    writer.collect(state, tmp_path / "a.pt")
    writer.start()
    written = writer.relative(tmp_path)
    assert written["a.pt"]["sha256"] == sha256_file(tmp_path / "a.pt")
    assert saved_bytes(torch.load(tmp_path / "a.pt", weights_only=False)) == saved_bytes(state)

    failing = BackgroundWrite(rank=0, step=1)
    failing.collect(state, tmp_path / "no-such-dir" / "b.pt")
    failing.start()
    try:
        failing.wait()
    except OSError as e:
        assert "no-such-dir" in str(e)
    else:
        raise AssertionError("a failed write must be raised to the caller")


@pytest.mark.parametrize("direct", [True, False])
def test_hashing_file_writes_every_byte_across_chunks_and_a_ragged_tail(tmp_path, monkeypatch, direct):
    import hashlib
    import os

    from ds_finetune.files import HashingFile

    monkeypatch.setattr(HashingFile, "CHUNK", 3 * HashingFile.ALIGN)  # small, so writes cross chunk boundaries
    pieces = [os.urandom(n) for n in (1, 4095, 4097, 20000, 0, 12288, 7)]  # 40,485 bytes: not block-aligned
    f = HashingFile(str(tmp_path / "x.bin"), direct=direct)
    for piece in pieces:
        assert f.write(memoryview(piece)) == len(piece)
    meta = f.close()
    data = b"".join(pieces)
    assert (tmp_path / "x.bin").read_bytes() == data
    assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_the_copy_into_a_hashing_files_buffer_lets_other_python_threads_run():
    """A background save copies the state's bytes into its O_DIRECT buffers with the GIL released, so the
    training thread keeps running Python meanwhile: here a thread stamps the clock through the middle of a
    large copy. A slice assignment holds the GIL for the whole memcpy and leaves no stamp there."""
    import mmap
    import threading
    import time

    from ds_finetune.files import copy_into

    src = memoryview(bytearray(b"\x01" * (256 << 20)))
    dst = mmap.mmap(-1, len(src))  # fresh pages: the copy also faults them in (~0.1 s here)
    window, stamps = [], []

    def copy():
        window.append(time.perf_counter())
        copy_into(dst, 0, src)
        window.append(time.perf_counter())

    thread = threading.Thread(target=copy)
    thread.start()
    while thread.is_alive():
        stamps.append(time.perf_counter())
    thread.join()
    start, end = window
    middle = [t for t in stamps if start + (end - start) / 4 < t < end - (end - start) / 4]
    took_ms = (end - start) * 1e3
    assert middle, f"no Python ran in the middle {took_ms / 2:.0f} ms of a {took_ms:.0f} ms copy"
    assert dst[:4096] == src[:4096] and dst[-4096:] == src[-4096:]
    dst.close()


def test_read_ahead_hands_out_every_byte_in_order_and_a_read_error_reaches_the_caller(tmp_path):
    import hashlib
    import os

    from ds_finetune.files import read_ahead, sha256_file

    for size in (0, 1, 4095, 4096, 4097, 5 * 4096 + 3):  # empty, under, at and across the chunk size
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        with open(tmp_path / "f", "rb", buffering=0) as f:
            assert b"".join(bytes(c) for c in read_ahead(f, chunk=4096)) == data
        assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()

    class FailingFile:
        def __init__(self):
            self.reads = 0

        def readinto(self, buf):
            self.reads += 1
            if self.reads == 3:
                raise OSError(5, "Input/output error")
            buf[:] = bytes(len(buf))
            return len(buf)

    failing = FailingFile()
    with pytest.raises(OSError, match="Input/output"):
        for _ in read_ahead(failing, chunk=16):
            pass
    assert failing.reads == 3


@pytest.mark.parametrize("direct", [True, False])
def test_a_write_error_in_the_hashing_files_writer_thread_reaches_the_caller(tmp_path, monkeypatch, direct):
    """The disk fills while the writer thread writes a chunk: the caller gets the error (at its next write or
    at close), nothing hangs, and the file is closed."""
    import errno

    from ds_finetune import files

    monkeypatch.setattr(files.HashingFile, "CHUNK", 2 * files.HashingFile.ALIGN)
    calls = []
    real = files.write_all

    def full_disk(fd, view, offset):
        calls.append(len(view))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, view, offset)

    monkeypatch.setattr(files, "write_all", full_disk)
    f = files.HashingFile(str(tmp_path / "x.bin"), direct=direct)
    with pytest.raises(OSError, match="No space left"):
        try:
            for _ in range(10):
                f.write(b"x" * files.HashingFile.ALIGN)
        finally:
            f.close()
    assert len(calls) >= 2 and (f.writer is None or not f.writer.is_alive())


def test_the_copy_is_taken_before_wait_until_copied_returns_and_training_may_then_change_the_state(tmp_path,
                                                                                                   monkeypatch):
    import time

    from ds_finetune.checkpoint import async_save

    def slow_snapshot(obj, memo=None, host_buffer=None):
        time.sleep(0.3)  # a copy that takes a while: the caller must wait for it, not race it
        return snapshot(obj, memo, host_buffer)

    monkeypatch.setattr(async_save, "snapshot", slow_snapshot)
    flat, state = state_like_deepspeeds()
    before = saved_bytes(state)
    writer = BackgroundWrite(rank=0, step=1)
    writer.collect(state, tmp_path / "a.pt")  # keeps the live state: nothing copied yet
    writer.start()
    writer.wait_until_copied()
    flat.add_(100)  # the optimizer step
    state["optimizer"]["state"][0]["exp_avg"].mul_(3)
    writer.wait()
    assert saved_bytes(torch.load(tmp_path / "a.pt", weights_only=False)) == before


def test_train_step_waits_for_a_background_copy_only_before_the_step_that_updates():
    from ds_finetune.objectives import accumulate

    calls = []

    class Engine:  # DeepSpeed's accumulation: step() updates on every grad_accum-th micro-batch
        device, micro_steps, global_rank = "cpu", 0, 0
        seq_dp_world_size, sequence_parallel_size = 1, 1  # one rank: gradients averaged over 1

        def backward(self, loss):
            calls.append("backward")

        def is_gradient_accumulation_boundary(self):
            return (self.micro_steps + 1) % 3 == 0

        def fp16_enabled(self):
            return False

        def step(self):
            calls.append("update" if self.is_gradient_accumulation_boundary() else "step")
            self.micro_steps += 1

    def loss_fn(engine, *batch, grad_scale=1.0):
        return torch.tensor(1.0)

    accumulate(Engine(), loss_fn, [[torch.zeros(1)]] * 3, normaliser=3, step=1,
               before_update=lambda: calls.append("wait"))
    assert calls == ["backward", "step", "backward", "step", "backward", "wait", "update"]


def test_a_snapshot_shares_no_object_with_the_live_state():
    """fp16: ZeRO's optimizer state dict holds the engine's live DynamicLossScaler; the step after a
    background save changes it while the writer may still be pickling. The snapshot holds a copy taken
    before that step, so the file has the scale of the saved step."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=1,
                               consecutive_hysteresis=False)
    live = {"loss_scaler": scaler, "state": {"step": 3, "tag": "step_3"}, "fp32": [torch.ones(2)]}
    copy = snapshot(live)
    scaler.cur_scale /= 2  # what the next step does on an overflow (update_scale)
    assert scaler.cur_scale == 2.0**15
    assert copy["loss_scaler"] is not scaler and copy["loss_scaler"].cur_scale == 2.0**16
    buffer = io.BytesIO()
    torch.save(copy, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False)["loss_scaler"].cur_scale == 2.0**16


class FakeCuda:
    """Just enough of torch.cuda for DeviceCopy, recording which thread did what on which device. The
    current device is per thread, as in CUDA: a new thread starts on device 0."""

    def __init__(self, training_device: int):
        import threading
        self.local, self.calls = threading.local(), []
        self.local.device = training_device
        fake = self

        class Event:
            def record(self):
                fake.calls.append(("record", fake.current_device()))

        class Stream:
            def __init__(self, device=None):
                self.device = fake.current_device() if device is None else device
                fake.calls.append(("stream", self.device))

            def wait_event(self, event):
                pass

            def synchronize(self):
                fake.calls.append(("synchronize", self.device))

        self.Event, self.Stream = Event, Stream

    def current_device(self):
        return getattr(self.local, "device", 0)

    def set_device(self, device):
        self.local.device = device

    def stream(self, s):
        import contextlib
        # torch.cuda.stream(s) makes s current on s's device only: copies on another device ignore it
        assert s.device == self.current_device(), "the copy stream is not on the current device"
        return contextlib.nullcontext()


def faked_cuda(monkeypatch, training_device: int) -> FakeCuda:
    from ds_finetune.checkpoint import async_save

    fake = FakeCuda(training_device)
    monkeypatch.setattr(async_save, "on_cuda", lambda: True)
    for name in ("Event", "Stream", "current_device", "set_device", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(async_save, "host_pool", lambda: async_save.PinnedHostPool(limit=0))
    monkeypatch.setattr(async_save, "_copy_streams", {})
    return fake


def test_the_writer_thread_copies_on_the_device_the_save_was_taken_on(monkeypatch):
    """Rank 3 of a node trains on cuda:3: the writer thread (which starts on device 0) must make its copy
    stream on cuda:3 and run the copy with cuda:3 current, or the copies queue on cuda:3's compute stream
    and the stream it waits on is an empty one on cuda:0 (stale bytes hashed as valid)."""
    from ds_finetune.checkpoint import async_save

    fake = faked_cuda(monkeypatch, training_device=3)
    devices_during_copy = []

    def copy(host_buffer):
        devices_during_copy.append(fake.current_device())
        return "copied"

    device_copy = async_save.DeviceCopy()  # in the training thread, at the save
    import threading
    results = []
    worker = threading.Thread(target=lambda: results.append(device_copy.run(copy, [])))
    worker.start()
    worker.join()
    assert results == ["copied"] and devices_during_copy == [3]
    assert fake.calls == [("record", 3), ("stream", 3), ("synchronize", 3)]


def test_every_save_copies_on_one_stream_and_a_failed_copy_is_waited_for_before_the_pool_is_reused(monkeypatch):
    """A stream made at every save walks torch's pool of 32 onto DeepSpeed's; and a copy that fails midway
    may have queued copies into the pinned pool, which the next save reuses: its stream is synchronized
    all the same."""
    import threading

    from ds_finetune.checkpoint import async_save

    fake = faked_cuda(monkeypatch, training_device=1)

    def failing(host_buffer):
        raise RuntimeError("CUDA error: an illegal memory access")

    outcomes = []
    for copy in (lambda host_buffer: "copied", lambda host_buffer: "copied", failing):
        device_copy = async_save.DeviceCopy()  # in the training thread, at each save

        def write():
            try:
                outcomes.append(device_copy.run(copy, []))
            except RuntimeError as e:
                outcomes.append(str(e))

        worker = threading.Thread(target=write)
        worker.start()
        worker.join()
    assert outcomes == ["copied", "copied", "CUDA error: an illegal memory access"]
    assert fake.calls == [("record", 1), ("stream", 1), ("synchronize", 1),
                          ("record", 1), ("synchronize", 1), ("record", 1), ("synchronize", 1)]


def registered_pool(monkeypatch, limit):
    from ds_finetune.checkpoint import async_save

    registered = []
    monkeypatch.setattr(async_save, "register_host_memory", lambda b: registered.append(b.numel()))
    monkeypatch.setattr(async_save.PinnedHostPool, "release", lambda self: setattr(self, "buffer", None))
    return async_save.PinnedHostPool(limit=limit), registered


def test_snapshots_through_the_pinned_pool_write_the_same_bytes_and_reuse_one_buffer(monkeypatch):
    """Every save reuses one registered buffer sized to the save (not torch's power-of-two pinned blocks,
    kept forever); each copy owns exactly its bytes, so torch.save writes what it would have written."""
    from ds_finetune.checkpoint.async_save import storage_sizes

    pool, registered = registered_pool(monkeypatch, limit=1 << 20)
    flat, state = state_like_deepspeeds()
    sizes = storage_sizes(state)
    assert sorted(sizes) == sorted(s.untyped_storage().nbytes() for s in (
        flat, state["master"], state["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["step"]))
    for save in range(3):
        pool.reserve(sizes)
        copy = snapshot(state, {}, pool.take)
        assert saved_bytes(copy) == saved_bytes(state)
        flat.add_(1)
    assert registered == [4 * 4096]  # one buffer, registered once, a page a storage
    assert pool.pinned_bytes == 4 * 4096


def test_the_pinned_pool_is_capped_and_grows_to_the_largest_save(monkeypatch):
    pool, registered = registered_pool(monkeypatch, limit=4 * 4096)
    pool.reserve([100])
    first = pool.take(100)
    assert first.untyped_storage().nbytes() == 100 and registered == [4096]
    pool.reserve([5000, 5000])  # grows: the old buffer released, a larger one registered
    a, b = pool.take(5000), pool.take(5000)
    assert registered == [4096, 4 * 4096]
    assert b.data_ptr() - a.data_ptr() == 8192  # page-aligned, not overlapping
    pool.reserve([4096] * 5)  # past the cap: four pages pinned, the rest pageable
    taken = [pool.take(4096) for _ in range(5)]
    assert registered == [4096, 4 * 4096] and pool.pinned_bytes == 4 * 4096
    inside = [pool.buffer.data_ptr() <= t.data_ptr() < pool.buffer.data_ptr() + pool.pinned_bytes for t in taken]
    assert inside == [True, True, True, True, False]


def test_cpu_background_saves_copy_into_one_reused_pageable_buffer(tmp_path, monkeypatch):
    """On the CPU the snapshot goes into the process's pool too (unregistered): the second save copies into
    the first one's pages (no page faults of fresh memory: the stall is the memcpy), and writes its own bytes."""
    from ds_finetune.checkpoint import async_save

    monkeypatch.setattr(async_save, "_pool", None)
    monkeypatch.setattr(async_save, "register_host_memory", lambda b: pytest.fail("a CPU pool is not registered"))
    flat, state = state_like_deepspeeds()
    buffers = []
    for step in (1, 2):
        expected = saved_bytes(state)
        writer = BackgroundWrite(rank=0, step=step)
        writer.collect(state, tmp_path / f"s{step}.pt")
        writer.start()
        writer.wait()
        pool = async_save._pool
        assert pool is not None and not pool.pin and pool.used > 0
        buffers.append(pool.buffer.data_ptr())
        assert saved_bytes(torch.load(tmp_path / f"s{step}.pt", weights_only=False)) == expected
        flat.add_(1)
    assert buffers[0] == buffers[1]
