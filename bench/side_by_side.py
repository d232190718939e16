"""Figure 4 - ds-finetune beside Hugging Face Trainer + its DeepSpeed integration, on the same work: same
model (dropout on, so RNG restore matters), rows, micro batch, accumulation, global batch, optimizer, LR
schedule, DeepSpeed config (ZeRO-2), world size (2), launcher (torchrun).

Per contender: reference runs of N steps, interleaved with the other contender's (ours, HF, HF, ours, ...:
PAIRS pairs; steps/s from per-step timestamps, peak RSS of the process tree; ratios are medians of the
pairs' ratios, so load that drifts over the bench hits both sides alike), then a run that checkpoints at step K and is SIGKILLed (whole process group) once step K+2 is
logged, then a resume from that checkpoint to N. "Continues exactly" = the resumed run's per-step losses
for K+1..N equal the reference's bit for bit (compared as the float reprs in the logs).
"""

from __future__ import annotations

import shutil

from common import (CHILDREN, WORK, Job, cpu_per_step, figure, llama, llama_params, log, long_rows, median,
                    ours_argv, read_jsonl, run_config, step_intervals, steps_per_s, torchrun, wait_for, warm_cache)

WARMUP = 3
PAIRS = 3


MODEL = llama(256, 4, 688, 4, 4, 256, dropout=0.1)


def sbs_config(steps: int, save_at: int):
    data = long_rows()
    return run_config("side-by-side", MODEL, data, max_length=128, micro=2,
                      accum=2, steps=steps, output_dir=WORK / "runs" / "sbs-ours-ref",
                      checkpoint={"every_steps": save_at})


class Ours:
    name = "ours"

    def __init__(self, config, save_at):
        self.config, self.save_at = config, save_at

    def job(self, tag: str, resume: bool = False) -> tuple[Job, object]:
        out = WORK / "runs" / f"sbs-ours-{'kill' if tag == 'resume' else tag}"
        if not resume:
            shutil.rmtree(out, ignore_errors=True)
        argv = ours_argv(self.config, [f"output_dir={out}"], resume="auto" if resume else None)
        return Job(argv, WORK / "logs" / f"sbs-ours-{tag}.log"), out / "metrics.jsonl"

    def checkpoint_done(self) -> bool:
        tag_dir = WORK / "runs" / "sbs-ours-kill" / "checkpoints" / f"step_{self.save_at:08d}"
        return (tag_dir / "manifest.json").exists()


class HF:
    name = "hf"

    def __init__(self, config, save_at):
        self.config, self.save_at = config, save_at

    def job(self, tag: str, resume: bool = False) -> tuple[Job, object]:
        out = WORK / "runs" / f"sbs-hf-{'kill' if tag == 'resume' else tag}"
        if not resume:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
        steps_log = out / f"steps-{tag}.jsonl"
        args = ["--config", str(self.config), "--out", str(out), "--steps-log", str(steps_log),
                "--save-at", str(self.save_at)]
        if resume:
            args += ["--resume", str(out / f"checkpoint-{self.save_at}")]
        return Job(torchrun(CHILDREN / "side_by_side.py", args), WORK / "logs" / f"sbs-hf-{tag}.log"), steps_log

    def checkpoint_done(self) -> bool:
        return (WORK / "runs" / "sbs-hf-kill" / f"checkpoint-{self.save_at}" / "trainer_state.json").exists()


def reference(side, rep: int) -> dict:
    job, steps_log = side.job(f"ref{rep}")
    job.start().wait(900)
    rows = read_jsonl(steps_log)
    times = [r["time"] for r in rows]
    return {"rows": rows, "steps_per_s": steps_per_s(step_intervals(times, WARMUP)),
            "cpu_s_per_step": cpu_per_step(job, times, WARMUP), "peak_rss_mb": job.peak_rss / 2**20}


def kill_after_checkpoint(side) -> int:
    """Start the run, SIGKILL its process group once step save_at+2 is logged; returns the last logged step."""
    job, steps_log = side.job("kill")
    job.start()
    reached = wait_for(lambda: side.checkpoint_done() and any(r["step"] >= side.save_at + 2
                                                               for r in read_jsonl(steps_log)),
                       job, timeout=600, interval=0.05)
    job.kill()
    if not reached:
        raise RuntimeError(f"{side.name}: the run to kill never got past step {side.save_at + 2}; log: {job.log}")
    return max(r["step"] for r in read_jsonl(steps_log))


