"""Run one conversion or one export in this process and report its memory (and time) as JSON; launched by
bench/elastic.py. Peak memory is the kernel's high-water mark of this process (VmHWM), reset after the
imports, so "above baseline" is what the work itself added.

    torchrun --nproc_per_node N bench/children/elastic.py convert CHECKPOINT OUT_JSON
    python bench/children/elastic.py export CHECKPOINT OUT_JSON EXPORT_DIR MAX_SHARD_BYTES
"""
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout (this is bench/children/)
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # ds_finetune, and bench/common.py's /proc readers

from deepspeed.utils import zero_to_fp32  # noqa: E402,F401  (imported by the work itself; part of the baseline)
from safetensors import safe_open  # noqa: E402,F401

from ds_finetune.checkpoint import convert, export  # noqa: E402
from ds_finetune.checkpoint.verify import inspect_checkpoint  # noqa: E402
from common import proc_status, reset_peak  # noqa: E402


def main() -> None:
    mode, ckpt, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    info = inspect_checkpoint(ckpt, hashes=False)
    if mode == "export":
        base = reset_peak()
        t0 = time.time()
        export.export_checkpoint(ckpt, Path(sys.argv[4]), "fp32", hashes=False, max_shard_size=int(sys.argv[5]))
        out.write_text(json.dumps({"seconds": time.time() - t0, "baseline": base, "peak": proc_status("VmHWM")}))
        return
    from ds_finetune.dist import all_gather, barrier, init_distributed
    rank, world, _ = init_distributed()
    barrier()
    base = reset_peak()
    t0 = time.time()
    convert.convert(info, 3, world, rank, print)
    seconds = time.time() - t0
    rows = all_gather({"baseline": base, "peak": proc_status("VmHWM"), "seconds": seconds})
    if rank == 0:
        out.write_text(json.dumps({"seconds": max(r["seconds"] for r in rows), "ranks": rows}))
    barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
