"""Ranks waiting for each other on files (conversion, and hashing a checkpoint at resume), in-process: two
"ranks" are two Rendezvous objects on one folder. A rank that hangs ends the wait after the stall limit and
not before; a rank's error ends it at once; every rank gets every report; the hashing is shared fairly."""
import threading
import time

import pytest

from ds_finetune import rendezvous
from ds_finetune.errors import UserError
from ds_finetune.rendezvous import Meter, Rendezvous
from ds_finetune.hashing import share_of_files


def test_the_wait_gives_up_on_a_rank_that_shows_no_progress_and_only_then(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_FINETUNE_STALL_S", "0.4")
    waiter = Rendezvous(tmp_path, 0, 2, "converting X")
    worker = Rendezvous(tmp_path, 1, 2, "converting X")
    for _ in range(8):  # 0.8 s, twice the limit: rank 1 keeps beating, so it is alive
        worker.beat()
        waiter.check_alive([1])
        time.sleep(0.1)
    time.sleep(0.5)  # rank 1 stops
    with pytest.raises(UserError, match="rank 1 has shown no progress converting X for 0 s"):
        waiter.check_alive([1])
    other = Rendezvous(tmp_path, 1, 2, "x")
    other.check_alive([0])  # rank 0 has not beaten yet, but the wait has just begun
    time.sleep(0.5)
    with pytest.raises(UserError, match="rank 0 has shown no progress"):  # never beat since the wait began
        other.check_alive([0])


def test_the_limit_is_deepspeeds_collective_timeout(monkeypatch):
    monkeypatch.delenv("DS_FINETUNE_STALL_S", raising=False)
    monkeypatch.setenv("DEEPSPEED_TIMEOUT", "3")
    assert rendezvous.stall_s() == 180  # minutes, as DeepSpeed reads it
    monkeypatch.delenv("DEEPSPEED_TIMEOUT")
    assert rendezvous.stall_s() == 600  # DeepSpeed's default


def test_every_rank_gets_every_report_in_rank_order_and_an_error_stops_the_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(rendezvous, "POLL_S", 0.01)
    boards = [Rendezvous(tmp_path / "ok", r, 3, "x") for r in range(3)]  # each makes the folder if missing
    got = {}

    def rank(r):
        time.sleep(0.05 * (3 - r))  # reports arrive in reverse order
        boards[r].report({"rank": r})
        got[r] = boards[r].reports()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert got == {r: [{"rank": 0}, {"rank": 1}, {"rank": 2}] for r in range(3)}

    failing, waiting = Rendezvous(tmp_path / "bad", 1, 2, "x"), Rendezvous(tmp_path / "bad", 0, 2, "x")
    failing.fail(UserError("checkpoint error: rank 1 could not read shard 3"))
    waiting.report([])
    with pytest.raises(UserError, match="could not read shard 3"):
        waiting.reports()


def test_the_hashing_is_shared_by_size_disjoint_and_complete():
    files = {f"optim_{r}.pt": {"size": 1000} for r in range(4)} | {f"model_{r}.pt": {"size": 10} for r in range(4)}
    files["meta.json"] = {"size": 1}
    shares = [share_of_files(files, r, 4) for r in range(4)]
    assert sorted(n for s in shares for n in s) == sorted(files)  # each file once
    assert [sum(n.startswith("optim") for n in s) for s in shares] == [1, 1, 1, 1]  # one big file each
    assert share_of_files(files, 0, 1) == sorted(files, key=lambda n: (-files[n]["size"], n))


def test_a_meter_says_done_total_rate_and_time_left_at_most_every_period():
    said = []
    meter = Meter(said.append, "verifying step_9", total=4_000_000_000, every_s=0.05)
    meter.add(1_000_000_000)  # too soon: nothing said
    time.sleep(0.06)
    meter.add(1_000_000_000)
    assert len(said) == 1 and said[0].startswith("verifying step_9: 2.0 of 4.0 GB (") and "s left)" in said[0]


def test_a_scratch_folder_is_removed_after_its_work_and_a_crashed_jobs_leftover_before(tmp_path, monkeypatch):
    monkeypatch.setattr(rendezvous, "decide", lambda fn, runs_here: fn())  # one rank: no process group
    monkeypatch.setattr(rendezvous, "barrier", lambda: None)
    leftover = tmp_path / f"{rendezvous.SCRATCH_PREFIX}crashed"
    (leftover / "step_00000009").mkdir(parents=True)
    with rendezvous.scratch_folder(tmp_path, rank=0) as scratch:
        assert not leftover.exists() and scratch.parent == tmp_path
        Rendezvous(scratch / "step_00000010", 0, 1, "x").report([])
    assert list(tmp_path.iterdir()) == []
