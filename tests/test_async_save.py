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


def test_the_copy_is_taken_before_wait_until_copied_returns_and_training_may_then_change_the_state(tmp_path,
                                                                                                   monkeypatch):
    import time

    from ds_finetune.checkpoint import async_save

    def slow_snapshot(obj, memo=None):
        time.sleep(0.3)  # a copy that takes a while: the caller must wait for it, not race it
        return snapshot(obj, memo)

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
    from ds_finetune.objective import train_step

    calls = []

    class Engine:  # DeepSpeed's accumulation: step() updates on every grad_accum-th micro-batch
        device, micro_steps = "cpu", 0

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

    train_step(Engine(), loss_fn, [[torch.zeros(1)]] * 3, global_targets=3, grad_accum=3, averaged_over=1,
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
