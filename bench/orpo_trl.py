"""ORPO beside TRL's ORPOTrainer: steps/s and peak RSS of ds-finetune's ORPO loop against TRL 1.16's
(`trl.experimental.orpo`) on the same work, one process each on the CPU: dpo_trl.py's model (a random 8-layer
Llama, hidden 512, 32,000-token vocabulary) and pairs (~100-word prompts and completions, every pair about
the same length, so a step is the same work on both sides whatever order they batch the pairs in), 2 pairs a
micro-step, 2 micro-steps a step, fp32, torch AdamW, the same LR schedule, beta 0.1, full fine-tuning; no
reference model on either side.

Ours runs ds-finetune's training (`ds_finetune.train.main`, what launch/train.py runs) as one process under
DeepSpeed at ZeRO-0; TRL's Trainer runs without DeepSpeed. Runs alternate (ours, TRL, TRL, ours, ...), each with
every core as intra-op threads; the first WARMUP steps are dropped and steps/s comes from the other INTERVALS
step intervals (medians). Peak RSS of the process is sampled every 0.1 s; ratios are medians of the
neighbouring pairs'.
"""

from __future__ import annotations

import shutil

from common import (CHILDREN, INTERVALS, PY, ROOT, WORK, Job, figure, interleaved, llama_params, log, read_jsonl,
                    run_child, run_config, step_intervals, steps_per_s)
from dpo_trl import ACCUM, DEEPSPEED_NOTE, MICRO, MODEL, STEPS, THREADS, VOCAB, WARMUP, pairs_dataset


def orpo_config():
    config = run_config("orpo-trl", MODEL, pairs_dataset(), max_length=1024, micro=MICRO, accum=ACCUM, steps=STEPS,
                        output_dir=WORK / "runs" / "orpo-trl-ours", train={"objective": "orpo", "zero_stage": 0})
    config.write_text(config.read_text().replace("format: text", "format: preference"))
    return config


def measured(job: Job, steps_log) -> dict:
    rows = read_jsonl(steps_log)
    assert len(rows) == STEPS, len(rows)
    seconds = step_intervals([r["time"] for r in rows], WARMUP)
    return {"steps_per_s": steps_per_s(seconds), "peak_rss_mb": job.peak_rss / 2**20,
            "losses": [r["loss"] for r in rows]}


def ours(config, rep: int) -> dict:
    out = WORK / "runs" / f"orpo-trl-ours-{rep}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [PY, str(ROOT / "launch" / "train.py"), "--config", str(config), f"output_dir={out}",
            f"data.cache_dir={WORK / 'orpo-trl-cache'}"]
    job = run_child(f"orpo-trl-ours-{rep}", argv, THREADS)
    return measured(job, out / "metrics.jsonl")


def trl(config, rep: int) -> dict:
    out = WORK / "runs" / f"orpo-trl-trl-{rep}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    argv = [PY, str(CHILDREN / "orpo_trl.py"), "--config", str(config), "--out", str(out),
            "--steps-log", str(out / "steps.jsonl")]
    job = run_child(f"orpo-trl-trl-{rep}", argv, THREADS)
    return measured(job, out / "steps.jsonl")


def run(quick: bool) -> dict:
    reps = 1 if quick else 3
    config = orpo_config()
    runs = interleaved({"ours": lambda rep: ours(config, rep), "trl": lambda rep: trl(config, rep)}, reps,
                       lambda name, rep, r: log(f"orpo-trl: {name} rep {rep + 1}/{reps}: {r['steps_per_s']:.3f} "
                                                f"steps/s, peak RSS {r['peak_rss_mb']:.0f} MiB"))
    note = (f"1 process each, fp32, 8-layer hidden-512 Llama, {llama_params(MODEL) / 1e6:.0f}M params, vocab "
            f"{VOCAB:,}, {MICRO} pairs x {ACCUM} micro-steps a step (~330-token sequences), no reference model; "
            f"{INTERVALS} step intervals a run after {WARMUP} warm-up steps, medians; {reps} alternating runs each; "
            f"{DEEPSPEED_NOTE}")

    def pair(key: str) -> tuple[list, list]:
        return [r[key] for r in runs["ours"]], [r[key] for r in runs["trl"]]
    return {"figures": [
        figure("orpo_trl_speed", "ORPO steps/s, ours / TRL ORPOTrainer", *pair("steps_per_s"), "steps/s", (">=", 1.0),
               note),
        figure("orpo_trl_rss", "ORPO peak RSS, ours / TRL ORPOTrainer", *pair("peak_rss_mb"), "MiB", ("<=", 0.8), note),
    ], "runs": runs}
