"""The training objective: what one optimizer step computes from its share of the global batch.

The loop (`train.fit`) hands the objective the step's units of the epoch order and gets back this rank's
summed loss and the global batch's target count (for a mixture, both per source too); it never sees
micro-batches, the loss function or the hooks around DeepSpeed's step. Supervised fine-tuning (`SFT`) is
here; preference pairs (`dpo.DPO`) are another class with the same `step` (and `eval_batch`), whose
`StepResult.sums` carry its metrics into the step's all-reduce. Sequence parallelism is not one: its groups
take the micro-batches of data-parallel ranks and its loss function slices them (`sequence.ShardedLoss`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ds_finetune.data import IGNORE_INDEX, TokenizedData, collate, unit_targets
from ds_finetune.device_batch import facts_of, host_to_device, to_device
from ds_finetune.ds_internals import gradient_averaging_ranks, loss_scale
from ds_finetune.faults import fault_point
from ds_finetune.sampler import BatchLayout


@dataclass(frozen=True)
class StepResult:
    loss_sum: torch.Tensor   # this rank's summed token losses, on the device (the loop reduces it)
    targets: int             # target tokens of the whole global batch (every rank knows them)
    # A mixture: each source's name -> its target tokens in the global batch, and this rank's summed token
    # losses per source (in that order, on the device; the loop reduces them with the step's loss).
    source_targets: dict = field(default_factory=dict)
    source_sums: list = field(default_factory=list)
    sums: dict = field(default_factory=dict)  # metric name -> this rank's sum, reduced with the loss, / targets


def source_metrics(source_targets: dict, source_sums: list[float]) -> dict:
    """`loss/<name>` (the global-token mean of the source's targets in the step; absent when the step had
    none) and `tokens/<name>` (those targets) of each source, from the sums reduced over the ranks."""
    out = {}
    for (name, targets), loss_sum in zip(source_targets.items(), source_sums):
        if targets:
            out[f"loss/{name}"] = loss_sum / targets
        out[f"tokens/{name}"] = targets
    return out


@dataclass(frozen=True)
class SFT:
    """Next-token loss on each unit's target tokens, normalised by the global batch's target count."""
    data: TokenizedData
    layout: BatchLayout
    loss_fn: Callable        # (engine, input_ids, attention_mask, labels, position_ids, facts, grad_scale=) -> loss
    pad_id: int              # any id works: padding is masked out of attention and loss
    isolate: bool            # data.packing: isolated (each row of a pack attends to itself only)
    rank: int                # this process (fault points name it)
    before_update: Callable  # called right before the engine's step changes weights and optimizer state
    sources: tuple = ()      # a mixture's source names (data.MixedData), for the per-source losses
    data_rank: int | None = None  # the share of the global batch it takes: its data-parallel rank under
    #                               sequence parallelism (a group shares micro-batches; the loss slices them)

    def step(self, engine, units, step: int) -> StepResult:
        """Optimizer step `step` (1-based) over the global batch `units`."""
        layout = self.layout
        share = self.rank if self.data_rank is None else self.data_rank
        mine = [units[layout.micro_slice(0, m, share)] for m in range(layout.grad_accum)]
        micro_batches = [collate(self.data, u, self.pad_id, self.isolate) for u in mine]
        targets = unit_targets(self.data, units)
        token_losses = [self._token_buffer(b, engine.device) for b in micro_batches] if self.sources else None
        loss_sum, _ = train_step(engine, self.loss_fn, micro_batches, targets, layout.grad_accum,
                                 gradient_averaging_ranks(engine),
                                 after_micro_step=lambda: fault_point("mid_accum", self.rank, step),
                                 before_update=self.before_update, token_losses=token_losses)
        if not self.sources:
            return StepResult(loss_sum, targets)
        return StepResult(loss_sum, targets, self._source_targets(units),
                          self._source_sums(mine, micro_batches, token_losses, engine.device))

    # --------------------------------------------------------------------------- per-source losses

    def _unit_sources(self, units) -> np.ndarray:
        return self.data.source_of([int(u[0]) for u in units])  # a unit's rows are of one source

    def _source_targets(self, units) -> dict:
        per_unit = [int(np.sum(self.data.row_targets[u])) for u in units]
        counts = np.bincount(self._unit_sources(units), weights=per_unit, minlength=len(self.sources))
        return {name: int(n) for name, n in zip(self.sources, counts)}

    @staticmethod
    def _token_buffer(batch, device) -> torch.Tensor:
        return torch.empty(int(batch.facts.targets.sum()), dtype=torch.float32, device=device)

    def _source_sums(self, mine, micro_batches, token_losses, device) -> list:
        """This rank's summed token losses per source: each target token's loss (row-major, as the loss
        functions write them) added to its sequence's source."""
        sums = torch.zeros(len(self.sources), dtype=torch.float64, device=device)
        for units, batch, losses in zip(mine, micro_batches, token_losses):
            sequence_of_token = np.nonzero(batch.facts.targets)[0]
            source = host_to_device(self._unit_sources(units)[sequence_of_token], device)
            sums.index_add_(0, source, losses.double())
        return list(sums)

    def eval_batch(self, engine, data: TokenizedData, units: np.ndarray, counted: bool
                   ) -> tuple[torch.Tensor, int, dict]:
        """(summed token loss, target tokens, no other sums) of eval units of `data`; a batch not `counted`
        (a rank whose share ran out) runs the same forward and counts nothing."""
        batch = collate(data, units, self.pad_id)  # one row a unit: never packed
        if not counted:
            batch.labels.fill_(IGNORE_INDEX)
            batch = batch._replace(facts=facts_of(batch.labels))  # host labels: no target left
        loss_sum = self.loss_fn(engine, *to_device(batch, engine.device)).double()  # stays on the device
        return loss_sum, int((batch.labels[:, 1:] != IGNORE_INDEX).sum()), {}  # host labels: no device sync


