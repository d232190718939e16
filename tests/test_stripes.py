"""Striped checkpoint files (checkpoint/stripes.py), in-process: ranks (threads here) that write their
stripes of one file give the stream's bytes, a manifest entry that verification recomputes, and a refused
commit when their streams differ. The launched ZeRO-1/2 saves use them in every kill and resume test."""
import hashlib
import os
import threading

import pytest

from ds_finetune.checkpoint import stripes
from ds_finetune.checkpoint.verify import hash_parts, verify_files, verify_parts
from ds_finetune.hashing import share_of_files
from ds_finetune.files import HashingFile

ALIGN = HashingFile.ALIGN


@pytest.fixture
def small(monkeypatch):
    """Buffers of 3 blocks and stripes of 5 (not a multiple of them), so a stream of ~70 KB crosses both
    boundaries many times, and the end is not block-aligned."""
    monkeypatch.setattr(HashingFile, "CHUNK", 3 * ALIGN)
    monkeypatch.setattr(stripes, "STRIPE", 5 * ALIGN)
    monkeypatch.setattr(stripes, "HEAD", 2 * ALIGN)


def write_striped(path, streams: list[list[bytes]], direct: bool) -> list[dict]:
    """Each rank (a thread) writes the whole of its stream through its StripedFile, all at once."""
    world, reports = len(streams), [None] * len(streams)

    def rank(r):
        f = stripes.StripedFile(str(path), r, world, direct=direct)
        for piece in streams[r]:
            assert f.write(memoryview(piece)) == len(piece)
        reports[r] = {"model.pt": f.close()}

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return reports


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_write_their_stripes_of_one_file_and_verification_recomputes_each(tmp_path, small, direct, world):
    pieces = [os.urandom(n) for n in (1, 4095, 4097, 30000, 0, 12288, 7, 20480, 333)]  # 71,388 bytes
    data = b"".join(pieces)
    reports = write_striped(tmp_path / "model.pt", [pieces] * world, direct)
    assert (tmp_path / "model.pt").read_bytes() == data
    entry = stripes.merge_reports(reports)["model.pt"]
    stripe = 5 * ALIGN
    owned = [b"".join(data[k:k + stripe] for k in range(r * stripe, len(data), world * stripe)) for r in range(world)]
    assert entry == {"size": len(data), "stripe_bytes": stripe,
                     "stripes_sha256": [hashlib.sha256(part).hexdigest() for part in owned]}
    manifest = {"files": {"model.pt": entry}}
    assert verify_files(tmp_path, manifest) == []
    with open(tmp_path / "model.pt", "r+b") as f:  # one byte of the last rank's first stripe
        f.seek((world - 1) * stripe + 10)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    assert verify_files(tmp_path, manifest) == ["model.pt: sha256 differs from the manifest (the file was changed "
                                                "or damaged)"]


def test_a_resumes_ranks_each_verify_a_share_of_every_ranks_stripes(tmp_path, small):
    """hash_together's split: a striped file is hashed as one part a rank that wrote it, so the file every
    rank loads is not one rank's to hash; a damaged stripe is found by the part that holds it."""
    pieces = [os.urandom(n) for n in (40000, 3, 25000)]
    reports = write_striped(tmp_path / "model.pt", [pieces] * 2, direct=True)
    (tmp_path / "optim.pt").write_bytes(b"o" * 5000)
    files = {**stripes.merge_reports(reports),
             "optim.pt": {"size": 5000, "sha256": hashlib.sha256(b"o" * 5000).hexdigest()}}
    parts = hash_parts(files)
    assert set(parts) == {("model.pt", 0), ("model.pt", 1), ("optim.pt", -1)}
    assert parts["model.pt", 0]["size"] + parts["model.pt", 1]["size"] == files["model.pt"]["size"]
    shares = [share_of_files(parts, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(parts) and all(shares)
    assert [verify_parts(tmp_path, files, share) for share in shares] == [[], []]
    with open(tmp_path / "model.pt", "r+b") as f:  # a byte of rank 1's first stripe
        f.seek(5 * ALIGN + 3)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    damaged = "model.pt: sha256 differs from the manifest (the file was changed or damaged)"
    assert verify_parts(tmp_path, files, [("model.pt", 0)]) == []
    assert verify_parts(tmp_path, files, [("model.pt", 1)]) == [damaged]


def test_ranks_that_serialised_different_states_are_refused_at_the_commit(tmp_path, small):
    same = [os.urandom(9000), os.urandom(30000)]
    other = [same[0][:100] + b"x" + same[0][101:], same[1]]  # one byte in the pickle at the start differs
    reports = write_striped(tmp_path / "model.pt", [same, other], direct=False)
    with pytest.raises(RuntimeError, match="model.pt: the ranks serialised different model states"):
        stripes.merge_reports(reports)
    with pytest.raises(RuntimeError, match=r"stripes of ranks \['0'\] reported, 2 expected"):
        stripes.merge_reports(reports[:1])
