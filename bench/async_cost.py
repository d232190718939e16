"""Background checkpoint writes (`checkpoint.async_save`) against synchronous saves, on a
40M-param Llama (~645 MB of ZeRO-2 state a save): the training stall per save, async ÷
sync, and the mean step interval of the whole run (which also shows what the writer threads take from
training while they run), with 2 ranks (both cores of this machine train) and with 1 single-threaded rank
(a core free for the writer, as on a GPU node).

Both runs train the same steps with a save every `EVERY` steps; `common.save_stall_run` measures the stall
(the step after a save minus the median step without one) and its noise floor; a background save's stall
is only claimed above that floor. The runs alternate, 5 of each.

The stall's own floor is the host copy a background save must take before the next optimizer step (the
snapshot of the save's state, every rank at once), measured alone on the same model and ranks
(`ckpt_throughput.copy_floor`): stall / copy is how close the stall is to the copy and nothing else.
"""

from __future__ import annotations

from ckpt_throughput import copy_floor
from common import WORK, figure, llama, log, long_rows, median, run_config, save_stall_run

TARGET = 0.15
COPY_TARGET = 1.5  # the stall within 1.5x of the copy alone
EVERY = 4


def measure(kind: str, config, rep: int, setup: str) -> dict:
    nproc, env = (2, None) if setup == "2 ranks" else (1, {"OMP_NUM_THREADS": "1"})
    overrides = [f"checkpoint.async_save={str(kind == 'async').lower()}"]
    result = save_stall_run(f"async-{kind}-{nproc}r-{rep}", config, overrides, EVERY, nproc, env)
    log(f"async: {setup}, {kind} rep {rep}: {result}")
    return result


def run(quick: bool) -> dict:
    reps, steps = (1, 2 * EVERY + 1) if quick else (5, 3 * EVERY + 1)
    config = run_config("async", llama(640, 8, 1728, 10, 10, 256), long_rows(), max_length=64, micro=1, accum=1,
                        steps=steps, output_dir=WORK / "runs" / "async-unused",
                        checkpoint={"every_steps": EVERY, "keep_last": 0})
    figures, raw = [], {}
    # "2 ranks": training keeps both cores of this machine busy, so the writer threads take their CPU time
    # from the steps. "1 rank": one single-threaded rank leaves a core free, as a GPU node's cores mostly are.
    for setup in ("2 ranks", "1 rank, 1 thread"):
        nproc, env = (2, None) if setup == "2 ranks" else (1, {"OMP_NUM_THREADS": "1"})
        floors = copy_floor(config, nproc, env, rounds=reps if quick else 5)
        copies, write_cpu = [r["copy"] for r in floors], [r["write_cpu"] for r in floors]
        log(f"async: {setup}, host copy alone {copies}, the writer's CPU seconds {write_cpu}")
        results = {"sync": [], "async": []}
        for rep in range(reps):
            for kind in ("sync", "async") if rep % 2 == 0 else ("async", "sync"):
                results[kind].append(measure(kind, config, rep, setup))
        sync, bg = results["sync"], results["async"]
        # A background save's stall is claimed only above its noise floor (the same measure on steps that
        # saved nothing): a stall under the floor counts as the floor, never as less.
        stalls = [max(r["stall_s"], r["floor_s"]) for r in bg]
        floor = median([r["floor_s"] for r in bg])
        note = (f"{sync[0]['ckpt_bytes'] / 1e6:.0f} MB a save (40M params, ZeRO 2, {setup}); {reps} runs each, "
                f"{steps} steps, a save every {EVERY}; stall = the step after a save minus the median step; "
                f"async stall taken as max(stall, noise floor), floor {floor:.3f} s (the same measure on the steps "
                f"before a save), measured stall {median([r['stall_s'] for r in bg]):.3f} s")
        tag = setup.split()[0]
        figures += [
            figure(f"async_stall_{tag}r", f"stall per save, async_save / sync ({setup})", stalls,
                   [r["stall_s"] for r in sync], "s", ("<=", TARGET), note),
            figure(f"async_stall_copy_{tag}r", f"stall per save, async_save / its host copy alone ({setup})",
                   stalls, [median(copies)] * len(stalls), "s", ("<=", COPY_TARGET),
                   f"copy floor: the snapshot of the save's state alone, every rank at once, median of "
                   f"{len(copies)} ({median(copies):.3f} s); stall as above"),
            figure(f"async_stall_cpu_{tag}r", f"stall per save, async_save / its host copy + its writer's CPU time "
                   f"({setup})", stalls, [median(copies) + median(write_cpu)] * len(stalls), "s", None,
                   f"the writer's CPU time: the seconds of CPU rank 0 takes to write its files from the copy "
                   f"(pickling, sha256, system calls), median of {len(write_cpu)} ({median(write_cpu):.3f} s): "
                   f"what training loses where no core is free for the writer"),
            figure(f"async_mean_step_{tag}r", f"mean step with saves, async / sync ({setup})",
                   [r["mean_interval_s"] for r in bg], [r["mean_interval_s"] for r in sync], "s", None,
                   "includes what the writer threads take from training"),
        ]
        raw[setup] = {**results, "copy_s": copies, "write_cpu_s": write_cpu}
    return {"figures": figures, "raw": raw}
