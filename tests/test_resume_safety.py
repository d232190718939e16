"""What --resume must never do: restart a damaged run from step 0, mix two branches of a run, clobber a
run's checkpoints without --overwrite, continue a run whose exact settings changed, or ignore a change it was
allowed to make; and the stop paths a user reaches with Ctrl-C.

One-rank runs (cheap launches) on copies of the shared one-rank reference run (checkpoints 9 and 10).
"""
import signal
import time

import pytest

import harness
from ds_finetune.checkpoint.verify import find_resumable_checkpoint
from ds_finetune.sampler import epoch_permutation

pytestmark = pytest.mark.multiproc

ONE_RANK = ["train.zero_stage=2", "train.grad_accum=4"]


@pytest.fixture(scope="module")
def finished(reference_run):
    return reference_run(2, nproc=1, extra=["train.grad_accum=4"])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_refuses_when_no_checkpoint_verifies_and_changes_nothing(finished, tmp_path):
    run = harness.copy_run(finished, tmp_path / "run")
    for step in (9, 10):
        tag = run / "checkpoints" / f"step_{step:08d}"
        flip_a_byte(max((p for p in tag.rglob("*.pt")), key=lambda p: p.stat().st_size))
    before, metrics_before = harness.snapshot(run), (run / "metrics.jsonl").read_bytes()
    proc = harness.train(run, ONE_RANK, nproc=1, resume="auto", expect_ok=False)
    line = harness.assert_one_line_error(proc, "no checkpoint", "step_00000009", "step_00000010", "sha256",
                                         "--overwrite")
    assert "starting fresh" not in proc.stdout + line
    assert harness.snapshot(run) == before and (run / "metrics.jsonl").read_bytes() == metrics_before


def test_resume_from_an_older_checkpoint_needs_discard_newer_and_the_branch_survives_a_kill(finished, tmp_path):
    """Branch at step 13 of a run that reached 14: refused without --discard-newer; with it, step 14 and
    its metrics line move aside, and after a kill inside the new branch --resume continues the branch,
    never the abandoned step 14. TensorBoard reads as one run (purge_step)."""
    run = harness.copy_run(finished, tmp_path / "run")
    longer = [*ONE_RANK, "train.max_steps=14", "logging.tensorboard=true"]
    harness.train(run, longer, nproc=1, resume="auto")
    first = harness.metrics(run)
    assert harness.committed_steps(run / "checkpoints") == [13, 14]

    branch_point = str(run / "checkpoints" / "step_00000013")
    before = harness.snapshot(run)
    proc = harness.train(run, longer, nproc=1, resume=branch_point, expect_ok=False)
    harness.assert_one_line_error(proc, "step_00000013", "step_00000014", "--discard-newer")
    assert harness.snapshot(run) == before

    killed = harness.train(run, longer, nproc=1, resume=branch_point, flags=["--discard-newer"],
                           fault="after_step@step14", expect_ok=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert harness.committed_steps(run / "checkpoints") == [13]
    aside = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("discarded-")]
    assert len(aside) == 1 and (aside[0] / "step_00000014" / "manifest.json").exists()
    assert [r["step"] for r in harness.read_jsonl(aside[0] / "metrics.jsonl")] == [14]

    harness.assert_resumed(harness.train(run, longer, nproc=1, resume="auto"), step=13)
    final = harness.metrics(run)
    assert [r["step"] for r in final] == list(range(1, 15))
    assert harness.loss_reprs(final) == harness.loss_reprs(first)  # the same computation, done once more

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [11, 12, 13, 14]


def test_allow_config_change_continues_with_the_changed_setting(finished, tmp_path):
    run = harness.copy_run(finished, tmp_path / "run")
    proc = harness.train(run, [*ONE_RANK, "train.seed=7", "train.max_steps=12"], nproc=1, resume="auto",
                         flags=["--allow-config-change"])
    assert "continuing with changed train.seed" in proc.stdout
    rows = harness.metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert harness.loss_reprs(rows[:10]) == harness.loss_reprs(harness.metrics(finished))
    order = epoch_permutation(400, 7, 0)  # the tiny chat set keeps all 400 rows
    assert rows[10]["sample_ids"] == [int(i) for i in order[80:88]]


def test_ctrl_c_saves_at_a_step_boundary_and_a_second_ctrl_c_exits_at_once(reference_run, tmp_path):
    ref = reference_run(2, nproc=1, extra=["train.grad_accum=4", "train.max_steps=16"])
    overrides = [*ONE_RANK, "train.max_steps=16", "checkpoint.every_steps=0"]

    proc = harness.start(harness.train_argv(tmp_path, overrides, nproc=1), log=tmp_path.parent / "sigint1.log")
    assert harness.wait_for(lambda: len(harness.metrics(tmp_path)) >= 3, alive=lambda: proc.poll() is None)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    stopped_at = harness.metrics(tmp_path)[-1]["step"]
    assert harness.committed_steps(tmp_path / "checkpoints") == [stopped_at] and stopped_at < 16
    assert "stopped by signal" in (tmp_path.parent / "sigint1.log").read_text()

    proc = harness.start(harness.train_argv(tmp_path, overrides, nproc=1, resume="auto"),
                         log=tmp_path.parent / "sigint2.log")
    assert harness.wait_for(lambda: len(harness.metrics(tmp_path)) >= stopped_at + 2,
                            alive=lambda: proc.poll() is None)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    harness.assert_resumed((tmp_path.parent / "sigint2.log").read_text(), step=stopped_at)
    saved = harness.committed_steps(tmp_path / "checkpoints")[-1]
    assert saved >= stopped_at

    harness.assert_resumed(harness.train(tmp_path, overrides, nproc=1, resume="auto"), step=saved)
    harness.assert_same_run(tmp_path, ref)


