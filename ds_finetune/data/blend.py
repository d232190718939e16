"""The order of a data mixture as plain arithmetic: which source each sample comes from, and which row of
that source. Imports nothing of ours, like sampler.py, so tests can check it in isolation.

Which source: sample n goes to the source whose realised share lags its weight most (Megatron-LM's
BlendedDataset rule: argmax over s of w_s·(n+1) − count_s(n), ties to the first source). It runs in exact
integer arithmetic on the weights as fractions q_s/Q, so after Q samples every source has had exactly q_s
and the rule starts over: the choice of sample n is `period[n % Q]`, O(1) for any n, and a few Q-sized
arrays are all it keeps.

Which row: each source has one permutation of its rows per source-epoch, drawn from (seed, the source's
name, source-epoch). It is a keyed bijection of [0, rows) evaluated at the positions asked for (cycle
walking over a power of two), so neither memory nor a seek grows with the number of rows.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import numpy as np

MAX_PERIOD = 10_000  # weights are exact to 1/MAX_PERIOD of the samples (finer ones are rounded to it)
_ROUNDS = 6


def integer_shares(weights: list[float]) -> list[int]:
    """Integers q_s with q_s/sum(q) the weights' shares: exact when that needs a period of at most
    MAX_PERIOD samples (decimal weights such as 0.6/0.3/0.1 give 6/3/1), else the largest-remainder
    rounding to MAX_PERIOD, every source keeping at least one sample a period."""
    exact = [Fraction(repr(float(w))) for w in weights]
    shares = [w / sum(exact) for w in exact]
    period = math.lcm(*(s.denominator for s in shares))
    if period <= MAX_PERIOD:
        return [int(s * period) for s in shares]
    raw = [s * MAX_PERIOD for s in shares]
    q = [max(1, math.floor(r)) for r in raw]
    by_remainder = sorted(range(len(q)), key=lambda i: (-(raw[i] - math.floor(raw[i])), i))
    for i in by_remainder[:MAX_PERIOD - sum(q)]:
        q[i] += 1
    while sum(q) > MAX_PERIOD:  # sources raised to 1 are paid for by the largest
        q[q.index(max(q))] -= 1
    g = math.gcd(*q)
    return [x // g for x in q]


class Blend:
    """Which source each sample of a segment (a stretch of the run with fixed weights) comes from."""

    def __init__(self, weights: list[float]):
        self.q = integer_shares(weights)
        self.period = greedy_period(self.q)

    def sources(self, start: int, count: int) -> np.ndarray:
        """The sources of samples start .. start+count-1 of the segment."""
        return self.period[np.arange(start, start + count) % len(self.period)]

    def counts(self, n: int) -> np.ndarray:
        """How many of the segment's first n samples each source gave: O(period), not O(n)."""
        cycles, rest = divmod(n, len(self.period))
        return cycles * np.asarray(self.q, np.int64) + np.bincount(self.period[:rest], minlength=len(self.q))


def greedy_period(q: list[int]) -> np.ndarray:
    """The sources of one period of Q = sum(q) samples by the lag rule, in integers: the lag of source s
    before sample i is (q_s·(i+1) − Q·count_s)/Q. A source that has had its q_s is not chosen again in the
    period, so the period always ends with every count at q_s (the rule alone does too; this makes it so
    by construction)."""
    total, counts = sum(q), [0] * len(q)
    out = np.empty(total, np.int16)
    for i in range(total):
        best, best_lag = 0, None
        for s, qs in enumerate(q):
            if counts[s] < qs:
                lag = qs * (i + 1) - total * counts[s]
                if best_lag is None or lag > best_lag:
                    best, best_lag = s, lag
        out[i] = best
        counts[best] += 1
    return out


# ------------------------------------------------------------------------------------- rows of a source

def name_key(name: str) -> int:
    """A source's key in its permutations: its name, so adding or reordering sources changes no other
    source's order."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def permuted(positions: np.ndarray, num_rows: int, seed: int, key: int, epoch: int) -> np.ndarray:
    """Rows at `positions` of the source-epoch's permutation of range(num_rows).

    Each round (add a key, multiply by an odd key, xor-shift the high half down) is a bijection of
    [0, 2^bits); applied until the value falls below num_rows (cycle walking), it is one of [0, num_rows).
    2^bits < 2·num_rows, so a value walks about twice on average."""
    bits = max(1, (num_rows - 1).bit_length())
    mask, shift = np.uint64((1 << bits) - 1), np.uint64((bits + 1) // 2)
    keys = np.random.default_rng([seed, key, epoch]).integers(0, 2**63, size=(_ROUNDS, 2), dtype=np.uint64)
    x = np.asarray(positions, dtype=np.uint64).copy()
    todo = np.arange(len(x))
    while len(todo):
        y = x[todo]
        for add, mul in keys:
            y = (y + add) & mask
            y = (y * (mul | np.uint64(1))) & mask
            y ^= y >> shift
        x[todo] = y
        todo = todo[y >= num_rows]
    return x.astype(np.int64)
