"""Atomic commit, retention, errors, safety: a kill at every phase of a save never loses a committed
checkpoint, --resume picks the newest committed one, and the run still ends bitwise equal to the
uninterrupted reference. Damaged checkpoints are detected before anything is unpickled. And when saves
happen (checkpoint.every_minutes, on rank 0's clock)."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import harness
from ds_finetune.checkpoint.layout import LATEST, MANIFEST
from ds_finetune.checkpoint.verify import find_resumable_checkpoint, inspect_checkpoint
from ds_finetune.hashing import share_of_files
from ds_finetune.faults import PHASES

# (DS_FINETUNE_FAULT, does the save of that step commit before the kill?)
CHAIN = [
    ("before_save@step2", False),
    ("mid_shards:rank1@step3", False),
    ("after_shards:rank1@step4", False),
    ("after_manifest_tmp@step5", False),
    ("after_manifest_rename@step6", True),
    ("before_latest_rename@step7", True),
    ("after_latest_rename@step8", True),
    ("during_retention@step9", True),
]


# At ZeRO 0 only rank 0 writes files, so its shard faults fire on rank 0; the rest of a save is rank 0's
# commit, stage-independent and chained above. (DS_FINETUNE_FAULT, does that step commit?, a disk error?)
def low_stage_chain(stage: int) -> list:
    writer = 0 if stage == 0 else 1
    return [
        (f"torn_shard:rank{writer}@step2", False, False),   # a half-written shard, then the kill
        (f"mid_shards:rank{writer}@step3", False, False),
        ("enospc_manifest@step4", False, True),            # rank 0's commit fails while rank 1 waits on it
        ("enospc_latest@step5", True, True),               # committed (the manifest), `latest` not replaced
    ]


# checkpoint.async_save: the files are written by a background thread while training goes on, and committed
# by the main loop later. (DS_FINETUNE_FAULT, does that step commit before the kill?)
ASYNC_CHAIN = [
    ("async_write:rank1@step3", False),      # a kill while rank 1's background write runs
    ("async_written:rank1@step5", False),    # every file durable, the commit not yet made
    ("after_manifest_rename@step7", True),   # the commit, made by the main loop steps later
]


def test_the_tests_fire_every_fault_phase():
    """Every phase appears as a fault spec in a test (each launch with a fault asserts that it fired:
    harness.train, and a training process whose fault never fired exits non-zero)."""
    sources = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    fired = {phase for phase in PHASES if re.search(rf"[\"']{phase}(?::rank[^\"']*)?(?:@step[^\"']*)?[\"']", sources)}
    assert fired == set(PHASES), set(PHASES) - fired


def test_a_torn_shard_is_half_written_and_the_rest_of_the_job_is_killed(tmp_path):
    from ds_finetune.files import HashingFile

    torn = []
    f = HashingFile(str(tmp_path / "shard.pt"), tear=lambda: torn.append((tmp_path / "shard.pt").stat().st_size))
    f.write(b"x" * 3000)
    f.write(b"y" * 3000)
    f.write(b"z" * 3000)
    assert len(torn) == 1 and 0 < torn[0] < 9000  # on disk when the kill would land: some, not all of it
    assert f.close()["size"] == 9000


@pytest.mark.multiproc
# ZeRO-3; the commit is rank 0's, stage-independent, and the shard phases at lower stages are
# test_shard_and_commit_faults_at_zero_0_and_1's (ZeRO-1 and 2 write the same files)
@pytest.mark.parametrize("stage, chain", [(3, CHAIN)])
def test_kill_at_every_save_phase_keeps_committed_checkpoints_and_resumes_bitwise(reference_run, tmp_path, stage,
                                                                                   chain):
    overrides = [f"train.zero_stage={stage}"]
    ckpt_dir = tmp_path / "checkpoints"
    latest = None
    for i, (fault, commits) in enumerate(chain):
        step = int(fault.split("@step")[1])
        before = harness.committed_steps(ckpt_dir)
        proc = harness.train(tmp_path, overrides, resume=None if i == 0 else "auto", fault=fault, expect_ok=False)
        assert proc.returncode == -9, f"{fault}: {proc.returncode}\n{proc.stdout[-3000:]}"
        if i:
            harness.assert_resumed(proc, step=before[-1])
        after = harness.committed_steps(ckpt_dir)
        expected = step if commits else step - 1
        assert after[-1] == expected, (fault, after)
        # nothing committed was lost: the newest committed before this attempt is still there (retention
        # may drop it only once a newer one committed), and what --resume picks verifies
        if before and not (commits and after[-1] > before[-1]):
            assert before[-1] in after, (fault, before, after)
        pick, _ = find_resumable_checkpoint(ckpt_dir)
        assert pick is not None and pick.step == expected and inspect_checkpoint(pick.path).status == "complete"
        # `latest` (for DeepSpeed's tools; resume never reads it) moves only when a save got past its rename:
        # this attempt's saves before the fault step did, the fault step's did only after that phase
        if step - 1 > (before[-1] if before else 0):
            latest = step - 1
        if fault.split("@")[0] in ("after_latest_rename", "during_retention"):
            latest = step
        assert (ckpt_dir / LATEST).read_text() == f"step_{latest:08d}", fault
    if chain == CHAIN:
        # a save that fails with ENOSPC stops the run with one line; the previous checkpoint stays selected
        proc = harness.train(tmp_path, overrides, resume="auto", fault="enospc:rank1@step10", expect_ok=False)
        assert proc.returncode != 0
        harness.assert_resumed(proc, step=9)
        assert "checkpoint error: saving into" in proc.stdout + proc.stderr and "MiB free" in proc.stdout + proc.stderr
        pick, _ = find_resumable_checkpoint(ckpt_dir)
        assert pick.step == 9
    # the final attempt reports the leftover and finishes; the whole metrics file equals the reference
    final = harness.train(tmp_path, overrides, resume="auto")
    harness.assert_resumed(final, step=pick.step)
    leftover = 10 if chain == CHAIN else int(chain[-1][0].split("@step")[1])
    assert "skipping incomplete checkpoint" in final.stdout and f"step_{leftover:08d}" in final.stdout
    got, ref = harness.metrics(tmp_path), harness.metrics(reference_run(stage))
    assert harness.loss_reprs(got) == harness.loss_reprs(ref)
    assert [r["sample_ids"] for r in got] == [r["sample_ids"] for r in ref]
    assert harness.committed_steps(ckpt_dir) == [9, 10]
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".trash-")]


@pytest.mark.multiproc
def test_kill_at_every_background_save_phase_keeps_committed_checkpoints_and_resumes_bitwise(reference_run,
                                                                                              tmp_path):
    # ZeRO 3: partitioned weights and moments, the most state a late snapshot could get wrong. The reference
    # run is synchronous (async_save is a harmless change).
    overrides = ["train.zero_stage=3", "checkpoint.async_save=true"]
    ckpt_dir = tmp_path / "checkpoints"
    pick = None  # the checkpoint the last fault left: the next run resumes from it
    for i, (fault, commits) in enumerate(ASYNC_CHAIN):
        step = int(fault.split("@step")[1])
        proc = harness.train(tmp_path, overrides, resume=None if i == 0 else "auto", fault=fault, expect_ok=False)
        assert proc.returncode == -9, f"{fault}: {proc.returncode}\n{proc.stdout[-3000:]}"
        assert "[fault injection]" in proc.stdout, f"{fault} never fired"
        if pick is not None:
            harness.assert_resumed(proc, step=pick.step)
        pick, _ = find_resumable_checkpoint(ckpt_dir)
        assert pick.step == (step if commits else step - 1), (fault, pick.path)
    # a background write that fails with ENOSPC on rank 1 stops every rank with one line at the commit
    proc = harness.train(tmp_path, overrides, resume="auto", fault="enospc:rank1@step8", expect_ok=False)
    harness.assert_one_line_error(proc, "checkpoint error: saving into", "MiB free")
    harness.assert_resumed(proc, step=7)
    assert find_resumable_checkpoint(ckpt_dir)[0].step == 7
    final = harness.train(tmp_path, overrides, resume="auto")
    harness.assert_resumed(final, step=7)
    assert "written in the background" in final.stdout
    harness.assert_same_run(tmp_path, reference_run(3))
    harness.assert_same_final_weights(tmp_path, reference_run(3))
    assert harness.committed_steps(ckpt_dir) == [9, 10]


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [0, 1])
def test_shard_and_commit_faults_at_zero_0_and_1_keep_committed_checkpoints_and_resume_bitwise(
        reference_run, tmp_path, stage):
    overrides = [f"train.zero_stage={stage}"]
    ckpt_dir = tmp_path / "checkpoints"
    pick = None  # the checkpoint the last fault left: the next run resumes from it
    for i, (fault, commits, disk_error) in enumerate(low_stage_chain(stage)):
        step = int(fault.split("@step")[1])
        proc = harness.train(tmp_path, overrides, resume=None if i == 0 else "auto", fault=fault, expect_ok=False)
        if pick is not None:
            harness.assert_resumed(proc, step=pick.step)
        if disk_error:
            line = harness.assert_one_line_error(proc, "checkpoint error: saving into", "MiB free")
            assert proc.returncode == 3, line
        else:
            assert proc.returncode == -9, f"{fault}: {proc.returncode}\n{proc.stdout[-3000:]}"
            assert "[fault injection]" in proc.stdout, f"{fault} never fired"
        if fault.startswith("torn_shard"):
            leftover = ckpt_dir / f"step_{step:08d}"
            assert not (leftover / MANIFEST).exists() and any(p.stat().st_size for p in leftover.rglob("*.pt"))
        pick, _ = find_resumable_checkpoint(ckpt_dir)
        assert pick.step == (step if commits else step - 1), (fault, pick.path)
    harness.assert_resumed(harness.train(tmp_path, overrides, resume="auto"), step=5)
    harness.assert_same_run(tmp_path, reference_run(stage))
    harness.assert_same_final_weights(tmp_path, reference_run(stage))


# ------------------------------------------------------------------------------- damaged checkpoints

def damage(tag_dir, how):
    shard = sorted(p for p in tag_dir.iterdir() if p.name.endswith(".pt"))[-1]
    if how == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    elif how == "delete":
        shard.unlink()
    elif how == "manifest":
        (tag_dir / MANIFEST).write_text("{not json")
    return shard.name


@pytest.fixture(scope="module")
def finished_run(reference_run):
    return reference_run(2)


@pytest.mark.multiproc
@pytest.mark.parametrize("how", ["truncate", "flip", "delete", "manifest"])
def test_damaged_checkpoint_is_detected_and_skipped(finished_run, tmp_path, how):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    newest = run / "checkpoints" / "step_00000010"
    damage(newest, how)
    verify = subprocess.run([str(harness.BIN / "ds-finetune"), "ckpt", "verify", str(newest)],
                            capture_output=True, text=True)
    assert verify.returncode == 1 and "Traceback" not in verify.stderr
    assert "corrupt" in verify.stderr
    pick, skipped = find_resumable_checkpoint(run / "checkpoints")
    assert pick.step == 9 and len(skipped) == 1 and "step_00000010" in skipped[0] and "\n" not in skipped[0]
    listing = json.loads(subprocess.run([str(harness.BIN / "ds-finetune"), "ckpt", "list", str(run), "--json"],
                                        capture_output=True, text=True, check=True).stdout)
    assert [(r["step"], r["status"], r["resume_pick"]) for r in listing] == [(9, "complete", True),
                                                                            (10, "corrupt", False)]


@pytest.mark.multiproc
def test_resume_skips_a_damaged_newest_checkpoint_and_an_empty_latest(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    # the ranks split the hashing: damage a file that rank 1 hashes, so rank 0 learns of it from rank 1
    newest = run / "checkpoints" / "step_00000010"
    rank1_file = newest / share_of_files(json.loads((newest / MANIFEST).read_text())["files"], 1, 2)[0]
    data = bytearray(rank1_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    rank1_file.write_bytes(bytes(data))
    (run / "checkpoints" / LATEST).write_text("")  # DeepSpeed's own resume would now fail; ours ignores it
    proc = harness.train(run, ["train.zero_stage=2", "train.max_steps=11"], resume="auto")
    assert "skipping corrupt checkpoint" in proc.stdout and f"{rank1_file.name}: sha256 differs" in proc.stdout
    harness.assert_resumed(proc, step=9)
    assert not list(run.rglob(".rendezvous-*"))  # the ranks' reports are gone
    rows = harness.metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 12))
    ref = harness.metrics(finished_run)
    assert rows[9]["loss"] == ref[9]["loss"]  # step 10 recomputed from step 9 equals the original step 10


def test_verify_passes_an_intact_checkpoint(tmp_path):
    tag = tmp_path / "step_00000001"
    tag.mkdir()
    torch.save({"w": torch.ones(2)}, tag / "a.pt")  # a file torch's safe unpickler loads
    from ds_finetune.files import hash_and_sync
    (tag / MANIFEST).write_text(json.dumps({"step": 1, "zero_stage": 2, "world_size": 2,
                                            "files": {"a.pt": hash_and_sync(tag / "a.pt")}}))
    ok = subprocess.run([str(harness.BIN / "ds-finetune"), "ckpt", "verify", str(tag)], capture_output=True, text=True)
    assert ok.returncode == 0 and "intact" in ok.stdout
    data = bytearray((tag / "a.pt").read_bytes())
    data[len(data) // 2] ^= 0x01  # damaged, same size: the sha256 says so before anything is unpickled
    (tag / "a.pt").write_bytes(bytes(data))
    bad = subprocess.run([str(harness.BIN / "ds-finetune"), "ckpt", "verify", str(tag)], capture_output=True, text=True)
    assert bad.returncode == 1 and "sha256" in bad.stderr


def test_a_fault_that_never_fires_fails_the_run(monkeypatch):
    from ds_finetune import faults

    monkeypatch.setenv("DS_FINETUNE_FAULT", "after_step:rank1@step99")
    monkeypatch.setattr(faults, "_fired", False)
    faults.fault_point("after_step", 1, 3)  # another step: nothing happens
    assert faults.unfired_fault(1) == "after_step:rank1@step99"
    assert faults.unfired_fault(0) is None  # aimed at rank 1 only
    monkeypatch.setenv("DS_FINETUNE_FAULT", "slow_save:rank1")
    monkeypatch.setenv("DS_FINETUNE_SLOW_SAVE_S", "0")
    faults.fault_point("slow_save", 1, 3)
    assert faults.unfired_fault(1) is None


@pytest.mark.multiproc
def test_a_training_run_whose_fault_never_fired_exits_non_zero(tmp_path):
    proc = harness.run(harness.train_argv(tmp_path, ["train.max_steps=2"], nproc=1),
                       {"DS_FINETUNE_FAULT": "after_step@step99"})
    assert proc.returncode == 4
    assert "error: DS_FINETUNE_FAULT=after_step@step99 never fired" in proc.stderr


# ------------------------------------------------------------------------------ when saves happen

ONE_RANK = ["train.zero_stage=2", "train.grad_accum=4"]


def test_every_minutes_saves_on_rank0s_clock(tmp_path):
    proc = harness.train(tmp_path, [*ONE_RANK, "train.max_steps=4", "checkpoint.every_steps=0",
                                    "checkpoint.every_minutes=0.00001", "checkpoint.keep_last=0"], nproc=1)
    assert harness.committed_steps(tmp_path / "checkpoints") == [1, 2, 3, 4]
    assert proc.stdout.count("(every_minutes)") == 4
