"""metrics.jsonl, TensorBoard scalars, Weights & Biases and the progress bar. Rank 0 only; other ranks
get a writer that does nothing, so the loop never asks which rank it is on to log.

After a resume from step S, lines with step > S written by the interrupted attempt are removed first
(new file + rename), so metrics.jsonl reads as one clean run. W&B keeps one run across resumes (its id is
in every checkpoint; see WandbRun for how its history stays one run with each step once).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ds_finetune.errors import UserError
from ds_finetune.files import replace_file


# metrics.jsonl's names before the HF Trainer's and TRL's, still written beside them for one release; a line
# written before the change has only these (W&B's replay of it reads them as the new names).
RENAMED = {"lr": "learning_rate", "tokens": "num_tokens"}
NOT_SCALARS = {"step", "time", "sample_ids", *RENAMED}


def dashboard_scalars(record: dict) -> dict:
    """A metrics.jsonl line as the HF Trainer's TensorBoard and W&B callbacks show a log (`rewrite_logs`):
    eval_x as eval/x, every other number as train/x; the old names as their new ones."""
    record = {**{new: record[old] for old, new in RENAMED.items() if old in record and new not in record}, **record}
    out = {}
    for key, value in record.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = value
    return out


def metrics_lines(path: Path) -> list[tuple[int, str]]:
    """(step, line) of each line of metrics.jsonl, up to a torn one: a kill mid-line leaves a last line that
    does not parse, and it (with anything after it) belongs to the interrupted attempt. The one reader of
    the file's lines for truncating and discarding."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append((int(json.loads(line)["step"]), line))
        except (ValueError, KeyError, TypeError):
            break
    return out


def truncate_metrics(path: Path, keep_through_step: int) -> None:
    """Keep only lines with step <= keep_through_step (all lines removed for a fresh start). Atomic."""
    if not path.exists():
        return
    kept = [line for step, line in metrics_lines(path) if step <= keep_through_step]
    replace_file(path, lambda f: f.write("".join(x + "\n" for x in kept).encode("utf-8")), durable=False)


class WandbRun:
    """The W&B side of the metrics: one W&B run id for the whole training run, kept in the checkpoints.

    W&B may lose what a killed attempt sent last (its writer is killed with the job), so a resumed attempt
    replays metrics.jsonl's lines (flushed per step; steps up to the checkpoint) beyond what W&B holds:
    online, W&B says where the run's history ends (`run.step`); offline, each attempt writes its own run
    folder, so the earlier attempts' folders of this run are renamed `superseded-*` and the new one
    replays every line: `wandb sync` then uploads one complete history."""

    def __init__(self, wandb_cfg, run_id: str, run_config: dict, output_dir: Path, metrics_path: Path):
        import wandb
        if wandb_cfg.mode == "offline":
            for old in (output_dir / "wandb").glob(f"offline-run-*-{run_id}"):
                os.replace(old, old.with_name(f"superseded-{old.name}"))
        self.run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name,
                              tags=wandb_cfg.tags, mode=wandb_cfg.mode, id=run_id, resume="allow",
                              config=run_config, dir=str(output_dir))
        held = self.run.step if wandb_cfg.mode == "online" else 0  # the next step W&B expects
        if metrics_path.exists():
            for line in metrics_path.read_text(encoding="utf-8").splitlines():
                if json.loads(line)["step"] >= held:
                    self.log(json.loads(line))

    def log(self, record: dict) -> None:
        self.run.log(dashboard_scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def check_wandb_installed() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError("config error: logging.wandb needs the wandb package; pip install 'ds-finetune[wandb]' "
                        "(or remove logging.wandb)")


class MetricsWriter:
    def __init__(self, output_dir: Path, start_step: int, total_steps: int, tensorboard: bool, progress_bar: bool,
                 wandb=None):
        """`wandb`: None, or (logging.wandb config, W&B run id, the run config as a dict)."""
        self.path = Path(output_dir) / "metrics.jsonl"
        truncate_metrics(self.path, start_step)
        self.wandb = WandbRun(*wandb, Path(output_dir), self.path) if wandb else None
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops TensorBoard events of the interrupted attempt past the resume point.
            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1)
        self.bar = None
        if progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.last_time, self.last_tokens, self.last_eval = time.time(), None, None

    def log(self, record: dict, step_tokens: int) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # a kill loses at most the line being written; truncate_metrics drops a torn one
        if self.wandb is not None:
            self.wandb.log(record)
        if self.tb is not None:  # the same names as W&B's (train/loss, train/learning_rate, eval/loss, ...)
            for tag, value in dashboard_scalars(record).items():
                self.tb.add_scalar(tag, value, record["step"])
        if self.bar is not None:
            now = time.time()
            tps = step_tokens / max(now - self.last_time, 1e-9)
            self.last_time = now
            if "eval_loss" in record:
                self.last_eval = record["eval_loss"]
            shown = {} if self.last_eval is None else {"eval": f"{self.last_eval:.4f}"}
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", **shown, lr=f"{record['learning_rate']:.2e}",
                                 tok_s=f"{tps:,.0f}", refresh=False)
            self.bar.update(1)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


class NullMetricsWriter:
    def log(self, record: dict, step_tokens: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
