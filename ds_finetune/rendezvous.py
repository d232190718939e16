"""Ranks that wait for each other on files instead of in a collective, for work whose length grows with the
model (hashing a checkpoint, converting one): a collective would end it with DeepSpeed's process-group
timeout. The folder is shared by every node (as checkpoints are). In it each rank writes

    .done-rR.json   its report (any JSON value)
    .error-rR       the one-line error that stopped it, so the others stop with it
    .alive-rR       touched as it works and while it waits

A rank that hangs cannot write an error, so a waiting rank gives up on a rank whose `.alive-rR` has not
changed for `stall_s()`. Changes are timed on the waiter's own clock: the nodes' clocks need not agree.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from ds_finetune.dist import barrier, decide
from ds_finetune.errors import UserError
from ds_finetune.files import write_atomic

POLL_S = 0.1
SCRATCH_PREFIX = ".rendezvous-"


@contextmanager
def scratch_folder(parent: Path, rank: int):
    """A new folder under `parent` that every rank agrees on, for one piece of shared work. When the
    block ends, every rank has read what it needed (a barrier) and rank 0 removes it. Leftovers of a
    crashed job are removed by rank 0 before the next one is made."""
    def make():
        for old in parent.glob(SCRATCH_PREFIX + "*"):
            shutil.rmtree(old, ignore_errors=True)
        return f"{SCRATCH_PREFIX}{uuid.uuid4().hex[:12]}"

    folder = parent / decide(make, runs_here=rank == 0)
    yield folder
    barrier()
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)


def stall_s() -> float:
    """How long a rank may show no sign of life: DeepSpeed's collective timeout (DEEPSPEED_TIMEOUT, in
    minutes, 10 by default), the bound the user already set for a stuck rank. DS_FINETUNE_STALL_S
    (seconds) overrides it, for tests."""
    override = os.environ.get("DS_FINETUNE_STALL_S")
    return float(override) if override else 60.0 * int(os.environ.get("DEEPSPEED_TIMEOUT", "10"))


class Rendezvous:
    def __init__(self, folder: Path, rank: int, world: int, what: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.rank, self.world, self.what = folder, rank, world, what  # what: "converting X"
        self.stall_s, self.started, self.seen = stall_s(), time.monotonic(), {}

    def beat(self) -> None:
        (self.folder / f".alive-r{self.rank}").touch()

    def report(self, value) -> None:
        write_atomic(self.folder / f".done-r{self.rank}.json", json.dumps(value))

    def fail(self, err: Exception) -> None:
        message = err.message if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        write_atomic(self.folder / f".error-r{self.rank}", message)

    def gather(self, work) -> list:
        """Do this rank's share (`work()`, which beats as it goes), report its result and return every
        rank's, in rank order. An exception is reported to the others first, so they do not wait for it."""
        try:
            self.beat()
            self.report(work())
            return self.reports()
        except Exception as e:
            self.fail(e)
            raise

    def reports(self) -> list:
        """Every rank's report, in rank order, once all are there (beating while it waits)."""
        done = [self.folder / f".done-r{r}.json" for r in range(self.world)]

        def all_done():
            self.beat()
            missing = [r for r, p in enumerate(done) if not p.exists()]
            self.check_alive(missing)
            return not missing

        self.wait_until(all_done)
        return [json.loads(p.read_text()) for p in done]

    def clear_markers(self) -> None:
        """Remove the reports and heartbeats (before the folder becomes something else)."""
        for p in [*self.folder.glob(".done-r*.json"), *self.folder.glob(".alive-r*")]:
            p.unlink()

    def wait_until(self, ready) -> None:
        """Poll `ready()` until it is true; a rank's error report ends the wait with that error."""
        while not ready():
            errors = sorted(self.folder.glob(".error-r*")) if self.folder.exists() else []
            if errors:
                raise UserError(errors[0].read_text())
            time.sleep(POLL_S)

    def check_alive(self, ranks: list[int]) -> None:
        """Raise for the first of `ranks` whose heartbeat has not changed for `stall_s` (counted from the
        start of this wait for a rank not seen yet)."""
        now = time.monotonic()
        for r in ranks:
            try:
                mtime = (self.folder / f".alive-r{r}").stat().st_mtime_ns
            except FileNotFoundError:
                mtime = None
            last, since = self.seen.get(r, (None, self.started))
            if mtime != last:
                self.seen[r] = (mtime, now)
            elif now - since > self.stall_s:
                raise UserError(f"rank {r} has shown no progress {self.what} for "
                                f"{self.stall_s:.0f} s (a hung process or file system); stop the job and start it "
                                f"again (DEEPSPEED_TIMEOUT, in minutes, sets this limit)")


class Meter:
    """Says how far a long piece of work has got, every `every_s` seconds: done of total, rate, time left
    (for logs as much as terminals, so plain lines rather than a bar)."""

    def __init__(self, say, what: str, total: int, every_s: float = 10.0):
        self.say, self.what, self.total, self.every_s = say, what, total, every_s
        self.done, self.started = 0, time.monotonic()
        self.last = self.started

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.say is None or now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.say(f"{self.what}: {self.done / 1e9:.1f} of {self.total / 1e9:.1f} GB ({rate / 1e6:.0f} MB/s, "
                 f"~{left:.0f} s left)")
