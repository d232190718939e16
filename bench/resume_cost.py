"""Figure 2 - resume cost against position: time from process start to the end of the first resumed
optimizer step, resuming at ~1 % and at ~90 % of an epoch of 200k rows; ds-finetune and HF Trainer.

One training run per contender makes both checkpoints (same config, same run: ours saves every EARLY
steps and keeps all, HF saves where bench/hf_train.py is told to), so the two positions differ in
nothing but the position. Every timed resume starts a new job from its checkpoint into a fresh output
folder (the source is never modified), waits for the first resumed step's line in the step log (its
`time` field), and SIGKILLs the job: only the way to the first step is measured. The tokenized data is
cached before anything is timed, so both positions read the same cache.
"""

from __future__ import annotations

import re
import shutil
import time

from common import (BENCH, WORK, Job, llama, log, median, ours_argv, read_jsonl, run_config, torchrun,
                    wait_for, warm_cache, write_text_dataset)

ROWS = 200_000
MICRO = 256                       # x 2 ranks = 512 rows a step: 390 steps an epoch
EARLY, LATE = 4, 352              # 2,048 rows (1.0 %) and 180,224 rows (90.1 %) into the epoch
MAX_STEPS = LATE + 4
TARGET = 1.05


def resume_config(output_dir):
    data = write_text_dataset(WORK / "data" / "rows-200k.jsonl", rows=ROWS, words_per_row=20, seed=2)
    # The tiny demo model: resume cost is about data position, so the model should not dominate it.
    return run_config("resume", llama(64, 2, 176, 4, 2, 256), data, max_length=64, micro=MICRO, accum=1,
                      steps=MAX_STEPS, output_dir=output_dir,
                      checkpoint={"every_steps": EARLY, "keep_last": 0})


def make_checkpoints(config) -> dict:
    """One ds-finetune run and one HF run through the late position; returns {(who, step): path}."""
    ours_dir, hf_dir = WORK / "runs" / "resume-ours", WORK / "runs" / "resume-hf"
    for d in (ours_dir, hf_dir):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    Job(ours_argv(config, [f"output_dir={ours_dir}"]), WORK / "logs" / "resume-ours-make.log").start().wait(900)
    log(f"resume: ds-finetune made checkpoints at steps {EARLY}..{LATE} in {time.time() - t0:.0f} s")
    t0 = time.time()
    argv = torchrun(BENCH / "hf_train.py", ["--config", str(config), "--out", str(hf_dir), "--steps-log",
                                            str(hf_dir / "steps.jsonl"), "--save-at", f"{EARLY},{LATE}"])
    hf_dir.mkdir(parents=True)
    Job(argv, WORK / "logs" / "resume-hf-make.log").start().wait(900)
    log(f"resume: HF Trainer made checkpoints at steps {EARLY}, {LATE} in {time.time() - t0:.0f} s")
    return {("ours", EARLY): ours_dir / "checkpoints" / f"step_{EARLY:08d}",
            ("ours", LATE): ours_dir / "checkpoints" / f"step_{LATE:08d}",
            ("hf", EARLY): hf_dir / f"checkpoint-{EARLY}", ("hf", LATE): hf_dir / f"checkpoint-{LATE}"}


def time_resume(who: str, step: int, checkpoint, config, rep: int) -> dict:
    """Seconds from launch to the first resumed step (and, for ours, to the 'resumed from' line)."""
    out = WORK / "runs" / f"resume-{who}-from-{step}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    logfile = WORK / "logs" / f"resume-{who}-{step}-{rep}.log"
    if who == "ours":
        argv = ours_argv(config, [f"output_dir={out}"], resume=str(checkpoint))
        steps_log = out / "metrics.jsonl"
    else:
        steps_log = out / "steps.jsonl"
        argv = torchrun(BENCH / "hf_train.py", ["--config", str(config), "--out", str(out), "--steps-log",
                                                str(steps_log), "--resume", str(checkpoint)])
    job = Job(argv, logfile).start()
    loaded = {}

    def first_step_done() -> bool:
        if who == "ours" and "t" not in loaded and "[ds-finetune] resumed from" in logfile.read_text(errors="replace"):
            loaded["t"] = time.time()
        return any(r["step"] == step + 1 for r in read_jsonl(steps_log))

    ok = wait_for(first_step_done, job, timeout=300, interval=0.05)  # light polling: 2 cores
    job.kill()
    if not ok:
        raise RuntimeError(f"resume of {who} from step {step} never reached step {step + 1}; log: {logfile}")
    if who == "ours" and not re.search(rf"resumed from \S*step_{step:08d} at step {step}\b", logfile.read_text()):
        raise RuntimeError(f"ds-finetune did not say it resumed from step {step}; log: {logfile}")
    first = next(r for r in read_jsonl(steps_log) if r["step"] == step + 1)
    result = {"first_step_s": first["time"] - job.t_start}
    if "t" in loaded:
        result["loaded_s"] = loaded["t"] - job.t_start
    return result


def run(quick: bool) -> dict:
    reps = 1 if quick else 3
    config = resume_config(WORK / "runs" / "resume-ours")
    t = warm_cache(config)
    log(f"resume: {ROWS:,}-row dataset tokenized and cached ({t:.0f} s; 0 = already cached)")
    checkpoints = make_checkpoints(config)
    runs = {key: [] for key in checkpoints}
    order = list(checkpoints)
    for rep in range(reps):
        for key in order[rep % 4:] + order[:rep % 4]:  # rotate, so no position always follows the same one
            runs[key].append(time_resume(key[0], key[1], checkpoints[key], config, rep))
            log(f"resume rep {rep + 1}/{reps}: {key[0]} from step {key[1]}: first step after "
                f"{runs[key][-1]['first_step_s']:.2f} s")
    med = {key: median([r["first_step_s"] for r in v]) for key, v in runs.items()}
    ours_ratio = med[("ours", LATE)] / med[("ours", EARLY)]
    hf_ratio = med[("hf", LATE)] / med[("hf", EARLY)]
    where = f"{EARLY * 2 * MICRO / ROWS:.1%} vs {LATE * 2 * MICRO / ROWS:.1%} of a {ROWS:,}-row epoch"
    return {
        "figures": [
            {"id": "resume_ours", "figure": "resume-to-first-step, late / early (ours)",
             "ours": med[("ours", LATE)], "baseline": med[("ours", EARLY)], "unit": "s", "ratio": ours_ratio,
             "target": ["<=", TARGET], "met": ours_ratio <= TARGET,
             "note": f"{where}; {reps} resumes each; 'ours' = late, 'baseline' = early"},
            {"id": "resume_hf", "figure": "resume-to-first-step, late / early (HF Trainer)",
             "ours": med[("hf", LATE)], "baseline": med[("hf", EARLY)], "unit": "s", "ratio": hf_ratio,
             "target": None, "met": None,
             "note": "reference: HF fast-forwards its dataloader (skip_first_batches)"},
        ],
        "raw": {f"{who}@{step}": v for (who, step), v in runs.items()},
    }
