"""The global batch order: one permutation per epoch drawn from (seed, epoch) alone, never from
the world size. Optimizer step g of an epoch takes the next `global_batch` entries; rank r's micro-step m
takes a fixed slice of them. The position is (epoch, offset) and jumping to it is O(1).

Imports nothing of ours, on purpose: the order is plain arithmetic that tests can check in isolation.

A last partial global batch of an epoch is dropped (every optimizer step sees exactly `global_batch`
entries, so the loss normalisation and the LR schedule do not change at epoch ends); the dropped rows are
different each epoch because the permutation is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of item indices; depends on (num_items, seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(num_items)


@dataclass(frozen=True)
class BatchLayout:
    micro_batch_size: int
    grad_accum: int
    world_size: int  # ranks taking different sequences: the data-parallel size (world / train.sequence_parallel)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def micro_slice(self, offset: int, micro_step: int, rank: int) -> slice:
        """Entries of the epoch order that `rank` consumes at `micro_step` of the step starting at `offset`.
        Micro-step-major, then rank: any split of one global batch covers the same entries."""
        start = offset + (micro_step * self.world_size + rank) * self.micro_batch_size
        return slice(start, start + self.micro_batch_size)


def steps_in_epoch(num_units: int, global_batch: int) -> int:
    return num_units // global_batch  # the last partial batch is dropped (see module docstring)
