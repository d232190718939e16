"""Figure 2 - resume cost against position: time from "state loaded" (the "resumed from" line) to the end
of the first resumed optimizer step, and from process start, resuming at ~1 % and at ~90 % of an epoch of
100k rows of ~50 tokens (long enough that replaying the skipped batches, as HF's dataloader fast-forward
does, would show). (HF Trainer's resume was measured beside ours in earlier rounds; it is left out to keep
the bench within its time.)

One training run makes both checkpoints (it saves every step and keeps all), so the two positions differ
in nothing but the position. Every timed resume starts a new job from its checkpoint into a fresh output folder (the source
is never modified), waits for the first resumed step's line in the step log (its `time` field), and
SIGKILLs the job: only the way to the first step is measured. The tokenized data is cached before
anything is timed, so both positions read the same cache.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass

from common import (WORK, Job, figure, llama, log, ours_argv, read_jsonl, run_config, wait_for, warm_cache,
                    write_text_dataset)

TARGET = 1.05


@dataclass(frozen=True)
class Plan:
    rows: int
    micro: int  # rows per rank per step; 2 ranks, no accumulation: a step is 2 x micro rows
    early: int  # optimizer steps before the early checkpoint (~1 % of the epoch)
    late: int   # ... before the late one (~90 %)

    def fraction(self, step: int) -> float:
        return step * 2 * self.micro / self.rows


# 1,024-row steps: 97 an epoch; checkpoints after 1,024 rows (1.0 %) and 90,112 rows (90.1 %).
FULL = Plan(rows=100_000, micro=512, early=1, late=88)
# --quick: the same fractions on a 10x smaller epoch, so the run that makes the checkpoints is short.
QUICK = Plan(rows=10_000, micro=50, early=1, late=90)


def resume_config(plan: Plan, output_dir):
    # Rows of 24 words (~50 tokens) and a 1-layer model of width 32: the run that makes the checkpoints
    # must get through 90 % of the epoch in a few minutes on 2 cores, and resume cost is about the data
    # position, not the model.
    data = write_text_dataset(WORK / "data" / f"rows-{plan.rows // 1000}k-w24.jsonl", rows=plan.rows,
                              words_per_row=24, seed=2)
    return run_config("resume", llama(32, 1, 64, 2, 1, 64), data, max_length=48, micro=plan.micro, accum=1,
                      steps=plan.late + 4, output_dir=output_dir,
                      checkpoint={"every_steps": plan.early, "keep_last": 0})


def make_checkpoints(plan: Plan, config) -> dict:
    """One ds-finetune run through the late position; returns {step: path}."""
    ours_dir = WORK / "runs" / "resume-ours"
    shutil.rmtree(ours_dir, ignore_errors=True)
    t0 = time.time()
    Job(ours_argv(config, [f"output_dir={ours_dir}"]), WORK / "logs" / "resume-ours-make.log").start().wait(900)
    log(f"resume: ds-finetune made checkpoints at steps {plan.early}..{plan.late} in {time.time() - t0:.0f} s")
    return {step: ours_dir / "checkpoints" / f"step_{step:08d}" for step in (plan.early, plan.late)}


def time_resume(step: int, checkpoint, config, rep: int) -> dict:
    """Seconds from launch, and from the 'resumed from' line, to the end of the first resumed step."""
    out = WORK / "runs" / f"resume-from-{step}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    logfile, steps_log = WORK / "logs" / f"resume-{step}-{rep}.log", out / "metrics.jsonl"
    job = Job(ours_argv(config, [f"output_dir={out}"], resume=str(checkpoint)), logfile).start()
    loaded = {}

    def first_step_done() -> bool:
        if "t" not in loaded and "[ds-finetune] resumed from" in logfile.read_text(errors="replace"):
            loaded["t"] = time.time()
        return any(r["step"] == step + 1 for r in read_jsonl(steps_log))

    ok = wait_for(first_step_done, job, timeout=300, interval=0.01)
    job.kill()
    if not ok:
        raise RuntimeError(f"resume from step {step} never reached step {step + 1}; log: {logfile}")
    if not re.search(rf"resumed from \S*step_{step:08d} at step {step}\b", logfile.read_text()):
        raise RuntimeError(f"ds-finetune did not say it resumed from step {step}; log: {logfile}")
    first = next(r for r in read_jsonl(steps_log) if r["step"] == step + 1)
    return {"first_step_s": first["time"] - job.t_start, "first_step_cpu_s": job.cpu_at(first["time"]),
            "loaded_to_first_step_s": first["time"] - loaded["t"]}


def run(quick: bool) -> dict:
    plan, reps = (QUICK, 1) if quick else (FULL, 3)
    config = resume_config(plan, WORK / "runs" / "resume-ours")
    t = warm_cache(config)
    log(f"resume: {plan.rows:,}-row dataset tokenized and cached ({t:.0f} s; 0 = already cached)")
    checkpoints = make_checkpoints(plan, config)
    early, late = plan.early, plan.late
    runs = {step: [] for step in checkpoints}
    for rep in range(reps):  # early and late back to back (a pair shares whatever else loads the machine)
        for step in ((early, late) if rep % 2 == 0 else (late, early)):
            r = time_resume(step, checkpoints[step], config, rep)
            runs[step].append(r)
            log(f"resume rep {rep + 1}/{reps}: from step {step}: first step after {r['first_step_s']:.2f} s, "
                f"{r['first_step_cpu_s']:.2f} CPU-s")
    where = f"{plan.fraction(early):.1%} vs {plan.fraction(late):.1%} of a {plan.rows:,}-row epoch"
    figures = []
    for measure, unit, label, note in (
            ("loaded_to_first_step_s", "s", "state loaded",
             f"{where}; {reps} resume pairs; 'ours' column = late, 'baseline' = early"),
            ("first_step_s", "s", "wall", "from process start (start-up included)"),
            ("first_step_cpu_s", "CPU-s", "CPU",
             "CPU seconds of launcher + ranks until the first step ends (robust to other load)")):
        text = ("state loaded to first step done, 90% / 1% into the epoch" if label == "state loaded"
                else f"resume to first step ({label}), 90% / 1% into the epoch")
        target = None if label == "wall" else ("<=", TARGET)  # from process start, start-up noise dominates
        late_runs, early_runs = ([r[measure] for r in runs[step]] for step in (late, early))
        figures.append(figure(f"resume_ours_{label.split()[-1].lower()}", text, late_runs, early_runs, unit, target,
                              note))
    return {"figures": figures,
            "raw": {"rows": plan.rows, "early_step": early, "late_step": late,
                    **{f"ours@{step}": v for step, v in runs.items()}}}
