"""Data mixtures in process: the blended order (shares, world-size freedom, seeking, a changed mix,
packing), the config's checks and the resume fingerprint, and the per-token losses the per-source
metrics are made of."""
import json

import numpy as np
import pytest
import torch

from ds_finetune.state import TrainState
from ds_finetune.config import validate_config
from ds_finetune.data.blend import Blend, greedy_period, integer_shares, name_key, permuted
from ds_finetune.data.cache import TokenizedData
from ds_finetune.data.mixture import MixedData, MixtureOrder
from ds_finetune.errors import UserError
from ds_finetune.fingerprint import changed_exact_keys, config_fingerprint
from ds_finetune.fused_head import _chunked_ce
from ds_finetune.sampler import BatchLayout

SEED = 1234


def source(rows: int, row_len: int = 5, targets: int = 3) -> TokenizedData:
    lengths = np.full(rows, row_len, np.int32)
    arrays = {"input_ids": np.arange(rows * row_len, dtype=np.int32) % 97, "target_mask": np.ones(rows * row_len, bool),
              "offsets": np.arange(rows + 1, dtype=np.int64) * row_len, "lengths": lengths,
              "row_targets": np.full(rows, targets, np.int32), "row_ids": np.arange(rows, dtype=np.int64)}
    return TokenizedData(arrays, f"hash{rows}", 0)


def mixture(sizes=(5000, 3000, 40), names=("chat", "code", "math")) -> MixedData:
    return MixedData(list(names), [source(n) for n in sizes])


def take(order: MixtureOrder, state: TrainState, batch_sizes) -> list[int]:
    """Global rows of consecutive global batches of the given sizes, as the loop takes them."""
    rows = []
    for gb in batch_sizes:
        b = order.batch(state, gb)
        rows += [int(r) for u in b.units for r in u]
        state.advance(b.position, gb, 0)
    return rows


def by_source(data: MixedData, rows) -> dict[int, list[int]]:
    s = data.source_of(np.asarray(rows))
    return {k: [int(r) for r in np.asarray(rows)[s == k]] for k in range(len(data.names))}


# ------------------------------------------------------------------------------------------- the order

def test_realised_shares_hold_within_one_percent_with_a_small_source_cycling():
    data = mixture()  # math: 40 rows at 10 %, so it runs through ~25 source-epochs in 10,000 samples
    rows = take(MixtureOrder(data, [0.6, 0.3, 0.1], SEED, False, 64), TrainState(), [1000] * 10)
    sources = data.source_of(np.asarray(rows))
    for k in range(1, 11):
        shares = np.bincount(sources[:k * 1000], minlength=3) / (k * 1000)
        assert np.abs(shares - [0.6, 0.3, 0.1]).max() <= 0.01, (k, shares)
    math_rows = by_source(data, rows)[2]
    epochs = [math_rows[i:i + 40] for i in range(0, len(math_rows) - 39, 40)]
    assert len(epochs) >= 24
    for epoch in epochs:  # every source-epoch is a permutation of the source: nothing twice, nothing left out
        assert sorted(epoch) == list(range(8000, 8040))
    assert len({tuple(e) for e in epochs}) == len(epochs)  # each source-epoch has its own order


@pytest.mark.parametrize("weights", [[0.6, 0.3, 0.1], [1, 1, 1], [5, 0.25, 2.125], [0.3333333, 0.5, 0.1666667]])
def test_the_greedy_period_is_the_lag_rule_and_ends_with_every_count_at_its_share(weights):
    q = integer_shares(weights)
    assert sum(q) <= 10_000 and min(q) >= 1
    period = greedy_period(q)
    assert np.bincount(period, minlength=len(q)).tolist() == q
    total, counts = sum(q), [0] * len(q)  # Megatron's rule, unconstrained, in exact integers
    for i, s in enumerate(period):
        lags = [qs * (i + 1) - total * c for qs, c in zip(q, counts)]
        assert s == lags.index(max(lags))
        counts[s] += 1
    shares = np.asarray(weights) / sum(weights)
    assert np.abs(np.asarray(q) / total - shares).max() < 1e-4


