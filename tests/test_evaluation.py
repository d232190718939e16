"""Evaluation during training: the held-out loss at a cadence on every rank, safe under ZeRO-3 with an eval
set the world size does not divide, without changing a bit of training, exact across a resume; the best
checkpoint by eval loss survives retention."""
import json
import math
import signal

import numpy as np
import pytest

import harness
from ds_finetune.checkpoint.layout import MANIFEST, apply_retention, best_checkpoint, tag_for_step
from ds_finetune.evaluate import held_out_rows


def eval_file(tmp_path, rows=13):
    lines = (harness.ROOT / "data" / "tiny" / "chat.jsonl").read_text().splitlines()[-rows:]
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def eval_overrides(path):
    return [f"eval.path={path}", "eval.every_steps=3", "eval.micro_batch_size=2", "checkpoint.keep_best=true"]


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [2, 3])
def test_eval_changes_no_training_bit_and_runs_on_a_set_the_ranks_do_not_divide(reference_run, tmp_path, stage):
    run = tmp_path / "run"
    harness.train(run, [f"train.zero_stage={stage}", *eval_overrides(eval_file(tmp_path))])
    harness.assert_same_run(run, reference_run(stage))
    rows = harness.metrics(run)
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(evals) == [3, 6, 9, 10]  # the cadence and one at the end
    assert all(math.isfinite(v) and v > 0 for v in evals.values())
    assert all(r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"])) for r in rows if "eval_loss" in r)
    assert evals[10] < evals[3]  # it measures the model: training lowers it


@pytest.mark.multiproc
def test_eval_losses_after_a_kill_and_resume_equal_the_uninterrupted_runs(tmp_path):
    overrides = ["train.zero_stage=3", *eval_overrides(eval_file(tmp_path)), "eval.every_steps=2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    harness.train(ref, overrides)
    killed = harness.train(run, overrides, fault="mid_accum:rank1@step7", expect_ok=False)
    assert killed.returncode == -signal.SIGKILL
    harness.train(run, overrides, resume="auto")
    harness.assert_same_run(run, ref)
    got = [(r["step"], repr(r.get("eval_loss"))) for r in harness.metrics(run)]
    assert got == [(r["step"], repr(r.get("eval_loss"))) for r in harness.metrics(ref)]
    listing = json.loads(harness.run([str(harness.BIN / "ds-finetune"), "ckpt", "list", str(run), "--json"]).stdout)
    assert [r["step"] for r in listing if r["best_eval"]] == [best_step(run)]


def best_step(run):
    evals = [(r["eval_loss"], r["step"]) for r in harness.metrics(run) if "eval_loss" in r]
    return min(evals)[1]


def fake_checkpoint(ckpt_dir, step, eval_loss=None):
    tag = ckpt_dir / tag_for_step(step)
    tag.mkdir(parents=True)
    state = {"step": step, "eval_loss": eval_loss, "eval_step": step if eval_loss is not None else 0}
    (tag / MANIFEST).write_text(json.dumps({"step": step, "files": {}, "trainer_state": state}))


def test_keep_best_survives_keep_last(tmp_path):
    for step, loss in [(1, 3.0), (2, 1.5), (3, 2.0), (4, None), (5, 2.5)]:
        fake_checkpoint(tmp_path, step, loss)
    assert best_checkpoint(tmp_path).name == tag_for_step(2)
    apply_retention(tmp_path, keep_last=1, newest_committed=5, keep_best=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for_step(2), tag_for_step(5)]
    apply_retention(tmp_path, keep_last=1, newest_committed=5, keep_best=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for_step(5)]


def test_held_out_rows_are_a_seeded_split_never_trained_on():
    train, held = held_out_rows(400, 0.1, seed=1234)
    assert len(held) == 40 and len(train) == 360 and not set(train) & set(held)
    again_train, again_held = held_out_rows(400, 0.1, seed=1234)
    assert list(held) == list(again_held) and list(held) != list(held_out_rows(400, 0.1, seed=7)[1])


def test_held_out_groups_are_whole_conversations():
    groups = np.repeat(np.arange(50), [1 + i % 3 for i in range(50)])  # a conversation's turns are neighbours
    train, held = held_out_rows(len(groups), 0.2, seed=1234, groups=groups)
    assert sorted([*train, *held]) == list(range(len(groups)))
    assert not set(groups[train]) & set(groups[held])
    assert len(set(groups[held])) == 10
