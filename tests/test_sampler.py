"""Batches: one permutation per epoch from (seed, epoch) alone; optimizer step g takes the next
`global_batch` entries; each rank and micro-step takes a fixed slice; the position is (epoch, offset) and
seeking to it is O(1); a last partial global batch is dropped (documented in the module docstring)."""

from __future__ import annotations

import inspect
import random

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_finetune import sampler
from ds_finetune.sampler import BatchLayout, epoch_permutation, steps_in_epoch
from harness import step_slice

# Splits of one global batch of 16: (micro_batch_size, grad_accum, world_size).
SPLITS_OF_16 = [(16, 1, 1), (8, 2, 1), (4, 4, 1), (2, 8, 1), (1, 16, 1),
                (8, 1, 2), (4, 2, 2), (2, 4, 2), (1, 8, 2),
                (4, 1, 4), (2, 2, 4), (1, 4, 4)]


def taken_in_step(order: np.ndarray, layout: BatchLayout, offset: int) -> list[list[int]]:
    """What each (micro-step, rank) takes in the step starting at `offset`, micro-step-major then rank."""
    taken = []
    for m in range(layout.grad_accum):
        for r in range(layout.world_size):
            part = order[layout.micro_slice(offset, m, r)]
            assert len(part) == layout.micro_batch_size, "a micro-batch ran past the end of the epoch order"
            taken.append(part.tolist())
    return taken


def epoch_stream(order: np.ndarray, layout: BatchLayout, start_step: int = 0) -> list[int]:
    """The concatenation of what every rank takes at every micro-step, from `start_step` to the epoch end."""
    out = []
    for step in range(start_step, steps_in_epoch(len(order), layout.global_batch)):
        for part in taken_in_step(order, layout, step * layout.global_batch):
            out.extend(part)
    return out


def run_positions(num_items: int, layout: BatchLayout, seed: int, epochs: int, start=(0, 0)) -> list:
    """Mirrors the loop in train.fit: (epoch, offset) advances by one global batch per step; an epoch ends
    when the next step would not be full. Returns (epoch, offset, entries of the step) per step."""
    epoch, offset = start
    steps, gb = [], layout.global_batch
    while epoch < epochs:
        order = epoch_permutation(num_items, seed, epoch)
        if offset + gb > len(order):
            epoch, offset = epoch + 1, 0
            continue
        steps.append((epoch, offset, sum(taken_in_step(order, layout, offset), [])))
        offset += gb
    return steps


# ------------------------------------------------------------------------------------------ one epoch

def test_every_unit_is_seen_once_per_epoch_and_only_the_last_partial_batch_is_dropped():
    order = epoch_permutation(103, seed=7, epoch=0)
    layout = BatchLayout(micro_batch_size=4, grad_accum=2, world_size=3)  # global batch 24
    assert layout.global_batch == 24
    assert steps_in_epoch(103, 24) == 4

    seen = epoch_stream(order, layout)
    assert len(seen) == 96 and len(set(seen)) == 96  # no entry twice
    dropped = sorted(set(range(103)) - set(seen))
    assert len(dropped) == 103 % 24 == 7
    assert dropped == sorted(order[96:].tolist())  # exactly the tail of the epoch's order


def test_an_exact_multiple_of_the_global_batch_drops_nothing():
    order = epoch_permutation(96, seed=7, epoch=3)
    seen = epoch_stream(order, BatchLayout(4, 2, 3))
    assert sorted(seen) == list(range(96))


def test_fewer_units_than_one_global_batch_give_no_step():
    assert steps_in_epoch(7, 8) == 0
    assert epoch_stream(epoch_permutation(7, 0, 0), BatchLayout(4, 2, 1)) == []


def test_dropping_the_last_partial_batch_is_documented():
    doc = " ".join(sampler.__doc__.lower().split())
    assert "a last partial global batch of an epoch is dropped" in doc


