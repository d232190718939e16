"""Kill and resume, bitwise, with the options that change what a step computes or saves: isolated
packing with gradient checkpointing, one row per assistant turn (data.chat_turns: last) with Lion and a
transformers schedule warmed up by ratio, and background saves at ZeRO 1 and 2 (the ZeRO-3 background chain
is in test_checkpoint_faults.py; bf16 in test_bf16.py).
Each combination: an uninterrupted run, a run SIGKILLed in the middle of step 5's accumulation, its resume."""
import pytest

import harness

pytestmark = pytest.mark.multiproc

COMBINATIONS = {
    "isolated-packing-gradient-checkpointing-async-zero2": [
        "train.zero_stage=2", "data.path=data/tiny/text.jsonl", "data.format=text", "data.packing=isolated",
        "data.max_length=128", "train.gradient_checkpointing=true", "checkpoint.async_save=true"],
    "chat-turns-last-async-zero1-lion-cosine_with_min_lr": [
        "train.zero_stage=1", "data.chat_turns=last", "checkpoint.async_save=true", "train.optimizer=lion",
        "train.lr=3.0e-4", "train.lr_schedule=cosine_with_min_lr", "train.warmup_steps=0", "train.warmup_ratio=0.25",
        "train.min_lr_ratio=0", "train.lr_scheduler_kwargs.min_lr_rate=0.1"],
}


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_kill_and_resume_is_bitwise_with(tmp_path, name):
    overrides = COMBINATIONS[name]
    ref, run = tmp_path / "ref", tmp_path / "run"
    harness.train(ref, overrides)
    killed = harness.train(run, overrides, fault="mid_accum:rank1@step5", expect_ok=False)
    assert killed.returncode == -9, killed.stdout[-2000:]
    saved = harness.committed_steps(run / "checkpoints")  # async saves: the newest commit may lag a step
    harness.assert_resumed(harness.train(run, overrides, resume="auto"), step=saved[-1] if saved else None)
    harness.assert_same_run(run, ref)
    harness.assert_same_final_weights(run, ref)
    if "train.warmup_ratio=0.25" in overrides:  # ceil(0.25 x 10) = 3 warmup steps from 0, as the HF Trainer
        assert [r["lr"] for r in harness.metrics(ref)][:4] == pytest.approx([0.0, 1.0e-4, 2.0e-4, 3.0e-4], rel=1e-12)
