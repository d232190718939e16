"""Supervised fine-tuning (train.objective: sft): next-token loss on each unit's target tokens, normalised by
the global batch's target count. A unit is a row or a pack of rows (`data.packing`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ds_finetune import lora
from ds_finetune.data import IGNORE_INDEX, MixedData, SourceLosses, TokenizedData, collate, unit_targets
from ds_finetune.device_batch import facts_of, host_to_device, to_device
from ds_finetune.loss import make_loss_fn
from ds_finetune.objectives import ObjectiveParts, StepResult, accumulate
from ds_finetune.sampler import BatchLayout
from ds_finetune.sequence import sharded


@dataclass(frozen=True)
class SFT:
    # A step also logs mean_token_accuracy (TRL's: top-1 targets / targets of the global batch); a mixture adds
    # loss/<source> and tokens/<source> (data.SourceLosses)
    metric_names = ()
    perplexity = True

    data: TokenizedData | MixedData
    layout: BatchLayout
    loss_fn: Callable        # (engine, input_ids, attention_mask, labels, position_ids, facts, grad_scale=) -> loss
    pad_id: int              # any id works: padding is masked out of attention and loss
    isolate: bool            # data.packing: isolated (each row of a pack attends to itself only)
    share: int               # which share of the global batch this rank takes (its data-parallel rank)
    counts_targets: bool = True  # False where another rank counts the targets of the same rows (its loss slices them)
    per_source: SourceLosses | None = None  # a mixture's losses per source

    def micro_batches(self, units) -> tuple[list, list]:
        """(this rank's units of each micro-step, their collated micro-batches)."""
        mine = [units[self.layout.micro_slice(0, m, self.share)] for m in range(self.layout.grad_accum)]
        return mine, [collate(self.data, u, self.pad_id, self.isolate) for u in mine]

    def step(self, engine, units, step: int, before_update=None) -> StepResult:
        mine, micro_batches = self.micro_batches(units)
        targets = unit_targets(self.data, units)
        correct = torch.zeros((), dtype=torch.float64, device=engine.device)  # read in the loop's all-reduce
        accuracy = {"mean_token_accuracy": (correct, targets)}
        if self.per_source is None:
            loss_sum, _ = accumulate(engine, self.loss_fn, micro_batches, targets, step, before_update,
                                     per_batch=[{"correct": correct}] * len(micro_batches))
            return StepResult(loss_sum, targets, accuracy)
        token_losses = self.per_source.buffers(micro_batches, engine.device)
        loss_sum, _ = accumulate(engine, self.loss_fn, micro_batches, targets, step, before_update,
                                 per_batch=[{"token_losses": t, "correct": correct} for t in token_losses])
        sums, counts = self.per_source.metrics(units, mine, micro_batches, token_losses,
                                               lambda host: host_to_device(host, engine.device))
        return StepResult(loss_sum, targets, {**accuracy, **sums}, counts)

    def eval_batch(self, engine, data: TokenizedData, units: np.ndarray, counted: bool
                   ) -> tuple[torch.Tensor, int, dict]:
        batch = collate(data, units, self.pad_id)  # one row a unit: never packed
        if not counted:
            batch.labels.fill_(IGNORE_INDEX)
            batch = batch._replace(facts=facts_of(batch.labels))  # host labels: no target left
        loss_sum = self.loss_fn(engine, *to_device(batch, engine.device)).double()  # stays on the device
        targets = int((batch.labels[:, 1:] != IGNORE_INDEX).sum()) if self.counts_targets else 0  # host labels
        return loss_sum, targets, {}


def build(parts: ObjectiveParts) -> SFT:
    cfg, group = parts.cfg, parts.group
    loss_fn = sharded(make_loss_fn(lora.hf_model(parts.model), cfg.train.loss_chunk_tokens), group, parts.ulysses,
                      parts.pad_id)
    per_source = SourceLosses(parts.data) if isinstance(parts.data, MixedData) else None
    return SFT(parts.data, parts.layout, loss_fn, parts.pad_id, cfg.data.isolates, group.dp_rank,
               counts_targets=group.rank == 0, per_source=per_source)
