"""The host-memory snapshot behind background checkpoint writes (checkpoint.async_save), in-process."""
import io

import pytest
import torch

from ds_finetune.async_save import BackgroundWrite, snapshot


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
    monkeypatch.setattr(HashingFile, "DIRECT", direct)
    pieces = [os.urandom(n) for n in (1, 4095, 4097, 20000, 0, 12288, 7)]  # 40,485 bytes: not block-aligned
    f = HashingFile(str(tmp_path / "x.bin"))
    for piece in pieces:
        assert f.write(memoryview(piece)) == len(piece)
    meta = f.close()
    data = b"".join(pieces)
    assert (tmp_path / "x.bin").read_bytes() == data
    assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
