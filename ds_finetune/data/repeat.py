"""An order whose every global batch is trained on for several consecutive steps: GRPO's `num_iterations`
μ (TRL's RepeatSampler): the steps of a block of μ take the same prompts, and the block's last step moves
the position on, so a run sees every unit of the order, μ steps each.

The steps inside a block leave the position (and `consumed_samples`) where the block began, so a
checkpoint taken inside a block resumes to the same units; a block never straddles an epoch's end.
"""

from __future__ import annotations

from ds_finetune.data.packing import StepBatch


class RepeatedOrder:
    def __init__(self, inner, repeats: int):
        self.inner, self.repeats = inner, repeats

    def total_steps(self, train, global_batch: int) -> int:
        if train.epochs is None:
            return train.max_steps
        steps = self.inner.total_steps(train.model_copy(update={"max_steps": None}), global_batch) * self.repeats
        return min(steps, train.max_steps) if train.max_steps else steps

    def batch(self, state, global_batch: int) -> StepBatch | None:
        """The block's global batch; the position after it only at the block's last step (`state.step + 1`
        is the step about to run)."""
        batch = self.inner.batch(state, global_batch)
        if batch is None or (state.step + 1) % self.repeats == 0:
            return batch
        return StepBatch(batch.units, {key: getattr(state, key) for key in batch.position}, samples=0)

    def sample_ids(self, units) -> list[int]:
        return self.inner.sample_ids(units)