def resume_and_compare(side, ref_rows: list[dict], steps: int) -> dict:
    job, steps_log = side.job("resume", resume=True)
    job.start().wait(900)
    ref = {r["step"]: r["loss"] for r in ref_rows}
    got = {r["step"]: r["loss"] for r in read_jsonl(steps_log) if r["step"] > side.save_at}
    wanted = list(range(side.save_at + 1, steps + 1))
    same = sorted(got) == wanted and all(repr(got[s]) == repr(ref[s]) for s in wanted)
    worst = max((abs(got[s] - ref[s]) / abs(ref[s]) for s in wanted if s in got), default=float("nan"))
    return {"identical": same, "steps_compared": len(wanted), "max_rel_diff": worst,
            "resumed_steps": sorted(got)}


def run(quick: bool) -> dict:
    steps, save_at = (10, 5) if quick else (24, 12)
    config = sbs_config(steps, save_at)
    warm_cache(config)
    sides = [Ours(config, save_at), HF(config, save_at)]
    pairs, exact = {side.name: [] for side in sides}, {}
    for rep in range(1 if quick else PAIRS):
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            r = reference(side, rep)
            pairs[side.name].append(r)
            log(f"side-by-side: {side.name} reference {rep + 1}: {r['steps_per_s']:.3f} steps/s, "
                f"peak RSS {r['peak_rss_mb']:.0f} MiB")
    refs = {name: {"rows": runs[0]["rows"], **{k: median([r[k] for r in runs])
                                               for k in ("steps_per_s", "cpu_s_per_step", "peak_rss_mb")}}
            for name, runs in pairs.items()}

    def pair(key: str) -> tuple[list, list]:
        return [r[key] for r in pairs["ours"]], [r[key] for r in pairs["hf"]]
    for side in sides:
        last = kill_after_checkpoint(side)
        log(f"side-by-side: {side.name} SIGKILLed after step {last} (checkpoint at {save_at})")
    for side in sides:
        exact[side.name] = resume_and_compare(side, refs[side.name]["rows"], steps)
        log(f"side-by-side: {side.name} resumed; steps {save_at + 1}..{steps} identical to the uninterrupted run: "
            f"{exact[side.name]['identical']} (max rel diff {exact[side.name]['max_rel_diff']:.2e})")

    def verdict(e):
        return "bitwise identical" if e["identical"] else f"differs (max rel {e['max_rel_diff']:.1e})"

    common_note = (f"ZeRO-2, 2 ranks, {llama_params(MODEL) / 1e6:.1f}M Llama + dropout, seq 128, micro 2 x accum 2; "
                   f"{steps} steps; {len(pairs['ours'])} interleaved pairs, the same torch AdamW on both sides")
    return {
        "figures": [
            figure("sbs_speed", "steps/s, ours / HF Trainer+DeepSpeed", *pair("steps_per_s"), "steps/s", None,
                   common_note),
            figure("sbs_cpu", "CPU time per step, ours / HF Trainer+DeepSpeed", *pair("cpu_s_per_step"), "CPU-s",
                   None, "same reference runs; CPU seconds of launcher + both ranks a step"),
            figure("sbs_rss", "peak RSS (process tree), ours / HF Trainer+DeepSpeed", *pair("peak_rss_mb"), "MiB",
                   None, "sum of RSS of torchrun + both ranks, sampled every 0.1 s"),
            {"id": "sbs_exact", "figure": f"SIGKILL after step {save_at}+2, resume: steps {save_at + 1}..{steps}",
             "ours": verdict(exact["ours"]), "baseline": verdict(exact["hf"]), "unit": "", "ratio": None,
             "target": ["==", "bitwise identical (ours)"], "met": exact["ours"]["identical"],
             "note": "losses compared with the uninterrupted run of the same contender"},
        ],
        "raw": {"reference": {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in refs.items()},
                "pairs": {k: [{kk: vv for kk, vv in r.items() if kk != "rows"} for r in v] for k, v in pairs.items()},
                "losses": {k: [[r["step"], r["loss"]] for r in v["rows"]] for k, v in refs.items()},
                "resume": exact},
    }