def train_step(engine, loss_fn, micro_batches: list, global_targets: int, grad_accum: int, averaged_over: int,
               after_micro_step=None, before_update=None, token_losses=None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over this rank's micro-batches; returns this rank's summed token loss and, for a
    loss_fn that returns (loss, metric sums), the metric sums added over the micro-batches.

    The step's loss is (sum of token losses over the global batch) / (targets in the global batch).
    DeepSpeed divides each micro-step's loss by grad_accum and each gradient by `averaged_over` ranks
    (`ds_internals.gradient_averaging_ranks`: the data-parallel size, or every rank under ZeRO-3 with sequence
    parallelism), so each micro-step's sum is scaled by grad_accum * averaged_over / global_targets to cancel
    both. Backward then brings the loss that gradient times fp16's loss scale over grad_accum, which the
    fused loss needs to know in advance under fp16. `token_losses`: a buffer per micro-batch for each target
    token's loss."""
    scale = grad_accum * averaged_over / global_targets
    expected_grad = scale * loss_scale(engine) / grad_accum
    local_sum = torch.zeros((), dtype=torch.float64, device=engine.device)  # no host sync per micro-step
    extra_sum = None
    for i, batch in enumerate(micro_batches):  # data.Batch: input_ids, attention_mask, labels, position_ids, facts
        per_token = {} if token_losses is None else {"token_losses": token_losses[i]}
        loss_sum = loss_fn(engine, *to_device(batch, engine.device), grad_scale=expected_grad, **per_token)
        if isinstance(loss_sum, tuple):
            loss_sum, extra = loss_sum
            extra_sum = extra if extra_sum is None else extra_sum + extra
        engine.backward(loss_sum * scale)
        if before_update is not None and engine.is_gradient_accumulation_boundary():
            before_update()  # this step() changes the weights and optimizer state
        engine.step()
        local_sum += loss_sum.detach().double()
        if after_micro_step is not None:
            after_micro_step()
    return local_sum, extra_sum
