"""The step every pair objective shares (DPO, ORPO, SimPO, CPO): a unit is a preference pair (its chosen and
rejected rows, `data.preference`), the global batch counts pairs, and the step's loss is the global batch's
summed loss over its pairs.

Each objective brings a pair loss (`PairLoss`): called on a micro-batch as accumulate's loss_fn, it returns
(summed loss, its metric sums as one float64 vector in `metric_names` order). A loss with a token-mean term
(the chosen completions' NLL: DPO's sft, ORPO's, CPO's) says which tokens the global batch counts for it
(`nll_tokens`): the step passes pairs / that count as `nll_scale`, so the term's share of the step's loss is
the global batch's token mean whatever the split into micro-batches and ranks (TRL takes the mean over
its per-device batch: the same number where the global batch is one micro-batch). In evaluation each batch
is its own (the loss then leaves `nll_scale` None). Metric sums are divided by the pairs, so a token-mean
metric is summed already scaled by `nll_scale`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ds_finetune.data import TokenizedData
from ds_finetune.device_batch import to_device
from ds_finetune.objectives import StepResult, accumulate
from ds_finetune.sampler import BatchLayout


class PairLoss(Protocol):
    def __call__(self, engine, *batch, grad_scale: float = 1.0, nll_scale: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss of the micro-batch's pairs, metric sums); `batch`: `collate(data, units, pad_id)`'s."""

    def nll_tokens(self, data: TokenizedData, units: np.ndarray) -> int | None:
        """The tokens of `units` its token-mean term averages over; None where it has none."""

    def collate(self, data: TokenizedData, units: np.ndarray, pad_id: int):
        """The micro-batch of `units` as the loss takes it (`collate_pairs`, or more)."""


def pack_length(cfg) -> int | None:
    """The row length a micro-batch's sequences are packed into (data.packing isolated), or None."""
    return cfg.data.max_length if cfg.data.isolates else None


def chosen_completion_tokens(data: TokenizedData, units: np.ndarray) -> int:
    return int(data.row_targets[units[:, 0]].sum())


@dataclass(frozen=True)
class PairObjective:
    """A preference objective: its metric names and pair loss, on the shared step over pairs."""
    metric_names: tuple[str, ...]
    data: TokenizedData
    layout: BatchLayout
    loss_fn: PairLoss
    pad_id: int
    share: int  # which share of the global batch this rank takes (its data-parallel rank)
    eval_loss_fn: PairLoss | None = None  # DPO: with the eval data's reference, where it has its own (eval.path)
    # False on all but the first rank of a sequence-parallel group: each rank of it computes the same loss and
    # metrics from the group's joined log-probs (`sequence.JoinedLogps`), which one of them reports
    reports: bool = True
    perplexity = False  # a pair's loss is no token loss

    def step(self, engine, units: np.ndarray, step: int, before_update=None) -> StepResult:
        layout, loss_fn = self.layout, self.loss_fn
        micro_batches = [loss_fn.collate(self.data, units[layout.micro_slice(0, m, self.share)], self.pad_id)
                         for m in range(layout.grad_accum)]
        pairs = layout.global_batch
        tokens = loss_fn.nll_tokens(self.data, units)
        per_batch = None if tokens is None else [{"nll_scale": pairs / max(tokens, 1)}] * len(micro_batches)
        loss_sum, sums = accumulate(engine, loss_fn, micro_batches, pairs, step, before_update, per_batch=per_batch)
        if not self.reports:
            loss_sum, sums = torch.zeros_like(loss_sum), torch.zeros_like(sums)
        counts = self.token_counts(self.data, units)
        return StepResult(loss_sum, pairs, sums={name: (value, counts.get(name, pairs))
                                                 for name, value in zip(self.metric_names, sums)})

    def token_counts(self, data: TokenizedData, units: np.ndarray) -> dict:
        """The metrics the loss averages over tokens, not pairs (DPO's logits/*), and their token counts."""
        counts = getattr(self.loss_fn, "token_counts", None)
        return counts(data, units) if counts is not None else {}

    def eval_batch(self, engine, data: TokenizedData, units: np.ndarray, counted: bool
                   ) -> tuple[torch.Tensor, int, dict]:
        loss_fn = self.eval_loss_fn if data is not self.data and self.eval_loss_fn is not None else self.loss_fn
        loss_sum, sums = loss_fn(engine, *to_device(loss_fn.collate(data, units, self.pad_id), engine.device))
        counted = counted and self.reports
        weight = 1.0 if counted else 0.0
        counts = self.token_counts(data, units)  # (sum, count) where the metric has its own count
        return loss_sum.double() * weight, len(units) if counted else 0, {
            name: (value * weight, counts[name] * weight) if name in counts else value * weight
            for name, value in zip(self.metric_names, sums)}