def test_dropped_rows_differ_between_epochs():
    layout = BatchLayout(4, 2, 1)
    dropped = [frozenset(epoch_permutation(100, 5, e)[steps_in_epoch(100, 8) * 8:].tolist()) for e in range(4)]
    assert all(len(d) == 4 for d in dropped)
    assert len(set(dropped)) == 4
    assert epoch_stream(epoch_permutation(100, 5, 0), layout) != epoch_stream(epoch_permutation(100, 5, 1), layout)


# ------------------------------------------------------------------------------------- world-size free

def test_global_order_is_the_same_for_every_world_size_and_micro_accum_split():
    order = epoch_permutation(77, seed=1234, epoch=2)
    expected = order[:4 * 16].tolist()  # 77 // 16 = 4 steps, in the epoch order
    for micro, accum, world in SPLITS_OF_16:
        layout = BatchLayout(micro, accum, world)
        assert layout.global_batch == 16
        assert epoch_stream(order, layout) == expected, (micro, accum, world)


def test_each_steps_entries_are_exactly_its_step_slice():
    order = epoch_permutation(70, seed=3, epoch=1)
    for micro, accum, world in SPLITS_OF_16:
        layout = BatchLayout(micro, accum, world)
        for step in range(steps_in_epoch(70, 16)):
            offset = step * 16
            taken = taken_in_step(order, layout, offset)
            flat = [x for part in taken for x in part]
            assert flat == order[step_slice(layout, offset)].tolist()
            assert len(set(flat)) == 16  # the micro slices do not overlap


def test_micro_slice_is_micro_step_major_then_rank():
    layout = BatchLayout(micro_batch_size=2, grad_accum=3, world_size=2)
    assert layout.micro_slice(24, 0, 0) == slice(24, 26)
    assert layout.micro_slice(24, 0, 1) == slice(26, 28)
    assert layout.micro_slice(24, 1, 0) == slice(28, 30)
    assert layout.micro_slice(24, 2, 1) == slice(34, 36)
    assert step_slice(layout, 24) == slice(24, 36)


def test_a_rank_sees_the_same_rows_whatever_else_runs_beside_it():
    """Rank r's slice depends on (offset, micro-step, rank) only: no hidden state from earlier calls."""
    layout = BatchLayout(4, 2, 2)
    first = layout.micro_slice(10**12, 1, 1)
    for m in range(2):
        for r in range(2):
            layout.micro_slice(8 * m, m, r)
    assert layout.micro_slice(10**12, 1, 1) == first == slice(10**12 + 12, 10**12 + 16)


# ------------------------------------------------------------------------------------------------ seek

def test_seeking_to_step_k_gives_exactly_the_tail_of_the_epoch():
    order = epoch_permutation(90, seed=11, epoch=0)
    layout = BatchLayout(2, 3, 2)  # global batch 12, 7 steps, 6 dropped
    full = epoch_stream(order, layout)
    assert len(full) == 84
    for k in range(steps_in_epoch(90, 12) + 1):
        assert epoch_stream(order, layout, start_step=k) == full[k * 12:]


def test_resuming_from_any_saved_position_continues_the_same_sequence_across_epochs():
    layout = BatchLayout(3, 2, 2)  # global batch 12; 50 units -> 4 steps per epoch, 2 dropped
    full = run_positions(50, layout, seed=99, epochs=3)
    assert len(full) == 12
    assert [(e, o) for e, o, _ in full[3:6]] == [(0, 36), (1, 0), (1, 12)]
    for i, (epoch, offset, _) in enumerate(full):
        assert run_positions(50, layout, seed=99, epochs=3, start=(epoch, offset)) == full[i:]
    # The state saved after the last step of an epoch, (epoch, 48), rolls over to the next epoch.
    assert run_positions(50, layout, seed=99, epochs=3, start=(0, 48)) == full[4:]


