"""How much a background checkpoint write slows the training thread's Python, with the copy into the
O_DIRECT buffers GIL-free (`files.copy_into`, what ships) and, as the baseline, a slice assignment that holds
the GIL for each 8 MiB memcpy.

A "trainer" thread runs small torch ops in a Python loop (the work of a training thread that launches
kernels) for as long as `write_shard` writes a ~640 MB state beside it; its rate is reported as a fraction
of its rate alone. The three kinds alternate, REPS rounds, medians:

    DS_ACCELERATOR=cpu PYTHONPATH=. python tools/writer_gil.py [FOLDER]

FOLDER (default: a temporary folder) is where the shard is written; it is deleted afterwards.
"""

import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from ds_finetune import files
from ds_finetune.checkpoint.commit import write_shard

REPS = 5


def slice_copy(buffer, offset: int, view: memoryview) -> None:
    buffer[offset:offset + len(view)] = view


def trainer_rate(stop) -> float:
    x, n, t0 = torch.randn(64, 64), 0, time.perf_counter()
    while not stop():
        for _ in range(50):
            (x @ x).relu()
            n += 1
    return n / (time.perf_counter() - t0)


def beside_a_write(state, path: Path) -> float:
    writer = threading.Thread(target=lambda: write_shard(state, path, 0, 1))
    writer.start()
    rate = trainer_rate(lambda: not writer.is_alive())
    writer.join()
    return rate


def main() -> None:
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(dir=sys.argv[1] if len(sys.argv) > 1 else None))
    state = {"module": {f"w{i}": torch.randn(4_000_000) for i in range(40)}}
    gil_free, rates = files.copy_into, {"alone": [], "gil-free copy": [], "slice copy": []}
    try:
        for rep in range(REPS):
            kinds = list(rates) if rep % 2 == 0 else list(reversed(rates))
            for kind in kinds:
                if kind == "alone":
                    until = time.perf_counter() + 1.0
                    rates[kind].append(trainer_rate(lambda: time.perf_counter() > until))
                    continue
                files.copy_into = gil_free if kind == "gil-free copy" else slice_copy
                rates[kind].append(beside_a_write(state, folder / "shard.pt"))
    finally:
        files.copy_into = gil_free
        shutil.rmtree(folder, ignore_errors=True)
    alone = statistics.median(rates["alone"])
    for kind, values in rates.items():
        print(f"{kind:>14}: {statistics.median(values) / alone:.3f} of the trainer's rate alone "
              f"({', '.join(f'{v / alone:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
