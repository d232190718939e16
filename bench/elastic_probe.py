"""Run one conversion or one export in this process and report its memory (and time) as JSON; launched by
bench/elastic.py. Peak memory is the kernel's high-water mark of this process (VmHWM), reset after the
imports, so "above baseline" is what the work itself added.

    torchrun --nproc_per_node N elastic_probe.py convert CHECKPOINT OUT_JSON
    python elastic_probe.py export CHECKPOINT OUT_JSON EXPORT_DIR MAX_SHARD_BYTES
"""
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepspeed.utils import zero_to_fp32  # noqa: E402,F401  (imported by the work itself; part of the baseline)
from safetensors import safe_open  # noqa: E402,F401

from ds_finetune.checkpoint import convert, export  # noqa: E402
from ds_finetune.checkpoint.verify import inspect_checkpoint  # noqa: E402


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); returns the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kb("VmRSS")


def main() -> None:
    mode, ckpt, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    info = inspect_checkpoint(ckpt, hashes=False)
    if mode == "export":
        base = reset_peak()
        t0 = time.time()
        export.export_checkpoint(ckpt, Path(sys.argv[4]), "fp32", hashes=False, max_shard_size=int(sys.argv[5]))
        out.write_text(json.dumps({"seconds": time.time() - t0, "baseline": base, "peak": status_kb("VmHWM")}))
        return
    from ds_finetune.dist import all_gather, barrier, init_distributed
    rank, world, _ = init_distributed()
    barrier()
    base = reset_peak()
    t0 = time.time()
    convert.convert(info, 3, world, rank, print)
    seconds = time.time() - t0
    rows = all_gather({"baseline": base, "peak": status_kb("VmHWM"), "seconds": seconds})
    if rank == 0:
        out.write_text(json.dumps({"seconds": max(r["seconds"] for r in rows), "ranks": rows}))
    barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
