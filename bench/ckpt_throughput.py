"""Figure 3 - checkpoint throughput: MB/s of a ds-finetune save of ~645 MB of ZeRO-2 state (a 40M-param
Llama: fp32 weights, fp32 master partitions, Adam moments) against dd-style sequential writes of the
same bytes with fsync, one stream a rank as the save writes from every rank at once, to the same filesystem,
in the same job (bench/children/ckpt_throughput.py does the timing).

"ours" is the full commit (DeepSpeed save + sha256 + fsync + manifest + `latest`); "nohash" is the
DeepSpeed save + fsync alone, which shows what the hashing costs.
"""

from __future__ import annotations

import json

from common import CHILDREN, WORK, Job, figure, llama, log, long_rows, median, run_config, torchrun

TARGET = 0.80


def run(quick: bool) -> dict:
    rounds = 1 if quick else 5  # 3 at least: every figure has a spread
    data = long_rows()
    config = run_config("ckpt", llama(640, 8, 1728, 10, 10, 256), data, max_length=64, micro=1, accum=1,
                        steps=1, output_dir=WORK / "runs" / "ckpt")
    out = WORK / "ckpt-save.json"
    out.unlink(missing_ok=True)
    argv = torchrun(CHILDREN / "ckpt_throughput.py", ["--config", str(config), "--dir", str(WORK / "ckpt-scratch"),
                                             "--rounds", str(rounds), "--out", str(out)])
    Job(argv, WORK / "logs" / "ckpt-save.log").start().wait(900)
    result = json.loads(out.read_text())
    mb = result["bytes"] / 1e6
    speed = {kind: [mb / r[kind] for r in result["rounds"]] for kind in ("disk", "nohash", "ours")}
    log(f"checkpoint: {mb:.0f} MB; disk {median(speed['disk']):.0f} MB/s, DeepSpeed save+fsync "
        f"{median(speed['nohash']):.0f} MB/s, ds-finetune save {median(speed['ours']):.0f} MB/s")
    note = (f"{mb:.0f} MB ({result['params'] / 1e6:.1f}M params, ZeRO-2, 2 ranks, each writing its own files); "
            f"baseline: dd+fsync of the same bytes, one stream a rank at once; {rounds} rounds, order rotated "
            f"(each round writes all three back to back); ratio = median of the rounds' ratios")
    return {
        "figures": [
            figure("ckpt_ours", "checkpoint save, ours (with sha256) / dd+fsync (a stream a rank)", speed["ours"],
                   speed["disk"], "MB/s", (">=", TARGET), note),
            figure("ckpt_nohash", "checkpoint save, DeepSpeed save+fsync (no hash) / dd+fsync (a stream a rank)",
                   speed["nohash"], speed["disk"], "MB/s", (">=", TARGET),
                   "what the save costs before ds-finetune hashes and commits it"),
        ],
        "raw": result,
    }
