"""Exact resume: a run killed at any instant resumes with --resume and computes the same steps, bitwise.

Every killed run is compared with the uninterrupted reference run of the same config (shared through the
`reference_run` fixture): per-step losses as written in metrics.jsonl (the JSON float repr) and sample_ids.
harness.BASE has dropout 0.1 (so the RNG restore is exercised) and grad_accum 2.
"""
import os
import random
import shutil
import signal
import time

import pytest

import harness

pytestmark = pytest.mark.multiproc


# ZeRO 0 and 1 are killed and resumed bitwise by the save-phase chain
# (test_shard_and_commit_faults_at_zero_0_and_1) and the zero1 resume combination; mid-accumulation is
# stage-independent (the same restart of the step), so one partitioned and one sharded-parameter stage here.
@pytest.mark.parametrize("stage", [2, 3])
def test_sigkill_mid_accumulation_resumes_bitwise(reference_run, tmp_path, stage):
    overrides = [f"train.zero_stage={stage}"]
    killed = harness.train(tmp_path, overrides, fault="mid_accum:rank1@step7", expect_ok=False)
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.stdout[-2000:]
    assert harness.committed_steps(tmp_path / "checkpoints")[-1] == 6
    harness.assert_resumed(harness.train(tmp_path, overrides, resume="auto"), step=6)
    harness.assert_same_run(tmp_path, reference_run(stage))
    harness.assert_same_final_weights(tmp_path, reference_run(stage))


def test_sigkill_at_one_rank_world_resumes_bitwise(reference_run, tmp_path):
    overrides = ["train.zero_stage=2", "train.grad_accum=4"]
    ref = reference_run(2, nproc=1, extra=["train.grad_accum=4"])
    killed = harness.train(tmp_path, overrides, nproc=1, fault="after_step@step5", expect_ok=False)
    assert killed.returncode == -signal.SIGKILL
    assert harness.committed_steps(tmp_path / "checkpoints")[-1] == 4
    harness.assert_resumed(harness.train(tmp_path, overrides, nproc=1, resume="auto"), step=4)
    harness.assert_same_run(tmp_path, ref)


LONG = ["train.max_steps=30", "train.zero_stage=2"]


def test_sigkill_at_a_random_instant_resumes_bitwise(reference_run, tmp_path):
    """The launcher and every rank are SIGKILLed from outside at a random moment (possibly mid-save); no
    rank survives to race the resume. An instant before the first commit would leave nothing to resume
    (a fresh start passes the comparison): it is drawn again, and said. KILL_SEED=N replays a failing instant."""
    ref = reference_run(2, extra=["train.max_steps=30"])
    seed = int(os.environ.get("KILL_SEED", time.time_ns() % 10_000))
    draw = random.Random(seed)
    for _ in range(5):
        delay = draw.uniform(0.0, 0.4)
        proc = harness.start(harness.train_argv(tmp_path, LONG), log=tmp_path.parent / f"{tmp_path.name}.log")
        assert harness.wait_for(lambda: len(harness.metrics(tmp_path)) >= 4), f"KILL_SEED={seed}"
        time.sleep(delay)
        harness.kill_job(proc)  # asserts that no process of the job is alive
        if harness.committed_steps(tmp_path / "checkpoints"):
            break
        print(f"KILL_SEED={seed}: the kill {delay:.3f} s after step 4 came before the first commit; drawing again")
        shutil.rmtree(tmp_path)
    else:
        raise AssertionError(f"KILL_SEED={seed}: 5 kills, none after the first commit")
    steps_done = len(harness.read_jsonl(tmp_path / "metrics.jsonl", strict=False))
    assert steps_done < 30, f"the run finished before the kill (KILL_SEED={seed}); nothing was tested"
    step = harness.assert_resumed(harness.train(tmp_path, LONG, resume="auto"))
    assert step <= min(steps_done, len(harness.metrics(ref))), (f"KILL_SEED={seed}", step, steps_done)
    try:
        harness.assert_same_run(tmp_path, ref)
        harness.assert_same_final_weights(tmp_path, ref)
    except AssertionError as e:
        raise AssertionError(f"KILL_SEED={seed} (delay {delay:.3f} s): {e}") from e


def start_sigterm_during_a_slow_stop_save(folder):
    """`ds-finetune train` (the real `deepspeed` launcher path) with a stop-save of 35 s, sent SIGTERM once
    3 steps are logged. It mostly sleeps: started with the session."""
    argv = [str(harness.BIN / "ds-finetune"), "train", str(harness.TINY), "--num-gpus", "2",
            "--master-port", str(harness.free_port()), *harness.BASE, *NO_PERIODIC, f"output_dir={folder / 'run'}"]

    def sigterm_after_three_steps(job):
        assert harness.wait_for(lambda: len(harness.metrics(job.folder / "run")) >= 3, timeout=300)
        job.proc.send_signal(signal.SIGTERM)

    return harness.EarlyJob(argv, {"DS_FINETUNE_FAULT": "slow_save", "DS_FINETUNE_SLOW_SAVE_S": "35"}, folder,
                            drive=sigterm_after_three_steps)


NO_PERIODIC = [*LONG, "checkpoint.every_steps=0"]


@harness.started_early(start_sigterm_during_a_slow_stop_save)
def test_sigterm_saves_at_a_step_boundary_and_resumes_bitwise(reference_run, request):
    """A scheduler's SIGTERM to `ds-finetune train`, with a stop-save that takes longer than the 30 s
    DeepSpeed's launch.py allows ranks after a signal it forwarded: the CLI signals the ranks, not
    launch.py, so the save completes and commits."""
    ref = reference_run(2, extra=["train.max_steps=30"])
    job = harness.early_job(request)
    proc = job.result(timeout=400)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout[-3000:]
    output, run = proc.stdout, job.folder / "run"
    steps = harness.committed_steps(run / "checkpoints")
    assert len(steps) == 1, output[-3000:]
    stop_step = steps[0]
    assert f"stopped by signal at step {stop_step}" in output and f"step_{stop_step:08d}" in output
    assert f"[fault injection] sleeping 35 s at slow_save rank 0 step {stop_step}\n" in output  # the slow save ran
    assert harness.metrics(run)[-1]["step"] == stop_step < 30
    harness.assert_resumed(harness.train(run, NO_PERIODIC, resume="auto"), step=stop_step)
    harness.assert_same_run(run, ref)
