"""A data mixture: several tokenized sources seen as one (`MixedData`), and the order that draws each
sample from one of them by weight (`MixtureOrder`, the arithmetic is in blend.py).

The position in a mixture is small and JSON-able (`TrainState.mix`): the weights in force, how many samples
were drawn under them (`n`), and each source's cursor `[source-epoch, position in its permutation]`.
Everything else follows from the seed, the weights and the sources' sizes, never from the world size or
the batch layout: the order is one stream of samples that the loop cuts into global batches.
"""

from __future__ import annotations

import numpy as np

from ds_finetune.data.blend import Blend, name_key, permuted
from ds_finetune.data.cache import TokenizedData
from ds_finetune.data.packing import StepBatch
from ds_finetune.errors import UserError


class _Concat:
    """Arrays of the sources indexed as one (a global row is a source's base + its local row), plus an
    offset per source; nothing is copied, so memory does not grow with the rows."""

    def __init__(self, parts: list, bases: np.ndarray, add: list[int]):
        self.parts, self.bases, self.add = parts, bases, add
        self.dtype = np.result_type(*(p.dtype for p in parts))

    def __getitem__(self, rows):
        rows = np.asarray(rows)
        part = np.searchsorted(self.bases, rows, side="right") - 1
        if rows.ndim == 0:
            return self.parts[part][rows - self.bases[part]] + self.add[part]
        out = np.empty(rows.shape, self.dtype)
        for p in np.unique(part):
            sel = part == p
            out[sel] = np.asarray(self.parts[p][rows[sel] - self.bases[p]]) + self.add[p]
        return out


class MixedData:
    """The sources' tokenized rows as one TokenizedData-like view: source s holds global rows
    bases[s] .. bases[s+1]-1. `row_ids` are made unique by adding the row ids of the sources before."""

    def __init__(self, names: list[str], parts: list[TokenizedData]):
        self.names, self.parts = names, parts
        # Rows (or packs of rows), or groups of rows where every source has them in groups (preference pairs).
        assert len({p.rows_per_unit for p in parts}) == 1, "the config checks that every source has one format"
        self.rows_per_unit = parts[0].rows_per_unit
        self.bases = np.cumsum([0] + [p.num_rows for p in parts])
        id_base = np.cumsum([0] + [int(p.row_ids[-1]) + 1 for p in parts]).tolist()
        self.lengths = self.joined([p.lengths for p in parts])
        self.row_targets = self.joined([p.row_targets for p in parts])
        self.row_ids = _Concat([p.row_ids for p in parts], self.bases, id_base)
        self.row_labels = None if parts[0].row_labels is None else self.joined([p.row_labels for p in parts])
        has_margins = any(p.row_margins is not None for p in parts)  # a source without them: margin 0, as alone
        self.row_margins = None if not has_margins else self.joined([
            np.zeros(p.num_rows, np.float32) if p.row_margins is None else p.row_margins for p in parts])
        self.content_hash = {n: p.content_hash for n, p in zip(names, parts)}
        self.skipped_rows = sum(p.skipped_rows for p in parts)
        self.truncated_pairs = sum(p.truncated_pairs for p in parts)

    @property
    def num_rows(self) -> int:
        return int(self.bases[-1])

    def joined(self, arrays: list):
        """One array-like over the global rows from one array a source over its rows (a view, not a copy)."""
        return _Concat(arrays, self.bases, [0] * len(arrays))

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.source_of(i)
        return self.parts[s].row(int(i - self.bases[s]))

    def row_columns(self, i: int) -> dict:
        s = self.source_of(i)
        return self.parts[s].row_columns(int(i - self.bases[s]))

    def source_of(self, rows):
        """The source index of each global row."""
        return np.searchsorted(self.bases, rows, side="right") - 1


