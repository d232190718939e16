"""Resume-time hashing of a checkpoint: every rank hashing a share of the files and waiting for the others'
findings on files (`verify.hash_together`, what a resume does now), against one process hashing them all
(what rank 0 did alone before, while the other ranks waited in a collective that DeepSpeed's timeout
ends). The files are sized like a 2-rank ZeRO-2 checkpoint (two large optimizer partitions, two model
files, small ones), ~2 GB; the page cache is warm, so this is the hashing, not the disk. The ranks are
forked processes (no process group is needed); the two ways alternate, each repeated.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

from common import ROOT, WORK, figure, log, median

TARGET = 0.75  # 2 ranks: ideally 0.5 of one process


def make_checkpoint(folder: Path, sizes: list[int]) -> dict:
    from ds_finetune.files import sha256_file

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, size in enumerate(sizes):
        path = folder / f"file_{i}.pt"
        with open(path, "wb") as f:
            for start in range(0, size, 1 << 26):
                f.write(os.urandom(min(1 << 26, size - start)))
        files[path.name] = {"size": size, "sha256": sha256_file(path)}
    return {"files": files}


def one_process(folder: Path, manifest: dict) -> float:
    from ds_finetune.checkpoint.verify import verify_files

    t0 = time.perf_counter()
    assert verify_files(folder, manifest) == []
    return time.perf_counter() - t0


def ranks(folder: Path, manifest: dict, world: int) -> float:
    from ds_finetune.checkpoint.verify import hash_together

    board = folder.parent / f"board-{time.time_ns()}"
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(world) as pool:
        found = pool.starmap(hash_together, [(folder, manifest, board, r, world, print) for r in range(world)])
    elapsed = time.perf_counter() - t0
    assert found == [[]] * world
    shutil.rmtree(board)
    return elapsed


def run(quick: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    big, small = (200_000_000, 20_000_000) if quick else (900_000_000, 90_000_000)
    sizes = [big, big, small, small, 1_000_000, 50_000]
    folder = WORK / "verify-split" / "step_00000001"
    shutil.rmtree(folder.parent, ignore_errors=True)
    manifest = make_checkpoint(folder, sizes)
    one_process(folder, manifest)  # warm the page cache
    reps = 2 if quick else 5
    alone, shared = [], []
    for _ in range(reps):
        alone.append(one_process(folder, manifest))
        shared.append(ranks(folder, manifest, 2))
    shutil.rmtree(folder.parent)
    gb = sum(sizes) / 1e9
    log(f"verify: {gb:.2f} GB; one process {median(alone):.2f} s, 2 ranks sharing {median(shared):.2f} s")
    return {
        "figures": [
            figure("verify_split", "resume hashing, 2 ranks sharing / 1 process alone", shared, alone, "s",
                   ("<=", TARGET), f"{gb:.2f} GB in {len(sizes)} files, page cache warm; {reps} alternated pairs"),
        ],
        "raw": {"alone_s": alone, "shared_s": shared, "bytes": sum(sizes)},
    }
