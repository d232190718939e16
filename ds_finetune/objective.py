"""The training objective: what one optimizer step computes from its share of the global batch.

The loop (`train.fit`) hands the objective the step's units of the epoch order and gets back this rank's
summed loss and the global batch's target count; it never sees micro-batches, the loss function or the
hooks around DeepSpeed's step. Supervised fine-tuning (`SFT`) is the objective today; one with other
batches or another loss (preference pairs) is another class with the same `step`. Sequence parallelism
is not one: its groups take the micro-batches of data-parallel ranks and its loss function slices them
(`sequence.ShardedLoss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ds_finetune.data import TokenizedData, collate, unit_targets
from ds_finetune.ds_internals import loss_scale
from ds_finetune.faults import fault_point
from ds_finetune.loss import to_device
from ds_finetune.sampler import BatchLayout


@dataclass(frozen=True)
class StepResult:
    loss_sum: torch.Tensor   # this rank's summed token losses, on the device (the loop reduces it)
    targets: int             # target tokens of the whole global batch (every rank knows them)


@dataclass(frozen=True)
class SFT:
    """Next-token loss on each unit's target tokens, normalised by the global batch's target count."""
    data: TokenizedData
    layout: BatchLayout
    loss_fn: Callable        # (engine, input_ids, attention_mask, labels, position_ids, grad_scale=) -> summed loss
    pad_id: int              # any id works: padding is masked out of attention and loss
    isolate: bool            # data.packing: isolated (each row of a pack attends to itself only)
    rank: int                # this process (fault points name it)
    before_update: Callable  # called right before the engine's step changes weights and optimizer state
    data_rank: int | None = None  # the share of the global batch it takes: its data-parallel rank under
    #                               sequence parallelism (a group shares micro-batches; the loss slices them)

    def step(self, engine, units: list[np.ndarray], offset: int, step: int) -> StepResult:
        """Optimizer step `step` (1-based) over the global batch starting at `offset` of `units`."""
        layout = self.layout
        share = self.rank if self.data_rank is None else self.data_rank
        micro_batches = [collate(self.data, units[layout.micro_slice(offset, m, share)], self.pad_id, self.isolate)
                         for m in range(layout.grad_accum)]
        targets = unit_targets(self.data, units[layout.step_slice(offset)])
        loss_sum = train_step(engine, self.loss_fn, micro_batches, targets, layout.grad_accum, layout.world_size,
                              after_micro_step=lambda: fault_point("mid_accum", self.rank, step),
                              before_update=self.before_update)
        return StepResult(loss_sum, targets)


def train_step(engine, loss_fn, micro_batches: list, global_targets: int, grad_accum: int, world_size: int,
               after_micro_step=None, before_update=None) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns this rank's summed token loss.

    The step's loss is (sum of token losses over the global batch) / (targets in the global batch).
    DeepSpeed divides each micro-step's loss by grad_accum and averages gradients over ranks, so each
    micro-step's sum is scaled by grad_accum * world_size / global_targets to cancel both. Backward then
    brings the loss that gradient times fp16's loss scale over grad_accum, which the fused loss needs to
    know in advance under fp16."""
    scale = grad_accum * world_size / global_targets
    expected_grad = scale * loss_scale(engine) / grad_accum
    local_sum = torch.zeros((), dtype=torch.float64, device=engine.device)  # no host sync per micro-step
    for batch in micro_batches:  # data.Batch: input_ids, attention_mask, labels, position_ids
        loss_sum = loss_fn(engine, *to_device(batch, engine.device), grad_scale=expected_grad)
        engine.backward(loss_sum * scale)
        if before_update is not None and engine.is_gradient_accumulation_boundary():
            before_update()  # this step() changes the weights and optimizer state
        engine.step()
        local_sum += loss_sum.detach().double()
        if after_micro_step is not None:
            after_micro_step()
    return local_sum