def test_the_first_5000_samples_are_the_same_on_any_world_size_and_micro_batch():
    """The order is one stream that the loop cuts into global batches: the layout never reaches it.
    Within a global batch the ranks' micro-slices cover it exactly (BatchLayout)."""
    data = mixture()
    runs = {}
    for micro, accum, world in [(1, 1, 1), (4, 2, 1), (2, 1, 2), (3, 2, 2), (1, 3, 4), (2, 2, 4)]:
        layout = BatchLayout(micro, accum, world)
        gb = layout.global_batch
        order = MixtureOrder(data, [0.6, 0.3, 0.1], SEED, False, 64)
        state, ids = TrainState(), []
        while len(ids) < 5000:
            b = order.batch(state, gb)
            per_rank = [b.units[layout.micro_slice(0, m, r)] for m in range(accum) for r in range(world)]
            ids += [int(x) for part in per_rank for u in part for x in data.row_ids[u]]
            state.advance(b.position, gb, 0)
        runs[(micro, accum, world)] = ids[:5000]
    first = next(iter(runs.values()))
    assert all(ids == first for ids in runs.values())
    # ... and it is the arithmetic of blend.py: sample i is the next row of the source period[i % Q] picks.
    blend, counts = Blend([0.6, 0.3, 0.1]), [0, 0, 0]
    for i, got in enumerate(first[:2000]):
        s = int(blend.period[i % len(blend.period)])
        n = data.parts[s].num_rows
        epoch, pos = divmod(counts[s], n)
        counts[s] += 1
        local = int(permuted(np.array([pos]), n, SEED, name_key(data.names[s]), epoch)[0])
        assert got == int(data.row_ids[data.bases[s] + local])


def test_resuming_from_the_saved_position_continues_the_same_stream_and_costs_no_replay():
    data = mixture()
    ref = take(MixtureOrder(data, [0.6, 0.3, 0.1], SEED, False, 64), TrainState(), [24] * 40)
    state = TrainState()
    first = take(MixtureOrder(data, [0.6, 0.3, 0.1], SEED, False, 64), state, [24] * 15)
    saved = TrainState.from_manifest({"trainer_state": json.loads(json.dumps(state.to_manifest()))})
    assert saved.mix["n"] == 15 * 24 and len(saved.mix["cursors"]) == 3  # the whole position: O(sources)
    assert first + take(MixtureOrder(data, [0.6, 0.3, 0.1], SEED, False, 64), saved, [24] * 25) == ref
    # The position computed from the sample count alone is the one the stream reached.
    order = MixtureOrder(data, [0.6, 0.3, 0.1], SEED, False, 64)
    computed = TrainState(consumed_samples=15 * 24, mix=order.position_at(15 * 24))
    assert first + take(order, computed, [24] * 25) == ref
    # Far into a run: the blend's counts come from one period, not from replaying the samples.
    assert Blend([0.6, 0.3, 0.1]).counts(5_000_003).tolist() == [3_000_002, 1_500_001, 500_000]


def pair_source(pairs: int) -> TokenizedData:
    """A preference source: pair p is rows 2p (chosen) and 2p+1 (rejected), both with row id p."""
    data = source(2 * pairs)
    data.row_ids = np.repeat(np.arange(pairs, dtype=np.int64), 2)
    data.rows_per_unit = 2
    return data


