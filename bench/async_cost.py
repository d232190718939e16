"""Background checkpoint writes (`checkpoint.async_save`) against synchronous saves, on the checkpoint
bench's model (a 40M-param Llama, ~645 MB of ZeRO-2 state a save): the training stall per save, async ÷
sync, and the mean step interval of the whole run (which also shows what the writer threads take from
training while they run), with 2 ranks (both cores of this machine train) and with 1 single-threaded rank
(a core free for the writer, as on a GPU node).

Both runs train the same steps with a save every `EVERY` steps; `common.save_stall_run` measures the stall
(the step after a save minus the median step without one). The runs alternate, each repeated.
"""

from __future__ import annotations

from common import WORK, llama, log, long_rows, median, run_config, save_stall_run

TARGET = 0.15
EVERY = 4


def measure(kind: str, config, rep: int, setup: str) -> dict:
    nproc, env = (2, None) if setup == "2 ranks" else (1, {"OMP_NUM_THREADS": "1"})
    overrides = [f"checkpoint.async_save={str(kind == 'async').lower()}"]
    result = save_stall_run(f"async-{kind}-{nproc}r-{rep}", config, overrides, EVERY, nproc, env)
    log(f"async: {setup}, {kind} rep {rep}: {result}")
    return result


def run(quick: bool) -> dict:
    reps, steps = (1, 2 * EVERY + 1) if quick else (2, 4 * EVERY + 1)
    config = run_config("async", llama(640, 8, 1728, 10, 10, 256), long_rows(), max_length=64, micro=1, accum=1,
                        steps=steps, output_dir=WORK / "runs" / "async-unused",
                        checkpoint={"every_steps": EVERY, "keep_last": 0})
    figures, raw = [], {}
    # "2 ranks": training keeps both cores of this machine busy, so the writer threads take their CPU time
    # from the steps. "1 rank": one single-threaded rank leaves a core free, as a GPU node's cores mostly are.
    for setup in ("2 ranks", "1 rank, 1 thread"):
        results = {"sync": [], "async": []}
        for rep in range(reps):
            for kind in ("sync", "async") if rep % 2 == 0 else ("async", "sync"):
                results[kind].append(measure(kind, config, rep, setup))
        sync, bg = ({k: median([r[k] for r in results[kind]]) for k in ("stall_s", "mean_interval_s", "ckpt_bytes")}
                    for kind in ("sync", "async"))
        stall_ratio = max(bg["stall_s"], 0.0) / sync["stall_s"]
        note = (f"{sync['ckpt_bytes'] / 1e6:.0f} MB a save (40M params, ZeRO 2, {setup}); {reps} runs each, "
                f"{steps} steps, a save every {EVERY}")
        figures += [
            {"id": f"async_stall_{setup.split()[0]}r", "figure": f"stall per save, async_save / sync ({setup})",
             "ours": bg["stall_s"], "baseline": sync["stall_s"], "unit": "s", "ratio": stall_ratio,
             "target": ["<=", TARGET], "met": stall_ratio <= TARGET, "note": note},
            {"id": f"async_mean_step_{setup.split()[0]}r", "figure": f"mean step with saves, async / sync ({setup})",
             "ours": bg["mean_interval_s"], "baseline": sync["mean_interval_s"], "unit": "s",
             "ratio": bg["mean_interval_s"] / sync["mean_interval_s"], "target": None, "met": None,
             "note": "includes what the writer threads take from training"},
        ]
        raw[setup] = results
    return {"figures": figures, "raw": raw}