class MixtureOrder:
    """Draws every sample from one source by weight (blend.py), and within a source takes the next unit
    of its permutation: one row, a group of rows (a preference pair: the data's `rows_per_unit`), or a
    greedy pack of the next rows (a pack never holds rows of two sources or two source-epochs). A new
    source-epoch starts when a source runs out.

    One epoch of the mixture is as many samples as the sources hold together (rows, or the packs of each
    source's first source-epoch); `train.epochs` counts those."""

    def __init__(self, data: MixedData, weights: list[float], seed: int, packing: bool, max_length: int):
        self.k = data.rows_per_unit
        # Grouped rows (pairs) are packed within a micro-batch (packing.collate_pairs), not in the order.
        self.data, self.seed, self.packing, self.max_length = data, seed, packing and self.k == 1, max_length
        self.weights = dict(zip(data.names, (float(w) for w in weights)))
        self.blend = Blend(weights)
        self.keys = [name_key(n) for n in data.names]
        self.epoch_units = sum(self._units_in_first_epoch(s) for s in range(len(data.names)))

    # -------------------------------------------------------------------------------- the loop's seam

    def total_steps(self, train, global_batch: int) -> int:
        if train.epochs is None:
            return train.max_steps
        steps = train.epochs * self.epoch_units // global_batch
        if steps == 0:
            raise UserError(f"data error: data.sources: {train.epochs} epoch(s) of the mixture are "
                            f"{train.epochs * self.epoch_units} samples, fewer than one global batch "
                            f"({global_batch}); add data, raise train.epochs or lower the batch size")
        return min(steps, train.max_steps) if train.max_steps else steps

    def batch(self, state, global_batch: int) -> StepBatch:
        """The next global batch from the position in `state` (a mixture never runs out)."""
        mix = self.position(state.mix, state.step)
        sources = self.blend.sources(mix["n"], global_batch)
        cursors = dict(mix["cursors"])
        units = np.empty((global_batch, self.k), np.int64) if not self.packing else [None] * global_batch
        for s in np.unique(sources):
            where = np.flatnonzero(sources == s)
            name = self.data.names[s]
            taken, cursors[name] = self._take(int(s), cursors[name], len(where))
            for i, unit in zip(where, taken):
                units[i] = unit
        consumed = state.consumed_samples + global_batch
        return StepBatch(units, {"epoch": consumed // self.epoch_units, "offset": consumed % self.epoch_units,
                                 "mix": {**mix, "n": mix["n"] + global_batch, "cursors": cursors}})

    def sample_ids(self, units) -> list[int]:
        """The (mixture-unique) dataset row ids of `units` (one a group: a pair's rows share it), for metrics.jsonl."""
        return [int(x) for u in units for x in self.data.row_ids[u[:1] if self.k > 1 else u]]

    def position(self, mix: dict, step: int) -> dict:
        """The position to continue from: the saved one, or, when the weights (or the sources) differ from
        the saved ones (--allow-config-change), a new segment from the next sample on: each source keeps
        its cursor, a new source starts at its beginning, and the step is remembered."""
        if mix.get("weights") == self.weights:
            return mix
        saved = mix.get("cursors", {})
        return {"weights": self.weights, "n": 0,
                "cursors": {name: list(saved.get(name, [0, 0])) for name in self.data.names},
                "changed_at": mix.get("changed_at", []) + ([step] if mix else [])}

    def position_at(self, n: int) -> dict:
        """The position after the first n samples of a run with these weights from the start, computed
        rather than replayed: O(period + sources). Rows only: a pack's rows depend on the packs before it."""
        assert not self.packing, "a packed mixture's position is only known by taking its packs"
        counts = self.blend.counts(n)
        return {"weights": self.weights, "n": n, "changed_at": [],
                "cursors": {name: list(divmod(int(c), self._size(s)))
                            for s, (name, c) in enumerate(zip(self.data.names, counts))}}

    # ------------------------------------------------------------------------------------ one source

    def _take(self, s: int, cursor: list, count: int) -> tuple[list, list]:
        """`count` units of source s from `cursor` ([source-epoch, position]); the cursor after them."""
        epoch, pos = cursor
        n = self._size(s)
        units = []
        while len(units) < count:
            if pos >= n:  # the source-epoch is done (or the source shrank under --allow-config-change)
                epoch, pos = epoch + 1, 0
            if self.packing:
                pack = self._pack(s, epoch, pos)
                units.append(pack)
                pos += len(pack)
            else:
                k = min(count - len(units), n - pos)
                units.extend(self._groups(s, epoch, pos, pos + k))
                pos += k
        return units, [epoch, pos]

    def _size(self, s: int) -> int:
        """Source s's units a source-epoch without packing: its rows, or its groups of rows."""
        return self.data.parts[s].num_rows // self.k

    def _rows(self, s: int, epoch: int, start: int, stop: int) -> np.ndarray:
        """Global rows at positions start..stop-1 of source s's permutation in `epoch`."""
        local = permuted(np.arange(start, stop), self.data.parts[s].num_rows, self.seed, self.keys[s], epoch)
        return local + self.data.bases[s]

    def _groups(self, s: int, epoch: int, start: int, stop: int) -> np.ndarray:
        """[stop - start, k] global rows of the groups at positions start..stop-1 of source s's permutation of
        its groups (group g is its rows k*g .. k*g + k-1); one-row units where k is 1."""
        groups = permuted(np.arange(start, stop), self._size(s), self.seed, self.keys[s], epoch)
        return self.data.bases[s] + self.k * groups[:, None] + np.arange(self.k)

    def _pack(self, s: int, epoch: int, pos: int) -> np.ndarray:
        """The greedy pack starting at `pos`: the next rows while they fit in max_length (at least one),
        as plan_units packs a single source."""
        n, lengths = self.data.parts[s].num_rows, self.data.parts[s].lengths
        window = 64
        while True:
            stop = min(n, pos + window)
            rows = self._rows(s, epoch, pos, stop)
            fits = int(np.searchsorted(np.cumsum(lengths[rows - self.data.bases[s]]), self.max_length, "right"))
            if fits < stop - pos or stop == n:
                return rows[:max(1, fits)]
            window *= 2

    def _units_in_first_epoch(self, s: int) -> int:
        n = self._size(s)
        if not self.packing:
            return n
        packs, pos = 0, 0
        while pos < n:
            pos += len(self._pack(s, 0, pos))
            packs += 1
        return packs



