"""The metrics writer in process: metrics.jsonl holds each record once, and TensorBoard gets every scalar
once under the tag the HF Trainer gives it (train/x, eval/x for eval_x: a mixture's per-source losses, DPO's
rewards, the eval loss), the same names W&B gets."""
import json

from ds_finetune.metrics import MetricsWriter, dashboard_scalars


def test_every_scalar_reaches_tensorboard_once_under_its_tag(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    writer = MetricsWriter(tmp_path, 0, 2, tensorboard=True, progress_bar=False)
    for step in (1, 2):
        writer.log({"step": step, "loss": 2.0 / step, "learning_rate": 1e-3, "lr": 1e-3, "grad_norm": 0.5,
                    "num_tokens": 100 * step, "tokens": 100 * step, "time": 1.0, "loss/web": 2.5, "tokens/web": 100,
                    "rewards/chosen": 0.1, "eval_loss": 3.0, "eval_rewards/chosen": 0.2}, step_tokens=100)
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    tags = {"train/loss", "train/learning_rate", "train/grad_norm", "train/num_tokens", "train/loss/web",
            "train/tokens/web", "train/rewards/chosen", "eval/loss", "eval/rewards/chosen"}
    assert set(events.Tags()["scalars"]) == tags
    for tag in tags:
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    assert [e.value for e in events.Scalars("train/loss/web")] == [2.5, 2.5]


def test_a_line_written_before_the_rename_shows_under_the_new_names():
    """W&B replays metrics.jsonl after a resume: lines of a run begun before the rename have only lr/tokens."""
    old = {"step": 3, "loss": 1.5, "lr": 2e-4, "epoch": 0, "consumed_samples": 24, "tokens": 900, "time": 5.0,
           "sample_ids": [1, 2]}
    assert dashboard_scalars(old) == {"train/loss": 1.5, "train/learning_rate": 2e-4, "train/epoch": 0,
                                      "train/consumed_samples": 24, "train/num_tokens": 900}
