"""Where a DPO micro-step's time goes, in ds-finetune's loop and in TRL's DPOTrainer: timers on the phases of
the real training runs of bench/dpo_trl.py (a few clock reads a micro-step), one JSON line a micro-step.

  forward    the backbone (embeddings, decoder layers, final norm): its module's call, from a forward
             pre-hook to a forward hook
  logps      the LM head and the targets' log-probs, forward: ours the fused chunked head (run by a hook on
             the backbone), TRL its fused LM head kernel, which also computes its vocabulary-wide metrics
             (entropy, mean logit, top-1) in the same pass; `vocab_metrics_share` below splits them off
  loss       the rest of the micro-step's loss call: from the per-sequence log-probs to the DPO loss and the
             batch metrics (rewards, accuracies, log-probs; TRL's gathers and .item()s)
  backward   the engine's (ours) or the accelerator's (TRL) backward of the micro-step's loss

Calls without gradients (the reference log-probs computed before training) are not counted. After TRL's
training, its kernel runs again on the last micro-step's inputs, with only the log-probs asked for and with
the metrics too, alternately, and the last line is {"vocab_metrics_share": share of the kernel's time the
metrics take}.

    python bench/children/dpo_trl_phases.py OUT.jsonl --config RUN.yaml [overrides...]   (ours: ds_finetune.train.main)
    bench/children/dpo_trl.py --phases OUT.jsonl ...                                     (TRL: time_trl below)
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout (this is bench/children/)


class Clock:
    """Seconds a phase, summed over one micro-step's calls, written when its backward ends."""

    def __init__(self, path: str):
        self.file, self.row, self.started = open(path, "a"), {}, {}

    def start(self, phase: str) -> None:
        if torch.is_grad_enabled():
            self.started[phase] = time.perf_counter()

    def stop(self, phase: str) -> None:
        if phase in self.started:
            self.row[phase] = self.row.get(phase, 0.0) + time.perf_counter() - self.started.pop(phase)

    def timed(self, phase: str, fn, end_micro: bool = False):
        def call(*args, **kwargs):
            self.start(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(phase)
                if end_micro:
                    self.end_micro()
        return call

    def end_micro(self) -> None:
        """The loss call's time less the backbone and head inside it is the loss phase."""
        if "call" in self.row:
            row = dict(self.row)
            row["loss"] = row.pop("call") - row.get("forward", 0.0) - row.get("logps", 0.0)
            self.write(row)
        self.row = {}

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def time_backbone(self, model) -> None:
        """forward: the backbone's call. Prepended, so it stops before ours' head hook (registered earlier) runs."""
        model.base_model.register_forward_pre_hook(lambda *_: self.start("forward"))
        model.base_model.register_forward_hook(lambda *_: self.stop("forward"), prepend=True)


class TimedLoss:
    """The pair loss with its call timed; its other methods (collate, nll_tokens) are the loss's own."""

    def __init__(self, call, loss):
        self.call, self.loss = call, loss

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.loss, name)


def time_ours(clock: Clock, run):
    """Timers on a ds_finetune.train.Run: the backbone, the chunked head (a hook on the backbone, after the one
    ChunkedLoss registered, so from the backbone's end to there), the DPO loss call and the engine's backward."""
    model = run.engine.module
    model.base_model.register_forward_hook(lambda *_: clock.start("logps"), prepend=True)
    model.base_model.register_forward_hook(lambda *_: clock.stop("logps"))
    clock.time_backbone(model)  # its stop is prepended before the start above
    run.engine.backward = clock.timed("backward", run.engine.backward, end_micro=True)
    objective = dataclasses.replace(run.objective, loss_fn=TimedLoss(clock.timed("call", run.objective.loss_fn),
                                                                      run.objective.loss_fn))
    return dataclasses.replace(run, objective=objective)


def time_trl(clock: Clock, trainer):
    """Timers on a TRL DPOTrainer before its train(): the backbone, the fused LM head kernel (looked up in
    trl.trainer.utils at every call), compute_loss and the accelerator's backward. Returns what to call once
    train() is done (writes the vocab_metrics_share line)."""
    import trl.trainer.utils as trl_utils
    kernel = trl_utils._ChunkedLogProbFunction
    last = {}

    class TimedKernel:
        @staticmethod
        def apply(*args):
            if torch.is_grad_enabled():
                last["args"] = args
            return clock.timed("logps", kernel.apply)(*args)

    trl_utils._ChunkedLogProbFunction = TimedKernel
    clock.time_backbone(trainer.model)
    trainer.compute_loss = clock.timed("call", trainer.compute_loss)
    trainer.accelerator.backward = clock.timed("backward", trainer.accelerator.backward, end_micro=True)
    return lambda: clock.write({"vocab_metrics_share": vocab_metrics_share(kernel, last["args"])})


def vocab_metrics_share(kernel, args, reps: int = 3) -> float:
    """The share of the kernel's forward time that its metric outputs take: the same inputs with the log-probs
    only and with every output the trainer asked for, alternately, medians."""
    *head, outputs = args
    only, full = [], []
    with torch.no_grad():
        for _ in range(reps):
            for times, wanted in ((only, ("log_probs",)), (full, outputs)):
                t0 = time.perf_counter()
                kernel.apply(*head, wanted)
                times.append(time.perf_counter() - t0)
    return 1 - statistics.median(only) / statistics.median(full)


def main() -> None:
    from ds_finetune import train
    clock, setup = Clock(sys.argv[1]), train.setup

    def timed_setup(args):
        run, state = setup(args)
        return time_ours(clock, run), state

    train.setup = timed_setup
    train.main(sys.argv[2:])


if __name__ == "__main__":
    main()