def test_a_mixture_of_pair_sources_draws_whole_pairs_counted_by_weight():
    """Pair objectives on data.sources: a unit is a pair of one source (its chosen row, then its rejected row),
    the weights count pairs, each source's pairs come once per source-epoch, and the position seeks without
    replay as for rows."""
    data = MixedData(["a", "b"], [pair_source(300), pair_source(50)])
    order = MixtureOrder(data, [0.75, 0.25], SEED, False, 64)
    state, units = TrainState(), []
    for _ in range(10):
        batch = order.batch(state, 40)
        assert batch.units.shape == (40, 2)
        units += batch.units.tolist()
        state.advance(batch.position, 40, 0)
    units = np.asarray(units)
    assert (units[:, 1] == units[:, 0] + 1).all() and (units[:, 0] % 2 == 0).all()  # every base is even
    sources = data.source_of(units[:, 0])
    assert (sources == data.source_of(units[:, 1])).all()
    assert np.bincount(sources).tolist() == [300, 100]  # 400 pairs at 3:1
    b_pairs = units[sources == 1, 0] - data.bases[1]
    assert sorted(b_pairs[:50] // 2) == list(range(50)) and sorted(b_pairs[50:] // 2) == list(range(50))
    assert sorted(units[sources == 0, 0] // 2) == list(range(300))  # source a: one whole source-epoch
    assert order.sample_ids(units[:3]) == [int(data.row_ids[u[0]]) for u in units[:3]]  # one id a pair
    seeked = TrainState(consumed_samples=200, mix=order.position_at(200))
    assert order.batch(seeked, 40).units.tolist() == units[200:240].tolist()


def test_a_changed_mix_continues_each_source_from_its_cursor_with_the_new_shares():
    data = mixture(sizes=(3000, 3000, 3000))
    state = TrainState()
    before = take(MixtureOrder(data, [0.6, 0.3, 0.1], SEED, False, 64), state, [100] * 10)
    state.step = 10
    new = MixtureOrder(data, [0.2, 0.2, 0.6], SEED, False, 64)
    after = take(new, state, [100] * 30)
    assert state.mix["changed_at"] == [10] and state.mix["weights"] == {"chat": 0.2, "code": 0.2, "math": 0.6}
    shares = np.bincount(data.source_of(np.asarray(after)), minlength=3) / len(after)
    assert np.abs(shares - [0.2, 0.2, 0.6]).max() <= 0.01
    seen, now = by_source(data, before), by_source(data, after)
    for s in range(3):  # all within source-epoch 0 (3000 rows each): nothing seen twice, and it continues
        assert len(seen[s]) + len(now[s]) <= 3000
        assert not set(seen[s]) & set(now[s])
        n = data.parts[s].num_rows
        expected = permuted(np.arange(len(seen[s]) + len(now[s])), n, SEED, name_key(data.names[s]), 0)
        assert seen[s] + now[s] == (expected + data.bases[s]).tolist()


def test_an_added_source_starts_at_its_beginning_and_the_others_keep_their_cursors():
    two = MixedData(["chat", "code"], [source(500), source(500)])
    state = TrainState()
    take(MixtureOrder(two, [1, 1], SEED, False, 64), state, [50] * 4)
    three = MixedData(["chat", "code", "math"], [source(500), source(500), source(500)])
    mix = MixtureOrder(three, [1, 1, 1], SEED, False, 64).position(state.mix, 4)
    assert mix["cursors"] == {"chat": [0, 100], "code": [0, 100], "math": [0, 0]} and mix["n"] == 0


def test_packs_hold_rows_of_one_source_and_each_source_epoch_whole():
    parts = [source(300, row_len=7), source(200, row_len=20), source(50, row_len=33)]
    data = MixedData(["a", "b", "c"], parts)
    order = MixtureOrder(data, [0.5, 0.3, 0.2], SEED, True, 64)
    state, packs = TrainState(), []
    for _ in range(40):
        b = order.batch(state, 16)
        packs += list(b.units)
        state.advance(b.position, 16, 0)
    for pack in packs:
        assert len(set(data.source_of(pack).tolist())) == 1
        assert sum(int(data.lengths[r]) for r in pack) <= 64 or len(pack) == 1
    c_rows = [int(r) for p in packs if data.source_of(p[0]) == 2 for r in p]
    assert sorted(c_rows[:50]) == list(range(500, 550))  # one pack per row (33 tokens): a whole source-epoch
    assert order.epoch_units == 300 // 9 + (300 % 9 > 0) + 200 // 3 + (200 % 3 > 0) + 50


def test_epochs_of_a_mixture_count_the_samples_all_sources_hold():
    class Train:
        epochs, max_steps = 2, None
    order = MixtureOrder(mixture(), [0.6, 0.3, 0.1], SEED, False, 64)
    assert order.epoch_units == 8040
    assert order.total_steps(Train, 16) == 2 * 8040 // 16
    Train.max_steps = 7
    assert order.total_steps(Train, 16) == 7


def test_the_permutation_is_a_bijection_for_any_size():
    for n in [1, 2, 3, 5, 64, 65, 1000, 4097]:
        assert sorted(permuted(np.arange(n), n, 7, 3, 1).tolist()) == list(range(n))
    assert permuted(np.arange(100), 100, 7, 3, 1).tolist() != permuted(np.arange(100), 100, 7, 3, 2).tolist()


# ------------------------------------------------------------------------------------ config, resume

BASE = {"model": {"config": {"model_type": "llama"}, "tokenizer": "t"}, "train": {"max_steps": 1}, "output_dir": "o"}


def cfg_with(data: dict, **sections):
    return validate_config({**BASE, "data": data, **sections})


def sources(*weights, names=("chat", "code")):
    return [{"path": f"{n}.jsonl", "weight": w} for n, w in zip(names, weights)]


@pytest.mark.parametrize("data, needle", [
    ({"path": "x.jsonl", "sources": sources(1, 1)}, "set exactly one of data.path or data.sources"),
    ({"sources": sources(0, 1)}, "data.sources.0.weight: Input should be greater than 0"),
    ({"sources": sources(-1, 1)}, "data.sources.0.weight"),
    ({"sources": sources("lots", 1)}, "data.sources.0.weight: Input should be a valid number"),
    ({"sources": sources(True, 1)}, "data.sources.0.weight"),
    ({"sources": sources(1, 1, names=("a", "a"))}, "duplicate source name 'a'"),
    ({"sources": [{"path": "my data.jsonl", "weight": 1}]}, "source name 'my data' is not a valid metric key"),
    ({"sources": []}, "data.sources: list at least one source"),
    ({"sources": [{"weight": 1}]}, "data.sources.0.path: required key is missing"),
    ({}, "set exactly one of data.path or data.sources"),
])
def test_bad_mixtures_are_one_line_errors_naming_the_key(data, needle):
    with pytest.raises(UserError) as e:
        cfg_with(data)
    assert needle in e.value.message and "\n" not in e.value.message and e.value.exit_code == 2


def test_a_held_out_fraction_of_a_mixture_is_refused():
    with pytest.raises(UserError, match="set eval.path or eval.sources, not eval.fraction, with data.sources"):
        cfg_with({"sources": sources(1, 1)}, eval={"fraction": 0.1})


def test_sources_inherit_the_data_sections_settings_and_are_prepared_as_one_file_each():
    cfg = cfg_with({"format": "chat", "max_length": 64, "sources": [
        {"path": "a/chat.jsonl", "weight": 2}, {"path": "code", "weight": 1, "format": "text", "name": "c0de"}]})
    (n1, w1, a), (n2, w2, b) = cfg.data.source_configs()
    assert (n1, w1, a.path, a.format, a.max_length, a.sources) == ("chat", 2, "a/chat.jsonl", "chat", 64, None)
    assert (n2, b.format, b.max_length) == ("c0de", "text", 64)
    assert "sources" not in a.settings(exclude=set())  # a source's cache key is that of a one-file run


def test_a_changed_weight_or_an_added_source_is_named_at_resume():
    hashes = {"chat": "a" * 64, "code": "b" * 64, "math": "c" * 64}
    saved = config_fingerprint(cfg_with({"sources": sources(0.7, 0.3)}), 8, hashes)
    assert changed_exact_keys(saved, config_fingerprint(cfg_with({"sources": sources(0.7, 0.3)}), 8, hashes)) == []
    assert changed_exact_keys(saved, config_fingerprint(cfg_with({"sources": sources(0.5, 0.3)}), 8, hashes)) == [
        "data.sources.chat.weight"]
    added = cfg_with({"sources": sources(0.7, 0.3, 0.1, names=("chat", "code", "math"))})
    assert changed_exact_keys(saved, config_fingerprint(added, 8, hashes)) == ["data.sources.math",
                                                                                "data.sources.math.weight"]
    other = {**hashes, "code": "d" * 64}
    assert changed_exact_keys(saved, config_fingerprint(cfg_with({"sources": sources(0.7, 0.3)}), 8, other)) == [
        "data.sources.code"]


# ------------------------------------------------------------------------------- per-source losses

def test_token_losses_sum_to_the_loss_and_leave_it_bitwise_unchanged():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=g), torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (37,), generator=g)
    plain = _chunked_ce(hidden, weight, None, targets, 8, True, True)
    buffer = torch.empty(37)
    with_tokens = _chunked_ce(hidden, weight, None, targets, 8, True, True, token_losses=buffer)
    assert torch.equal(plain[0], with_tokens[0]) and torch.equal(plain[1], with_tokens[1])
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="none")
    assert torch.allclose(buffer, expected, atol=1e-5)
    assert float(buffer.double().sum()) == pytest.approx(float(plain[0]), rel=1e-6)
