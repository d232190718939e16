"""Resume across stages and world sizes: a checkpoint saved under ZeRO stage A on W
ranks resumes under stage B and/or on W' ranks, converted automatically, with the same data order, the
same LR schedule and losses equal to float-reduction noise. One killed save run per stage is shared by
every resume from it."""
import shutil

import pytest

import harness
from ds_finetune.checkpoint import find_resumable_checkpoint
from ds_finetune.reshard import consolidate

pytestmark = pytest.mark.multiproc
STAGES = [0, 1, 2, 3]


def assert_continues(got_dir, ref_dir, from_step: int):
    harness.assert_close_run(got_dir, ref_dir)
    assert len(harness.metrics(ref_dir)) > from_step


@pytest.mark.parametrize("saved", STAGES)
def test_resume_under_every_other_zero_stage(saved_at_step4, reference_run, tmp_path, saved):
    for target in [s for s in STAGES if s != saved]:
        run = tmp_path / f"to{target}"
        shutil.copytree(saved_at_step4(saved), run)
        proc = harness.train(run, [f"train.zero_stage={target}"], resume="auto")
        assert "converting" in proc.stdout and f"for ZeRO {target} on 2 ranks" in proc.stdout, proc.stdout[-2000:]
        assert_continues(run, reference_run(saved), from_step=4)


def test_converted_state_equals_the_saved_state(saved_at_step4, tmp_path):
    """Weights and both Adam moments of a stage-3 save, consolidated, equal those of the same step saved
    at stage 0 (the unpartitioned ground truth): the partition merging is right for every tensor."""
    states = {}
    for stage in (0, 3):
        info, _ = find_resumable_checkpoint(saved_at_step4(stage) / "checkpoints")
        assert info.step == 4
        states[stage], meta = consolidate(info)
        assert meta["optimizer_step"] == 4 and meta["global_steps"] == 4
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert states[0][key].keys() == states[3][key].keys()
        for name, t in states[0][key].items():
            # two runs at different stages agree to float noise; a partition-merge mistake would put
            # values of other elements here, off by the order of the values themselves
            diff = (states[3][key][name] - t).abs().max().item()
            assert diff <= 1e-4 * t.abs().max().item() + 1e-12, (key, name, diff)
        assert all(t.abs().sum() > 0 for t in states[0][key].values())


def test_converted_state_loads_exactly_into_every_stage(saved_at_step4, reference_run, tmp_path):
    """The Adam moments and weights read back from an engine of each stage equal the converted ones."""
    from ds_finetune.reshard import write_resharded
    info, _ = find_resumable_checkpoint(saved_at_step4(3) / "checkpoints")
    target = write_resharded(info)
    out = tmp_path / "roundtrip.json"
    proc = harness.run([str(harness.BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={harness.free_port()}",
                        str(harness.ROOT / "tests" / "scripts" / "roundtrip_resharded.py"), str(target), str(out),
                        "0", "1", "2", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = {int(k): v for k, v in __import__("json").loads(out.read_text()).items()}
    for stage in STAGES:
        assert result[stage]["max_abs_diff"] == 0.0, (stage, result[stage])
        assert result[stage]["global_steps"] == 4
    # the schedule's position came back: every engine's lr is the one the uninterrupted run used at step 5
    assert {r["lr"] for r in result.values()} == {harness.metrics(reference_run(3))[4]["lr"]}


def test_resume_on_one_rank_keeps_global_batch_and_order(reference_run, tmp_path):
    no_dropout = ["model.config.attention_dropout=0.0"]
    saved = tmp_path / "saved"
    proc = harness.train(saved, ["train.zero_stage=2", *no_dropout], fault="after_step@step6", expect_ok=False)
    assert proc.returncode == -9
    resumed = harness.train(saved, ["train.zero_stage=3", *no_dropout], nproc=1, resume="auto")
    assert "grad_accum=4" in resumed.stdout  # 2 micro × 2 accum × 2 ranks = 2 × 4 × 1
    assert_continues(saved, reference_run(2, extra=no_dropout), from_step=5)


def test_resume_on_two_ranks_from_one(reference_run, tmp_path):
    no_dropout = ["model.config.attention_dropout=0.0"]
    saved = tmp_path / "saved"
    proc = harness.train(saved, ["train.zero_stage=1", "train.grad_accum=4", *no_dropout], nproc=1,
                         fault="after_step@step6", expect_ok=False)
    assert proc.returncode == -9
    resumed = harness.train(saved, ["train.zero_stage=1", "train.grad_accum=4", *no_dropout], resume="auto")
    assert "grad_accum=2" in resumed.stdout
    assert_continues(saved, reference_run(2, extra=no_dropout), from_step=5)


def test_a_global_batch_the_new_world_cannot_split_is_a_clear_error(saved_at_step4, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_at_step4(2), run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = harness.train(run, ["train.zero_stage=2", "train.micro_batch_size=3"], nproc=1, resume="auto",
                         expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "global batch 8" in error[0] and "micro_batch_size in [1, 2, 4, 8]" in error[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
