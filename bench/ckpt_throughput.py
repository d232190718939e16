"""Figure 3 - checkpoint throughput: a ds-finetune save and a resume's load of ~3.3 GB of ZeRO-2 state (a
206M-param Llama: fp32 weights, fp32 master partitions, Adam moments; a save takes seconds) against the disk
itself: dd-style sequential writes of the same bytes with fsync, and cold sequential reads of them, one
stream a rank as a save writes from every rank at once, to the same filesystem, in the same job
(bench/children/ckpt_throughput.py does the timing).

"ours" is the full commit (DeepSpeed save through our writer + sha256 + fsync + manifest + `latest`);
"DeepSpeed" is DeepSpeed's own save + fsync, its writer and no hashing; "load" is what a resume does with a
checkpoint whose pages are not cached: each rank verifies its share of the files and loads its own through
the safe loader.
"""

from __future__ import annotations

import json

from common import CHILDREN, WORK, Job, figure, llama, log, long_rows, median, run_config, torchrun

TARGET = 0.80
MODEL = llama(1024, 16, 2816, 16, 16, 256)


def run(quick: bool) -> dict:
    rounds = 1 if quick else 5  # 3 at least: every figure has a spread
    data = long_rows()
    config = run_config("ckpt", MODEL, data, max_length=64, micro=1, accum=1, steps=1,
                        output_dir=WORK / "runs" / "ckpt")
    out = WORK / "ckpt-save.json"
    out.unlink(missing_ok=True)
    argv = torchrun(CHILDREN / "ckpt_throughput.py", ["--config", str(config), "--dir", str(WORK / "ckpt-scratch"),
                                             "--rounds", str(rounds), "--out", str(out)])
    Job(argv, WORK / "logs" / "ckpt-save.log").start().wait(1800)
    result = json.loads(out.read_text())
    mb = result["bytes"] / 1e6
    kinds = ("disk", "nohash", "ours", "rank0", "cold", "load")
    speed = {kind: [mb / r[kind] for r in result["rounds"]] for kind in kinds}
    log(f"checkpoint: {mb:.0f} MB; disk {median(speed['disk']):.0f} MB/s, DeepSpeed save+fsync "
        f"{median(speed['nohash']):.0f} MB/s, ds-finetune save {median(speed['ours']):.0f} MB/s; cold read "
        f"{median(speed['cold']):.0f} MB/s, resume load {median(speed['load']):.0f} MB/s")
    save_s = median([r["ours"] for r in result["rounds"]])
    note = (f"{mb:.0f} MB ({result['params'] / 1e6:.0f}M params, ZeRO-2, 2 ranks, each writing its own files; a save "
            f"{save_s:.1f} s); baseline: dd+fsync of the same bytes, one stream a rank at once; {rounds} rounds, "
            f"order rotated (each round writes all four back to back); ratio = median of the rounds' ratios")
    return {
        "figures": [
            figure("ckpt_ours", "checkpoint save, ours (with sha256) / dd+fsync (a stream a rank)", speed["ours"],
                   speed["disk"], "MB/s", (">=", TARGET), note),
            figure("ckpt_nohash", "checkpoint save, DeepSpeed's own save+fsync (no hash) / dd+fsync (a stream a rank)",
                   speed["nohash"], speed["disk"], "MB/s", (">=", TARGET),
                   "DeepSpeed's own writer (torch.save to a buffered file), fsynced, nothing hashed or committed"),
            figure("ckpt_striped", "checkpoint save, ours / ours with rank 0 writing the model states alone",
                   speed["ours"], speed["rank0"], "MB/s", None,
                   "the same save with stripes.py off: the replicated model-states file written by rank 0 only, "
                   "as DeepSpeed writes it"),
            figure("ckpt_load", "checkpoint load at resume (verify + load_checkpoint) / cold sequential read "
                   "(a stream a rank)", speed["load"], speed["cold"], "MB/s", (">=", TARGET),
                   "pages of the checkpoint's files and of the read streams dropped first (posix_fadvise "
                   "DONTNEED); the load verifies each rank's share of the sha256s and loads every rank's files "
                   "through the safe loader (the model-states file is read by every rank)"),
        ],
        "raw": result,
    }


def copy_floor(config, nproc: int, env: dict | None, rounds: int) -> list[dict]:
    """Per round, {"copy": seconds of the background save's host copy alone (every rank at once): the floor
    of its stall, "write_cpu": the CPU seconds rank 0's writer then takes to write the files from it}."""
    out = WORK / f"ckpt-copy-{nproc}.json"
    out.unlink(missing_ok=True)
    argv = torchrun(CHILDREN / "ckpt_throughput.py", ["--config", str(config), "--dir", str(WORK / "ckpt-copy"),
                                             "--rounds", str(rounds), "--out", str(out), "--copy-floor"], nproc)
    Job(argv, WORK / "logs" / f"ckpt-copy-{nproc}.log", env).start().wait(900)
    return json.loads(out.read_text())["rounds"]
