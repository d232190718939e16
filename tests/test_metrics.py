"""The metrics writer in process: metrics.jsonl holds each record once, and TensorBoard gets every scalar
once under its train/ or eval/ tag (a mixture's per-source losses, DPO's rewards, the eval loss)."""
import json

from ds_finetune.metrics import MetricsWriter


def test_every_scalar_reaches_tensorboard_once_under_its_tag(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    writer = MetricsWriter(tmp_path, 0, 2, tensorboard=True, progress_bar=False)
    for step in (1, 2):
        writer.log({"step": step, "loss": 2.0 / step, "lr": 1e-3, "loss/web": 2.5, "tokens/web": 100,
                    "rewards/chosen": 0.1, "eval_loss": 3.0, "eval_rewards/chosen": 0.2}, step_tokens=100)
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    tags = {"train/loss", "train/lr", "train/loss/web", "train/tokens/web", "train/rewards/chosen", "eval/loss",
            "eval/rewards/chosen"}
    assert set(events.Tags()["scalars"]) == tags
    for tag in tags:
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    assert [e.value for e in events.Scalars("train/loss/web")] == [2.5, 2.5]
