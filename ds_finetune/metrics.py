"""metrics.jsonl, TensorBoard scalars and the progress bar. Rank 0 only; other ranks get a writer that
does nothing, so the loop never asks which rank it is on to log.

After a resume from step S, lines with step > S written by the interrupted attempt are removed first
(new file + rename), so metrics.jsonl reads as one clean run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def truncate_metrics(path: Path, keep_through_step: int) -> None:
    """Keep only lines with step <= keep_through_step (all lines removed for a fresh start). Atomic."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= keep_through_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a torn last line from a kill: everything after it is from the interrupted attempt
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
    os.replace(tmp, path)


class MetricsWriter:
    def __init__(self, output_dir: Path, start_step: int, total_steps: int, tensorboard: bool, progress_bar: bool):
        self.path = Path(output_dir) / "metrics.jsonl"
        truncate_metrics(self.path, start_step)
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
        self.last_time, self.last_tokens = time.time(), None

    def log(self, record: dict, step_tokens: int) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # a kill loses at most the line being written; truncate_metrics drops a torn one
        if self.tb is not None:
            self.tb.add_scalar("train/loss", record["loss"], record["step"])
            self.tb.add_scalar("train/lr", record["lr"], record["step"])
        if self.bar is not None:
            now = time.time()
            tps = step_tokens / max(now - self.last_time, 1e-9)
            self.last_time = now
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tps:,.0f}",
                                 refresh=False)
            self.bar.update(1)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        self.file.close()
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
