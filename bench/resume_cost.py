"""Figure 2 - resume cost against position: time from "state loaded" (ours: the "resumed from" line; HF: the
Trainer's train_begin, after its checkpoint load) to the end of the first resumed optimizer step, and from
process start, resuming at ~1 % and at ~90 % of an epoch of 100k rows of ~50 tokens (long enough that
replaying the skipped batches, as HF's dataloader fast-forward does, shows); ds-finetune and HF Trainer.

One training run per contender makes both checkpoints (same config, same run: ours saves every step and
keeps all, HF saves where bench/hf_train.py is told to), so the two positions differ in nothing but the
position. Every timed resume starts a new job from its checkpoint into a fresh output folder (the source
is never modified), waits for the first resumed step's line in the step log (its `time` field), and
SIGKILLs the job: only the way to the first step is measured. The tokenized data is cached before
anything is timed, so both positions read the same cache.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass

from common import (BENCH, WORK, Job, _read_jsonl, figure, llama, log, ours_argv, read_jsonl,
                    run_config, torchrun, wait_for, warm_cache, write_text_dataset)

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
    """One ds-finetune run and one HF run through the late position; returns {(who, step): path}."""
    ours_dir, hf_dir = WORK / "runs" / "resume-ours", WORK / "runs" / "resume-hf"
    for d in (ours_dir, hf_dir):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    Job(ours_argv(config, [f"output_dir={ours_dir}"]), WORK / "logs" / "resume-ours-make.log").start().wait(900)
    log(f"resume: ds-finetune made checkpoints at steps {plan.early}..{plan.late} in {time.time() - t0:.0f} s")
    t0 = time.time()
    hf_dir.mkdir(parents=True)
    argv = torchrun(BENCH / "hf_train.py", ["--config", str(config), "--out", str(hf_dir), "--steps-log",
                                            str(hf_dir / "steps.jsonl"), "--save-at", f"{plan.early},{plan.late}"])
    Job(argv, WORK / "logs" / "resume-hf-make.log").start().wait(900)
    log(f"resume: HF Trainer made checkpoints at steps {plan.early}, {plan.late} in {time.time() - t0:.0f} s")
    return {("ours", plan.early): ours_dir / "checkpoints" / f"step_{plan.early:08d}",
            ("ours", plan.late): ours_dir / "checkpoints" / f"step_{plan.late:08d}",
            ("hf", plan.early): hf_dir / f"checkpoint-{plan.early}",
            ("hf", plan.late): hf_dir / f"checkpoint-{plan.late}"}


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

    ok = wait_for(first_step_done, job, timeout=300, interval=0.01)
    job.kill()
    if not ok:
        raise RuntimeError(f"resume of {who} from step {step} never reached step {step + 1}; log: {logfile}")
    if who == "ours" and not re.search(rf"resumed from \S*step_{step:08d} at step {step}\b", logfile.read_text()):
        raise RuntimeError(f"ds-finetune did not say it resumed from step {step}; log: {logfile}")
    first = next(r for r in read_jsonl(steps_log) if r["step"] == step + 1)
    if who == "hf":  # the Trainer's own mark: checkpoint state loaded, loop (and fast-forward) starting
        loaded["t"] = next(r["time"] for r in _read_jsonl(steps_log, strict=False) if r.get("event") == "train_begin")
    return {"first_step_s": first["time"] - job.t_start, "first_step_cpu_s": job.cpu_at(first["time"]),
            "loaded_to_first_step_s": first["time"] - loaded["t"]}


def run(quick: bool) -> dict:
    plan, reps = (QUICK, 1) if quick else (FULL, 3)
    config = resume_config(plan, WORK / "runs" / "resume-ours")
    t = warm_cache(config)
    log(f"resume: {plan.rows:,}-row dataset tokenized and cached ({t:.0f} s; 0 = already cached)")
    checkpoints = make_checkpoints(plan, config)
    early, late = plan.early, plan.late
    runs = {key: [] for key in checkpoints}
    for rep in range(reps):
        # Each contender's early and late resume run back to back (a pair shares whatever else loads the
        # machine); the order inside a pair and of the contenders alternates between repetitions.
        for who in (("ours", "hf") if rep % 2 == 0 else ("hf", "ours")):
            for step in ((early, late) if (rep // 2) % 2 == 0 else (late, early)):
                r = time_resume(who, step, checkpoints[(who, step)], config, rep)
                runs[(who, step)].append(r)
                log(f"resume rep {rep + 1}/{reps}: {who} from step {step}: first step after "
                    f"{r['first_step_s']:.2f} s, {r['first_step_cpu_s']:.2f} CPU-s")
    where = f"{plan.fraction(early):.1%} vs {plan.fraction(late):.1%} of a {plan.rows:,}-row epoch"
    figures = []
    for who, name in (("ours", "ours"), ("hf", "HF Trainer")):
        for measure, unit, label in (("loaded_to_first_step_s", "s", "state loaded"), ("first_step_s", "s", "wall"),
                                     ("first_step_cpu_s", "CPU-s", "CPU")):
            a, b = ([r[measure] for r in runs[(who, step)]] for step in (late, early))
            mine = who == "ours" and label != "wall"  # from process start, start-up noise dominates
            text = (f"state loaded to first step done, 90% / 1% into the epoch ({name})" if label == "state loaded"
                    else f"resume to first step ({label}), 90% / 1% into the epoch ({name})")
            note = ((f"{where}; {reps} resume pairs; 'ours' column = late, 'baseline' = early; ratio = median "
                     f"of the pairs' ratios" if label == "state loaded" else
                     "from process start (start-up included)" if label == "wall" else
                     "CPU seconds of launcher + ranks until the first step ends (robust to other load)")
                    if who == "ours" else "HF fast-forwards its dataloader past the seen batches (accelerate skip_first_batches)")
            figures.append(figure(f"resume_{who}_{label.split()[-1].lower()}", text, a, b, unit,
                                  ("<=", TARGET) if mine else None, note))
    return {"figures": figures,
            "raw": {"rows": plan.rows, "early_step": early, "late_step": late,
                    **{f"{who}@{step}": v for (who, step), v in runs.items()}}}