def mix_change_message(order: MixtureOrder, mix: dict, step: int) -> str | None:
    """What a resume says when the weights changed (--allow-config-change) at some step of the run."""
    changes = order.position(mix, step).get("changed_at", [])
    if not changes:
        return None
    return (f"the data mix changed at step {', '.join(map(str, changes))}; weights now "
            + ", ".join(f"{n}={w:g}" for n, w in order.weights.items()))


class SourceLosses:
    """A mixture's loss per source in a training step, for metrics.jsonl: `loss/<name>` (the global-token mean
    over the source's targets in the step; absent when it had none) and `tokens/<name>` (those targets).
    The loss functions write each target token's loss into a buffer (`buffers`), which is added up by the
    source of its sequence on the device."""

    def __init__(self, data: MixedData):
        self.data = data

    def buffers(self, micro_batches: list, device) -> list:
        """One buffer a micro-batch, for each of its target tokens' losses (row-major)."""
        import torch
        return [torch.empty(int(b.facts.targets.sum()), dtype=torch.float32, device=device) for b in micro_batches]

    def metrics(self, units, mine: list, micro_batches: list, token_losses: list, to_device) -> tuple[dict, dict]:
        """(StepResult.sums, StepResult.counts) of the step over the global batch `units`, of which this
        rank trained the micro-batches `micro_batches` of the units `mine`. `to_device(array)`: host values
        on the losses' device without waiting for it (device_batch.host_to_device)."""
        import torch
        sums = torch.zeros(len(self.data.names), dtype=torch.float64, device=token_losses[0].device)
        for units_of_batch, batch, losses in zip(mine, micro_batches, token_losses):
            sequence_of_token = np.nonzero(batch.facts.targets)[0]
            source = to_device(self._sources(units_of_batch)[sequence_of_token])
            sums.index_add_(0, source, losses.double())
        targets = self.targets(units)
        return ({f"loss/{n}": (sums[s], targets[n]) for s, n in enumerate(self.data.names)},
                {f"tokens/{n}": targets[n] for n in self.data.names})

    def targets(self, units) -> dict:
        """Each source's target tokens in `units`."""
        per_unit = [int(np.sum(self.data.row_targets[u])) for u in units]
        counts = np.bincount(self._sources(units), weights=per_unit, minlength=len(self.data.names))
        return {name: int(n) for name, n in zip(self.data.names, counts)}

    def _sources(self, units) -> np.ndarray:
        return self.data.source_of([int(u[0]) for u in units])  # a unit's rows are of one source
