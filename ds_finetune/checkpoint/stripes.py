"""Striped checkpoint files: one file that the ranks of a node write together, each its own stripes.

At ZeRO 1 and 2 every rank holds the same model states (the module's weights, the client state), and
DeepSpeed has rank 0 write that file alone: with 2 ranks rank 0 writes ~60 % of a save's bytes while the
other waits. Here every rank of the first node serialises the same state (`torch.save` of equal objects:
equal bytes) and writes only the stripes it owns: stripe k (`STRIPE` bytes at offset k x STRIPE) is rank
k mod n's. Each rank hashes its own stripes as it writes them (`StripedFile`); the manifest records one
sha256 per rank's stripes, and verification recomputes each from that rank's stripes (`stripe_digest`).
The file is the same torch file DeepSpeed writes: its `load_checkpoint` and `zero_to_fp32` read it unchanged.

Equal bytes are DeepSpeed's design (the weights are all-gathered after every step, the client state is
gathered before the save); it is also checked: every rank hashes the stream's first `HEAD` bytes (the
pickle of every value but the tensors' bytes comes first, the config and the step counters included), and
the commit refuses a save whose ranks disagree (`merge`). The stripes of one file are written from one
node only: any POSIX file system takes writes at several offsets of a file from processes of one host.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ds_finetune.files import HashingFile

STRIPE = 64 << 20  # a multiple of HashingFile.CHUNK and of read_ahead's chunk
HEAD = 4 << 20


class StripedFile(HashingFile):
    """This rank's stripes of a file that `world` ranks write together (each through its own StripedFile,
    with the same bytes): `write` takes the whole stream and keeps what falls in this rank's stripes."""

    def __init__(self, path: str, rank: int, world: int, tear=None, direct: bool = True):
        super().__init__(path, tear=tear, direct=direct, truncate=False)  # the others write into it too
        self.rank, self.world = rank, world
        self.pos = 0  # bytes of the stream so far, every rank's
        self.head = hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        if self.pos < HEAD:
            self.head.update(view[:HEAD - self.pos])
        while len(view):
            stripe, within = divmod(self.pos, STRIPE)
            take = min(len(view), STRIPE - within)
            if stripe % self.world == self.rank:
                if within == 0:
                    self.offset = self.pos  # the buffer is empty: this stripe's bytes start here
                super().write(view[:take])
                if within + take == STRIPE and self.fill:  # the stripe's end (block-aligned): out before the next
                    self._submit(self.fill)
            self.pos += take
            view = view[take:]
        return total

    def close(self) -> dict:
        try:
            self._write_tail()
            if self.direct and self.rank == owner(self.pos - 1, self.world):
                os.ftruncate(self.fd, self.pos)  # the stream ends in this rank's stripe: the padding cut off
            os.fsync(self.fd)
        finally:
            self.abandon()
        return {"size": self.pos, "stripe_bytes": STRIPE, "stripe_ranks": self.world,
                "stripes_sha256": {str(self.rank): self.sha.hexdigest()}, "head_sha256": self.head.hexdigest()}


def owner(offset: int, world: int) -> int:
    """The rank whose stripe holds byte `offset` (rank 0 for an empty file)."""
    return max(offset, 0) // STRIPE % world


def merge(name: str, parts: list[dict]) -> dict:
    """The manifest entry of a striped file from the entries its ranks reported: its size, stripe size and
    the sha256 of each rank's stripes (rank order). Raises if the ranks wrote different streams or a rank's
    part is missing."""
    sizes = {(p["size"], p["head_sha256"], p["stripe_bytes"], p["stripe_ranks"]) for p in parts}
    if len(sizes) != 1:
        raise RuntimeError(f"{name}: the ranks serialised different model states (size, first bytes, stripes: "
                           f"{sorted(sizes)}); this checkpoint is not committed")
    world = parts[0]["stripe_ranks"]
    digests = {r: h for p in parts for r, h in p["stripes_sha256"].items()}
    if sorted(digests) != sorted(str(r) for r in range(world)):
        raise RuntimeError(f"{name}: stripes of ranks {sorted(digests)} reported, {world} expected")
    return {"size": parts[0]["size"], "stripe_bytes": parts[0]["stripe_bytes"],
            "stripes_sha256": [digests[str(r)] for r in range(world)]}


def merge_reports(reports: list[dict]) -> dict:
    """Every rank's {file: entry} joined into one {file: manifest entry}: a striped file's parts merged."""
    files, striped = {}, {}
    for report in reports:
        for name, meta in report.items():
            if "stripes_sha256" in meta:
                striped.setdefault(name, []).append(meta)
            else:
                files[name] = meta
    for name, parts in striped.items():
        files[name] = merge(name, parts)
    return files


def stripe_bytes_of(size: int, stripe: int, world: int, rank: int) -> int:
    """How many of a `size`-byte file's bytes are rank `rank`'s stripes."""
    return sum(min(stripe, size - start) for start in range(rank * stripe, size, world * stripe))


def stripe_digest(path: Path, stripe: int, world: int, rank: int, progress=None) -> str:
    """The sha256 of one rank's stripes of the file, reading only them (the next stripe's read announced to
    the kernel while this one is hashed)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    starts = range(rank * stripe, size, world * stripe)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 << 20)
        for start in starts:
            if start + world * stripe < size:
                os.posix_fadvise(f.fileno(), start + world * stripe, stripe, os.POSIX_FADV_WILLNEED)
            f.seek(start)
            left = min(stripe, size - start)
            while left:
                n = f.readinto(memoryview(buf)[:min(len(buf), left)])
                if not n:
                    break
                h.update(memoryview(buf)[:n])
                left -= n
                if progress:
                    progress(n)
    return h.hexdigest()
