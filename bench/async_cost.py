"""Background checkpoint writes (`checkpoint.async_save`) against synchronous saves, on the checkpoint
bench's model (a 40M-param Llama, ~645 MB of ZeRO-2 state a save): the training stall per save, async ÷
sync, and the mean step interval of the whole run (which also shows what the writer thread takes from
training while it runs: on this 2-core machine it competes with the two ranks for the cores).

Both runs train the same steps with a save every `EVERY` steps; `common.save_stall_run` measures the stall
(the step after a save minus the median step without one). The runs alternate, each repeated.
"""

from __future__ import annotations

from common import WORK, llama, log, long_rows, median, run_config, save_stall_run

TARGET = 0.15
EVERY = 4


def run(quick: bool) -> dict:
    reps, steps = (1, 2 * EVERY + 1) if quick else (2, 4 * EVERY + 1)
    config = run_config("async", llama(640, 8, 1728, 10, 10, 256), long_rows(), max_length=64, micro=1, accum=1,
                        steps=steps, output_dir=WORK / "runs" / "async-unused",
                        checkpoint={"every_steps": EVERY, "keep_last": 0})
    results = {"sync": [], "async": []}
    for rep in range(reps):
        for kind in ("sync", "async") if rep % 2 == 0 else ("async", "sync"):
            overrides = [f"checkpoint.async_save={str(kind == 'async').lower()}"]
            results[kind].append(save_stall_run(f"async-{kind}-{rep}", config, overrides, EVERY))
            log(f"async: {kind} rep {rep}: {results[kind][-1]}")
    sync, bg = ({k: median([r[k] for r in results[kind]]) for k in ("step_s", "stall_s", "mean_interval_s", "ckpt_bytes")}
                for kind in ("sync", "async"))
    stall_ratio = max(bg["stall_s"], 0.0) / sync["stall_s"]
    note = (f"{sync['ckpt_bytes'] / 1e6:.0f} MB a save (40M params, ZeRO 2, 2 ranks); {reps} runs each, {steps} "
            f"steps, a save every {EVERY}")
    return {
        "figures": [
            {"id": "async_stall", "figure": "training stall per save, async_save / synchronous",
             "ours": bg["stall_s"], "baseline": sync["stall_s"], "unit": "s", "ratio": stall_ratio,
             "target": ["<=", TARGET], "met": stall_ratio <= TARGET, "note": note},
            {"id": "async_mean_step", "figure": "mean step interval with saves, async_save / synchronous",
             "ours": bg["mean_interval_s"], "baseline": sync["mean_interval_s"], "unit": "s",
             "ratio": bg["mean_interval_s"] / sync["mean_interval_s"], "target": None, "met": None,
             "note": "includes the writer thread's competition for the cores"},
        ],
        "raw": results,
    }
