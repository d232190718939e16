"""The options a one-process CPU run can cover cheaply: packing, gradient checkpointing, text and
prompt_completion data, epochs, bf16."""
import pytest

import harness

pytestmark = pytest.mark.multiproc


def test_packing_gradient_checkpointing_and_epochs(tmp_path):
    """Packed text rows: each step's sample_ids hold several rows, every row is seen at most once per
    epoch, the run stops after 2 epochs, and gradient checkpointing does not change the loss (compared over
    the first steps: its own run stops early)."""
    common = ["data.path=data/tiny/text.jsonl", "data.format=text", "data.packing=true", "data.max_length=128",
              "train.max_steps=null", "train.epochs=2", "train.grad_accum=1", "train.micro_batch_size=4",
              "model.config.attention_dropout=0.0", "checkpoint.every_steps=0",
              "train.lr_schedule=constant"]  # the same learning rates in a run that stops early
    plain = harness.train(tmp_path / "plain", common, nproc=1)
    ckpt = harness.train(tmp_path / "ckpt", [*common, "train.gradient_checkpointing=true", "train.max_steps=4"],
                         nproc=1)
    assert plain.returncode == ckpt.returncode == 0
    rows = harness.metrics(tmp_path / "plain")
    epochs = {r["epoch"] for r in rows}
    assert epochs == {0, 1}
    for epoch in epochs:
        ids = [i for r in rows if r["epoch"] == epoch for i in r["sample_ids"]]
        assert len(ids) == len(set(ids)) and len(ids) > 4 * sum(r["epoch"] == epoch for r in rows)
    other = harness.metrics(tmp_path / "ckpt")
    assert [r["sample_ids"] for r in other] == [r["sample_ids"] for r in rows[:4]]
    for a, b in zip(rows, other):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_prompt_completion_in_bf16(tmp_path):
    harness.train(tmp_path, ["data.path=data/tiny/prompt_completion.jsonl", "data.format=prompt_completion",
                             "model.dtype=bf16", "train.max_steps=6", "checkpoint.every_steps=3"], nproc=1)
    rows = harness.metrics(tmp_path)
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    assert harness.committed_steps(tmp_path / "checkpoints") == [3, 6]
