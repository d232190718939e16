"""Training units from tokenized rows: one row each, or greedy packs of consecutive rows of the epoch
order; and collation into right-padded tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ds_finetune.data.cache import TokenizedData
from ds_finetune.errors import UserError
from ds_finetune.sampler import epoch_permutation, steps_in_epoch

IGNORE_INDEX = -100


def plan_units(data: TokenizedData, order: np.ndarray, packing: bool, max_length: int):
    """An epoch's training units in order (a sequence of row-index arrays): one row each, or greedy packs
    of consecutive rows of `order` with at most `max_length` tokens. Deterministic in `order`, so a
    resumed run plans the same packs."""
    if not packing or len(order) == 0:
        return order.reshape(-1, 1)  # rows of a 2-D array: one-row units without a Python object per row
    return [order[a:b] for a, b in greedy_cuts(data.lengths[order], max_length)]


def greedy_cuts(lengths, max_length: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive runs of `lengths`, each cut where the next would pass `max_length` (a
    longer one alone)."""
    cuts, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if used + n > max_length and i > start:
            cuts.append((start, i))
            start, used = i, 0
        used += n
    cuts.append((start, len(lengths)))
    return cuts


@dataclass(frozen=True)
class StepBatch:
    """The units (rows or packs) of one global batch, and the position after it: the TrainState fields
    to set once the step is done; `samples`: what the step adds to `consumed_samples` (None: the global
    batch; 0 inside a block of data.RepeatedOrder, which takes the same units again)."""
    units: object
    position: dict
    samples: int | None = None


class EpochOrder:
    """The units (rows or packs) of each epoch in order; planned once per epoch, O(1) to index after.
    `rows`: the rows trained on (all of them unless some are held out for evaluation). The position is
    (epoch, offset); `train.epochs` ends the run (`batch` returns None). Where the data's rows come in groups
    (`data.rows_per_unit` k > 1: a preference pair's chosen and rejected rows) the order is over groups and
    a unit is a group's k rows."""

    def __init__(self, data: TokenizedData, seed: int, packing: bool, max_length: int, rows: np.ndarray | None = None,
                 epochs: int | None = None, label: str = "data.path"):
        self.data, self.seed, self.packing, self.max_length = data, seed, packing, max_length
        self.epochs, self.label, self.k = epochs, label, data.rows_per_unit
        self.rows = rows if self.k == 1 else group_indices(data.num_rows, rows, self.k)
        self._epoch, self._units = None, None

    def total_steps(self, train, global_batch: int) -> int:
        # Packing makes the steps of an epoch depend on its order, so count them epoch by epoch.
        per_epoch = [steps_in_epoch(len(self.units(e)), global_batch) for e in range(train.epochs or 1)]
        if min(per_epoch) == 0:
            raise UserError(f"data error: {self.label}: {self.num_rows} usable rows make fewer units than one "
                            f"global batch ({global_batch}); add data or lower the batch size")
        if train.epochs is None:
            return train.max_steps
        total = sum(per_epoch)
        return min(total, train.max_steps) if train.max_steps else total

    def batch(self, state, global_batch: int) -> StepBatch | None:
        """The next global batch from (state.epoch, state.offset), or None when train.epochs are done."""
        epoch, offset = state.epoch, state.offset
        while True:
            units = self.units(epoch)
            if len(units) < global_batch:  # possible only with packing, where each epoch packs differently
                raise UserError(f"data error: epoch {epoch} packs into {len(units)} sequences, fewer than one "
                                f"global batch ({global_batch}); add data or lower the batch size")
            if offset + global_batch <= len(units):
                return StepBatch(units[offset:offset + global_batch], {"epoch": epoch, "offset": offset + global_batch})
            # Epoch done (a last partial batch is dropped).
            if self.epochs is not None and epoch + 1 >= self.epochs:
                return None
            epoch, offset = epoch + 1, 0

    @property
    def num_rows(self) -> int:
        """Rows (groups of rows, where the data's rows come in groups) in the order."""
        return self.data.num_rows if self.rows is None else len(self.rows)

    def units(self, epoch: int) -> list[np.ndarray]:
        if epoch != self._epoch:
            order = epoch_permutation(self.num_rows, self.seed, epoch)
            if self.rows is not None:
                order = self.rows[order]
            self._epoch = epoch
            self._units = (group_units(order, self.k) if self.k > 1
                           else plan_units(self.data, order, self.packing, self.max_length))
        return self._units

    def sample_ids(self, units) -> list[int]:
        """The dataset row ids of `units` (one per group, where rows come in groups), for metrics.jsonl."""
        return [int(x) for u in units for x in self.data.row_ids[u[:1] if self.k > 1 else u]]