def test_resuming_at_another_world_size_keeps_the_data_order():
    full = [s[2] for s in run_positions(64, BatchLayout(4, 2, 1), seed=1, epochs=2)]
    after_resume = [s[2] for s in run_positions(64, BatchLayout(2, 1, 4), seed=1, epochs=2, start=(0, 24))]
    assert after_resume == full[3:]


# --------------------------------------------------------------------------------------- permutations

def test_the_epoch_order_is_a_permutation():
    order = epoch_permutation(1000, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(1000))
    assert order.tolist() != list(range(1000))


PINNED_1234_0 = [8, 9, 5, 0, 2, 6, 4, 7, 1, 3]
PINNED_1234_1 = [1, 4, 0, 5, 2, 8, 9, 7, 6, 3]


def test_the_epoch_order_is_pinned():
    """Checkpoints store an offset into this order: it must never change between versions."""
    assert epoch_permutation(10, seed=1234, epoch=0).tolist() == PINNED_1234_0
    assert epoch_permutation(10, seed=1234, epoch=1).tolist() == PINNED_1234_1


def test_permutations_differ_between_epochs_and_seeds():
    orders = {(s, e): tuple(epoch_permutation(64, s, e).tolist()) for s in range(5) for e in range(5)}
    assert len(set(orders.values())) == 25
    # Swapping seed and epoch is a different stream too.
    assert orders[(1, 2)] != orders[(2, 1)]


def test_permutation_depends_on_seed_and_epoch_only():
    assert list(inspect.signature(epoch_permutation).parameters) == ["num_items", "seed", "epoch"]
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    a = epoch_permutation(200, 42, 3)
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    np.random.rand(17), random.random(), torch.rand(5)
    before = np.random.get_state()[1].copy()
    b = epoch_permutation(200, 42, 3)
    assert a.tolist() == b.tolist()
    # Drawing the order leaves the global RNGs alone, so it cannot shift dropout or init streams either.
    assert np.array_equal(np.random.get_state()[1], before)


def test_sampler_imports_nothing_of_ours():
    source = inspect.getsource(sampler)
    assert "ds_finetune" not in source.replace("ds_finetune.sampler", "")


# ---------------------------------------------------------------------------------------- properties

@settings(max_examples=300, deadline=None)
@given(num_items=st.integers(0, 300), micro=st.integers(1, 8), accum=st.integers(1, 4), world=st.integers(1, 8),
       seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 10_000), data=st.data())
def test_order_properties(num_items, micro, accum, world, seed, epoch, data):
    layout = BatchLayout(micro, accum, world)
    gb = micro * accum * world
    order = epoch_permutation(num_items, seed, epoch)
    assert sorted(order.tolist()) == list(range(num_items))

    steps = steps_in_epoch(num_items, gb)
    assert steps * gb <= num_items < (steps + 1) * gb
    stream = epoch_stream(order, layout)
    # Every unit at most once; exactly num_items % gb dropped, and they are the tail of the order.
    assert stream == order[:steps * gb].tolist()
    assert len(set(stream)) == len(stream) == num_items - num_items % gb

    # The same global batch split any other way (here: one rank, one micro-step) gives the same order.
    assert epoch_stream(order, BatchLayout(gb, 1, 1)) == stream
    assert epoch_stream(order, BatchLayout(micro * world, accum, 1)) == stream

    for step in range(steps):
        flat = [x for part in taken_in_step(order, layout, step * gb) for x in part]
        assert flat == order[step_slice(layout, step * gb)].tolist()

    k = data.draw(st.integers(0, steps), label="seek to step")
    assert epoch_stream(order, layout, start_step=k) == stream[k * gb:]

    if num_items >= 20:  # 20! orders: a collision would be a bug, not chance
        assert order.tolist() != epoch_permutation(num_items, seed, epoch + 1).tolist()
        assert order.tolist() != epoch_permutation(num_items, (seed + 1) % 2**32, epoch).tolist()
    assert epoch_permutation(num_items, seed, epoch).tolist() == order.tolist()
