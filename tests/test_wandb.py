"""Weights & Biases: one W&B run across a kill and a resume, each step logged once, the same values as
metrics.jsonl (offline mode: no network; the run files are read back with W&B's own record format)."""
import signal
import struct

import pytest

import harness

pytestmark = pytest.mark.multiproc


def wandb_records(path):
    """The records of a W&B run file (`run-ID.wandb`): a 7-byte header, then LevelDB-log records in 32 KiB
    blocks (crc32, length, type: full / first / middle / last), each a serialized `Record` proto."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        else:
            pending += chunk


def test_one_wandb_run_across_a_kill_and_resume_with_each_step_once(tmp_path):
    pytest.importorskip("wandb")
    overrides = ["train.zero_stage=2", "train.grad_accum=4", "logging.wandb.project=ds-finetune-test",
                 "logging.wandb.mode=offline"]
    killed = harness.train(tmp_path, overrides, nproc=1, fault="mid_accum@step7", expect_ok=False)
    assert killed.returncode == -signal.SIGKILL
    harness.assert_resumed(harness.train(tmp_path, overrides, nproc=1, resume="auto"), step=6)
    ids, steps, losses = set(), [], {}
    for run_file in sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                steps.append(record.history.step.num)
                items = {i.key or ".".join(i.nested_key): i.value_json for i in record.history.item}
                losses[record.history.step.num] = (items.get("train/loss"), items.get("train/learning_rate"),
                                                   items.get("train/grad_norm"))
    assert len(ids) == 1
    assert sorted(steps) == list(range(1, 11)), steps  # each step once, none lost
    for row in harness.metrics(tmp_path):
        loss, lr, grad_norm = losses[row["step"]]  # the HF Trainer's W&B names
        assert (float(loss), float(lr), float(grad_norm)) == (row["loss"], row["learning_rate"], row["grad_norm"])