def group_indices(num_rows: int, rows: np.ndarray | None, k: int) -> np.ndarray:
    """The groups of k rows (group g is rows k*g .. k*g + k-1) among `rows` (all rows where None)."""
    firsts = np.arange(0, num_rows, k) if rows is None else np.asarray(rows)[np.asarray(rows) % k == 0]
    return firsts // k


def group_units(groups: np.ndarray, k: int) -> np.ndarray:
    """Units of groups of k rows: group g is rows k*g .. k*g + k-1 (a preference pair: chosen, rejected)."""
    return k * np.asarray(groups)[:, None] + np.arange(k)


@dataclass(frozen=True)
class HostFacts:
    """What the host knows of a micro-batch's tensors when it builds them, so that the training step never
    reads them back from the device (on CUDA each such read waits for every kernel queued before it).

    `targets[r, t]`: the token after position t of row r is a target (labels[r, t + 1] is not IGNORE_INDEX;
    the last column is False), i.e. position t's hidden state reaches the loss. Under sequence parallelism,
    the positions of this rank's slice. `segments`: where the model gets position ids (isolated packing,
    sequence parallelism), the lengths of the causal sequences attention sees in each row, in order (the
    last runs to the row's end; under sequence parallelism, of the whole gathered row); else None.
    `sequences`: where the loss wants a value per sequence and rows hold several (packed preference pairs),
    each sequence's target count in row-major order; None: one sequence a row."""
    targets: np.ndarray
    segments: tuple | None = None
    sequences: tuple | None = None

    @classmethod
    def of_labels(cls, labels: np.ndarray, segments: tuple | None = None) -> "HostFacts":
        """From right-padded labels where labels[:, t] is the token at t (the target of position t - 1)."""
        targets = np.zeros(labels.shape, dtype=bool)
        targets[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        return cls(targets, segments)

    @staticmethod
    def segments_of(positions: np.ndarray) -> tuple:
        """The segments of position ids that restart at 0 at every segment (as `collate` numbers them)."""
        return tuple(tuple(int(n) for n in np.diff([*np.flatnonzero(row == 0), len(row)])) for row in positions)

    def target_positions(self, columns: int | None = None) -> np.ndarray:
        """Row-major flat indices of the target positions among the first `columns` (all) of each row."""
        return np.flatnonzero(self.targets[:, :columns])

    def row_targets(self) -> list[int]:
        return [int(n) for n in self.targets.sum(1)]

    def sequence_targets(self) -> list[int]:
        """Each sequence's target count: each row's, or each packed sequence's (`sequences`)."""
        return list(self.sequences) if self.sequences is not None else self.row_targets()

    def positions(self) -> np.ndarray:
        """Position ids restarting at every segment (as `collate` numbers an isolated pack's)."""
        return np.stack([np.concatenate([np.arange(n) for n in row]) for row in self.segments])

    def cu_seq_lens(self) -> np.ndarray:
        """Where each segment starts in the flattened rows, then their total: flash attention's varlen
        boundaries (int32, as transformers builds them)."""
        return np.cumsum([0, *(n for row in self.segments for n in row)], dtype=np.int32)

    def longest_segment(self) -> int:
        return max(n for row in self.segments for n in row)

    def shard(self, rank: int, size: int) -> "HostFacts":
        """The facts of `sequence.shard`'s slice: targets of this rank's slice of the width padded to a
        multiple of `size`; segments of the whole padded row (the pad continues the last segment, or is
        the row's only one when the batch had no positions)."""
        rows, width = self.targets.shape
        padded = -(-width // size) * size
        targets = np.zeros((rows, padded), dtype=bool)
        targets[:, :width] = self.targets
        n = padded // size
        segments = self.segments or tuple((width,) for _ in range(rows))
        segments = tuple((*row[:-1], row[-1] + padded - width) for row in segments)
        return HostFacts(targets[:, rank * n:(rank + 1) * n], segments)


class Batch(NamedTuple):
    """A micro-batch as the model takes it. For isolated packing `attention_mask` is None and `position_ids`
    restart at 0 at every row: transformers then builds a block-diagonal causal mask from the positions
    (masking_utils.find_packed_sequence_indices), so no token attends to another row of its pack.
    Otherwise `position_ids` is None and the model numbers positions itself. `facts`: what the host knows
    of these tensors (HostFacts), None where a caller built the tensors without them."""
    input_ids: object
    attention_mask: object
    labels: object
    position_ids: object = None
    facts: HostFacts | None = None


def collate(data: TokenizedData, units: list[np.ndarray], pad_id: int, isolate: bool = False) -> Batch:
    """Right-padded tensors of the given units. Rows of a pack are concatenated; with `isolate` each row
    gets its own positions (and attends only to itself), else attention spans the rows of a pack."""
    return collate_sequences([[data.row(int(i)) for i in unit] for unit in units], pad_id, isolate)


def collate_sequences(rows: list[list[tuple[np.ndarray, np.ndarray]]], pad_id: int, isolate: bool = False) -> Batch:
    """`collate` of sequences given as (token ids, target mask), the sequences of each row concatenated."""
    import torch

    seqs = [(np.concatenate([ids for ids, _ in parts]), np.concatenate([mask for _, mask in parts]),
             [len(ids) for ids, _ in parts]) for parts in rows]
    width = max(len(ids) for ids, _, _ in seqs)
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    labels = np.full((len(seqs), width), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((len(seqs), width), dtype=np.int64)
    positions = np.zeros((len(seqs), width), dtype=np.int64)
    segments = []
    for j, (ids, mask, row_lengths) in enumerate(seqs):
        input_ids[j, :len(ids)] = ids
        labels[j, :len(ids)] = np.where(mask, ids, IGNORE_INDEX)
        if isolate:  # padding is a segment of its own (positions from 0 again): no row attends to it
            segments.append(tuple(n for n in [*row_lengths, width - len(ids)] if n))
            positions[j] = np.concatenate([np.arange(n) for n in segments[-1]])
        else:
            attention[j, :len(ids)] = 1
    if isolate:
        return Batch(torch.from_numpy(input_ids), None, torch.from_numpy(labels), torch.from_numpy(positions),
                     HostFacts.of_labels(labels, tuple(segments)))
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(attention), torch.from_numpy(labels),
                 facts=HostFacts.of_labels(labels))


def pack_isolated(seqs: list[tuple[np.ndarray, np.ndarray]], pad_id: int, pack_length: int) -> Batch:
    """Sequences (token ids, target mask) packed in order, greedily, into rows of at most `pack_length`
    tokens (TRL's padding-free batch, cut where a row is full), each attending only to itself; the facts
    give each sequence's target count (`HostFacts.sequences`), for a value per sequence."""
    lengths = [len(ids) for ids, _ in seqs]
    cuts = greedy_cuts(lengths, pack_length)
    batch = collate_sequences([seqs[a:b] for a, b in cuts], pad_id, isolate=True)
    targets = batch.facts.targets
    counts = tuple(int(targets[j, start:start + n].sum()) for j, (a, b) in enumerate(cuts)
                   for start, n in zip(np.cumsum([0, *lengths[a:b - 1]]), lengths[a:b]))
    return batch._replace(facts=HostFacts(targets, batch.facts.segments, counts))


def unit_targets(data: TokenizedData, units: list[np.ndarray]) -> int:
    return int(sum(int(data.row_targets[u].sum()) for u in units))


def unit_tokens(data: TokenizedData, units: list[np.ndarray]) -> int:
    return int(sum(int(data.lengths[u].sum()) for u in units))


class PairBatch(NamedTuple):
    """A micro-batch of B pairs as 2B sequences, chosen first; `rows`: each sequence's cache row (a host
    array: the precomputed reference reads it, never the device); `facts`: data.HostFacts. Packed
    (`attention_mask` None): the sequences in that order in rows of at most the pack length, each attending
    only to itself; the model's position ids come from `facts.segments` (`loss.model_inputs`)."""
    input_ids: object
    attention_mask: object
    labels: object
    rows: np.ndarray
    facts: HostFacts


def collate_pairs(data: TokenizedData, units: np.ndarray, pad_id: int, pack_length: int | None = None) -> PairBatch:
    """Units of two rows (preference pairs) as one batch, every unit's first row (chosen) first; with
    `pack_length` (data.packing: isolated) the 2B sequences packed in that order, greedily, into rows of at
    most `pack_length` tokens (TRL's padding-free batch, cut where a row is full): no padding but the last
    row's, and the same per-sequence log-probs."""
    rows = np.concatenate([units[:, 0], units[:, 1]]).astype(np.int64)
    if pack_length is None:
        batch = collate(data, rows.reshape(-1, 1), pad_id)
        return PairBatch(batch.input_ids, batch.attention_mask, batch.labels, rows, batch.facts)
    batch = pack_isolated([data.row(int(r)) for r in rows], pad_id, pack_length)
    return PairBatch(batch.input_ids, None, batch.labels, rows, batch.facts)