def test_zero3_from_a_pretrained_folder_trains_like_the_inline_model(reference_run, tmp_path):
    """model.name_or_path at ZeRO-3 loads the weights inside deepspeed.zero.Init (no rank holds the full
    model): the same weights as the inline tiny model give the same losses."""
    from ds_finetune.config import load_config

    harness.save_tiny_model(tmp_path / "pretrained", seed=load_config(harness.TINY).train.seed)
    run = tmp_path / "run"
    harness.train(run, ["train.zero_stage=3", "model.config=null", f"model.name_or_path={tmp_path / 'pretrained'}"])
    harness.assert_close_run(run, reference_run(3))


def test_cpu_offload_resumes_bitwise(tmp_path):
    overrides = [*ONE_RANK, "train.offload_optimizer=cpu", "train.max_steps=6"]
    ref = tmp_path / "ref"
    harness.train(ref, overrides, nproc=1)
    killed = harness.train(tmp_path / "run", overrides, nproc=1, fault="mid_accum@step5", expect_ok=False)
    assert killed.returncode == -signal.SIGKILL
    harness.assert_resumed(harness.train(tmp_path / "run", overrides, nproc=1, resume="auto"), step=4)
    harness.assert_same_run(tmp_path / "run", ref)
    harness.assert_same_final_weights(tmp_path / "run", ref)



def test_a_resume_at_an_epoch_boundary_continues_into_the_next_epochs_order(tmp_path):
    """Checkpoint at the last step of epoch 0 (offset 384 of 400 rows: a partial batch is dropped), resume
    from it: epoch 1 takes the next permutation from its start, bitwise as the uninterrupted run (two steps
    into epoch 1: train.max_steps ends the run before train.epochs would). The run resumed is a copy of the
    uninterrupted one branched at step 12 (--discard-newer); kills mid-step are the other tests'."""
    overrides = ["train.zero_stage=2", "train.micro_batch_size=8", "train.grad_accum=4", "train.max_steps=14",
                 "train.epochs=2", "checkpoint.every_steps=12"]
    ref = tmp_path / "ref"
    harness.train(ref, overrides, nproc=1)
    rows = harness.metrics(ref)
    assert [r["epoch"] for r in rows] == [0] * 12 + [1] * 2
    order = epoch_permutation(400, 1234, 1)
    assert rows[12]["sample_ids"] == [int(i) for i in order[:32]]

    run = harness.copy_run(ref, tmp_path / "run")
    assert harness.committed_steps(run / "checkpoints") == [12, 14]
    branch = str(run / "checkpoints" / "step_00000012")
    harness.assert_resumed(harness.train(run, overrides, nproc=1, resume=branch, flags=["--discard-newer"]), step=12)
    harness.assert_same_run(run, ref)
    harness.assert_same_final_weights(run, ref)


# ------------------------------------------------------------------------------ errors of --resume

def test_fresh_start_refuses_to_clobber_checkpoints(finished, tmp_path):
    run = harness.copy_run(finished, tmp_path / "run")
    before = harness.snapshot(run / "checkpoints")
    proc = harness.train(run, ONE_RANK, nproc=1, expect_ok=False)
    harness.assert_one_line_error(proc, "already holds checkpoints", "--resume", "--overwrite")
    assert harness.snapshot(run / "checkpoints") == before


def test_resume_from_missing_path_is_a_clear_error(finished, tmp_path):
    run = harness.copy_run(finished, tmp_path / "run")
    proc = harness.train(run, ONE_RANK, nproc=1, resume=str(run / "checkpoints" / "step_00000077"), expect_ok=False)
    harness.assert_one_line_error(proc, "step_00000077", "no such checkpoint")


def test_resume_with_a_change_that_breaks_exactness_is_refused(finished, tmp_path):
    run = harness.copy_run(finished, tmp_path / "run")
    before = harness.snapshot(run / "checkpoints")
    proc = harness.train(run, [*ONE_RANK, "train.seed=7", "data.max_length=64"], nproc=1, resume="auto",
                         expect_ok=False)
    harness.assert_one_line_error(proc, "train.seed", "data.max_length", "--allow-config-change")
    assert harness.snapshot(run / "checkpoints") == before


def test_resume_with_harmless_changes_continues(finished, tmp_path):
    run = harness.copy_run(finished, tmp_path / "run")
    info, _ = find_resumable_checkpoint(run / "checkpoints")
    assert info.step == 10
    harness.train(run, [*ONE_RANK, "train.max_steps=12", "checkpoint.every_steps=5", "logging.sample_ids=false"],
                  nproc=1, resume="auto")
    rows = harness.metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert "sample_ids" not in rows[-1] and "sample_ids" in rows[0]


def test_overwrite_starts_over(finished, tmp_path):
    run = harness.copy_run(finished, tmp_path / "run")
    harness.train(run, [*ONE_RANK, "train.max_steps=3"], nproc=1, flags=["--overwrite"])
    assert harness.committed_steps(run / "checkpoints") == [2, 3]
    assert [r["step"] for r in harness.metrics(run)] == [1, 2, 3]
