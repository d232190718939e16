"""`make bench` section `mixture`: what a data mixture's order costs as runs and sources grow.

1. Seeking: resuming 10 sources × 100k rows at sample 5,000,000 (building the order, the position from
   the sample count, the first global batch taken and collated) against the same at sample 0: SEEK_PROCESSES
   processes, each timing interleaved pairs after an untimed first touch, each process's two medians a
   repetition (one process's page cache, allocator and CPU placement are not another's). Target <= 1.05: a
   resume is O(1) in the run's length.
2. Memory: one rank's anonymous RSS (torch imported as in a rank) after building the order of 10 sources
   and taking batches far into the run, with 1M rows a source against 10k. Target <= 1.1: flat in the rows.
   Anonymous: the sources' file-backed pages that a batch's scattered rows map (read-around of each row)
   are the page cache, shared by the ranks and reclaimable; total RSS is recorded beside it.

The sources are synthetic tokenized caches (the arrays a prepared source holds, memory-mapped as a rank
reads them): the order never tokenizes, and 10M real rows would take the bench hours to prepare.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import PY, ROOT, WORK, figure, log, median

SOURCES, GLOBAL_BATCH = 10, 64
SEEK_PROCESSES = 5


def write_source(folder: Path, rows: int, tokens_per_row: int = 4) -> Path:
    """A prepared source's arrays (cache.ARRAYS) for `rows` rows, as a rank finds them on disk."""
    if (folder / "meta.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    lengths = np.full(rows, tokens_per_row, np.int32)
    np.save(folder / "input_ids.npy", (np.arange(rows * tokens_per_row, dtype=np.int64) % 500).astype(np.int32))
    np.save(folder / "target_mask.npy", np.tile(np.array([False] + [True] * (tokens_per_row - 1)), rows))
    np.save(folder / "offsets.npy", np.arange(rows + 1, dtype=np.int64) * tokens_per_row)
    np.save(folder / "lengths.npy", lengths)
    np.save(folder / "row_targets.npy", lengths - 1)
    np.save(folder / "row_ids.npy", np.arange(rows, dtype=np.int64))
    (folder / "meta.json").write_text(json.dumps({"rows": rows, "rows_read": rows, "skipped_rows": 0}))
    return folder


def open_mixture(folder: Path):
    """The 10 sources (one set of arrays opened under 10 names: each name has its own permutations)."""
    sys.path.insert(0, str(ROOT))
    from ds_finetune.data.cache import read_cache
    from ds_finetune.data.mixture import MixedData
    names = [f"s{i}" for i in range(SOURCES)]
    return MixedData(names, [read_cache(folder, f"h{i}") for i in range(SOURCES)])


def resume_at(data, n: int) -> float:
    """Seconds to build the order, seek to sample n and take and collate the first global batch."""
    from ds_finetune.state import TrainState
    from ds_finetune.data import MixtureOrder, collate
    t0 = time.perf_counter()
    order = MixtureOrder(data, [1 + i % 3 for i in range(SOURCES)], 1234, False, 64)
    state = TrainState(consumed_samples=n, mix=order.position_at(n))
    collate(data, order.batch(state, GLOBAL_BATCH).units, 0)
    return time.perf_counter() - t0


def measure_seek(folder: Path, reps: int) -> None:
    data = open_mixture(folder)
    resume_at(data, 0), resume_at(data, 5_000_000)  # untimed: the first touches of the mapped files
    far, near = [], []
    for _ in range(reps):  # interleaved: a burst of load elsewhere hits both alike
        near.append(resume_at(data, 0))
        far.append(resume_at(data, 5_000_000))
    print(json.dumps({"near": near, "far": far}), flush=True)


def measure_rss(folder: Path) -> None:
    import torch  # noqa: F401  (a rank has it)
    data = open_mixture(folder)
    for n in (0, 5_000_000, 50_000_000):
        resume_at(data, n)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = {k: int(status[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon")}
    print(json.dumps({"rss": kib["VmRSS"], "anon": kib["RssAnon"], "rows": data.num_rows}), flush=True)


def child(mode: str, *args: str) -> dict:
    out = subprocess.run([PY, str(Path(__file__).resolve()), mode, *args], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool) -> dict:
    base = WORK / "mixture-sources"
    seek_src = write_source(base / "100k", 100_000)
    small, big = write_source(base / "10k", 10_000), write_source(base / ("100k" if quick else "1m"),
                                                                  100_000 if quick else 1_000_000)
    pairs = 30 if quick else 200
    # Each process a repetition: the medians of its pairs (one ~2 ms timing alone is mostly scheduler noise).
    seeks = [child("seek", str(seek_src), str(pairs)) for _ in range(SEEK_PROCESSES)]
    near_ms, far_ms = ([median(s[key]) * 1e3 for s in seeks] for key in ("near", "far"))
    near, far = median(near_ms), median(far_ms)
    log(f"resume at sample 0: {near:.2f} ms, at 5M: {far:.2f} ms (medians of {SEEK_PROCESSES} processes' "
        f"medians of {pairs})")
    # Three children a size, alternating (the RSS of a fresh process, so each is its own repetition).
    runs = {"small": [], "big": []}
    for rep in range(3):
        for name in (("small", "big") if rep % 2 == 0 else ("big", "small")):
            runs[name].append(child("rss", str(small if name == "small" else big)))
    rss = {name: {"rows": rs[0]["rows"], "anon": median([r["anon"] for r in rs]), "rss": median([r["rss"] for r in rs])}
           for name, rs in runs.items()}
    big_rows, small_rows = rss["big"]["rows"], rss["small"]["rows"]
    log(f"anonymous RSS {rss['big']['anon'] / 2**20:.0f} MB with {big_rows:,} rows, "
        f"{rss['small']['anon'] / 2**20:.0f} MB with {small_rows:,} (total RSS {rss['big']['rss'] / 2**20:.0f} "
        f"and {rss['small']['rss'] / 2**20:.0f} MB)")
    figures = [
        figure("mixture_seek", "mixture resume at sample 5M / at sample 0 (10 sources x 100k rows)",
               far_ms, near_ms, "ms", ("<=", 1.05),
               f"order built, position computed, one global batch of {GLOBAL_BATCH} taken and collated; "
               f"{SEEK_PROCESSES} processes of {pairs} interleaved pairs, each process's medians a repetition"),
        figure("mixture_rss", f"mixture order anonymous RSS, {big_rows:,} / {small_rows:,} rows ({SOURCES} sources)",
               [r["anon"] / 2**20 for r in runs["big"]], [r["anon"] / 2**20 for r in runs["small"]], "MB",
               ("<=", 1.1), "torch imported as in a rank; sources memory-mapped; batches taken at samples 0, 5M and "
                            "50M; file-backed pages (page cache) not counted; 3 alternating processes a size"),
    ]
    return {"figures": figures, "seek_ms": {"0": round(near, 3), "5M": round(far, 3)},
            "seek_ms_by_process": {"0": near_ms, "5M": far_ms},
            "anon_rss_mb": {str(n): round(rss[k]["anon"] / 2**20) for k, n in (("small", small_rows), ("big", big_rows))},
            "total_rss_mb": {str(n): round(rss[k]["rss"] / 2**20) for k, n in (("small", small_rows), ("big", big_rows))}}


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "seek":
        measure_seek(Path(args[0]), int(args[1]))
    else:
        measure_rss(Path(args[0]))
