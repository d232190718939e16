"""DPO beside TRL's DPOTrainer: tokens/s and peak RSS of ds-finetune's DPO loop against TRL 1.16's on the same
work, one process each on the CPU: the same model, the same pairs file (~100-word prompts, ~100-word
completions), the same batch (2 pairs a micro-step, 2 micro-steps a step), fp32, torch AdamW, the same LR
schedule, sigmoid loss, beta 0.1, full fine-tuning with the reference log-probs precomputed before training
on both sides (TRL: `precompute_ref_log_probs=True`; ours: `objectives/dpo_reference.py`, its folder deleted before every
run so each run computes it, as TRL does for an in-memory dataset).

The model is a random 8-layer Llama, hidden 512, with a 32,000-token vocabulary (Llama-2's; the shipped
tokenizer's ids are all below it): its LM head is HEAD_SHARE (~28 %) of the parameters, so the body, not
the head, is most of the work. (An earlier round used 2 layers of hidden 64 with a 151,936-token vocabulary,
a head of ~97 % of the parameters, and its ratio was mostly the two heads.)

Ours runs ds-finetune's training (`ds_finetune.train.main`, what launch/train.py runs) as one process (no
launcher) under DeepSpeed at `train.zero_stage` STAGE; TRL's Trainer runs without DeepSpeed
(`bench/children/dpo_trl.py`; see DEEPSPEED_NOTE). Runs alternate (ours, TRL, TRL, ours, ...), each with every
core as intra-op threads. Both run with bench/children/dpo_trl_phases.py's timers (a few clock reads a
micro-step), which split each step into forward (the backbone), log-probs (the head), metrics over the
vocabulary (TRL's kernel computes entropy, mean logit and top-1 in the log-probs pass; ours none), loss (DPO
loss and batch metrics), backward and the rest (optimizer step, data: the step's interval less the phases).

Each run trains STEPS steps, one epoch of the pairs; the first WARMUP are dropped and the figures come from
the other INTERVALS step intervals. The two sides batch the pairs in different orders, so a step's tokens
differ between them: speed is tokens/s (each interval's input tokens, from metrics.jsonl's `tokens` and
TRL's `num_tokens`, over its seconds; medians) and phases are seconds per 1,000 tokens. Both sides must
have trained the same tokens over the run (checked; the section fails otherwise). Peak RSS of the process is
sampled every 0.1 s (the reference pass included on both sides); ratios are medians of the neighbouring
pairs'.
"""

from __future__ import annotations

import json
import os
import shutil

from common import (CHILDREN, INTERVALS, PY, WORK, WORDS, Job, figure, interleaved, llama, llama_params, log, median,
                    read_jsonl, run_child, run_config, step_intervals, timed_steps, write_jsonl_dataset)

VOCAB = 32_000
MODEL = {**llama(512, 8, 1408, 8, 8, 1024), "vocab_size": VOCAB}
HEAD_SHARE = VOCAB * MODEL["hidden_size"] / llama_params(MODEL)
assert HEAD_SHARE < 1 / 3, HEAD_SHARE
MICRO, ACCUM = 2, 2
WARMUP = 2
STEPS = timed_steps(WARMUP)
STAGE = 0
THREADS = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}  # one process each: every core, on both sides
DEEPSPEED_NOTE = (f"TRL runs plain PyTorch (no DeepSpeed, see docs/benchmarks.md); ours runs under DeepSpeed "
                  f"ZeRO-{STAGE}, its cheapest stage on one process")
PHASES = {"forward": "forward (backbone)", "logps": "log-probs (LM head)",
          "vocab_metrics": "metrics over the vocabulary", "loss": "loss and batch metrics", "backward": "backward",
          "other": "optimizer, data, rest"}


def pairs_dataset():
    def row(rng):
        return {"prompt": " ".join(rng.choices(WORDS, k=100)), "chosen": " " + " ".join(rng.choices(WORDS, k=100)),
                "rejected": " " + " ".join(rng.choices(WORDS, k=100))}
    # One epoch of STEPS steps: TRL precomputes the reference over the whole dataset, so it holds no pair a run skips
    rows = STEPS * MICRO * ACCUM
    return write_jsonl_dataset(WORK / "data" / f"pairs-{rows}-w100-100.jsonl", rows=rows, seed=7, make_row=row)


def trl_config():
    config = run_config("dpo-trl", MODEL, pairs_dataset(), max_length=1024, micro=MICRO, accum=ACCUM, steps=STEPS,
                        output_dir=WORK / "runs" / "dpo-trl-ours", train={"objective": "dpo", "zero_stage": STAGE})
    config.write_text(config.read_text().replace("format: text", "format: preference"))
    return config


def measured(job: Job, steps_log, phases_log) -> dict:
    """A finished run's figures: tokens/s, peak RSS, the tokens it trained, and its phases in seconds per 1,000
    tokens (medians over the timed steps; a step's phases are its micro-steps' sums)."""
    rows = read_jsonl(steps_log)
    lines = [json.loads(line) for line in phases_log.read_text().splitlines()]
    micro = [r for r in lines if "backward" in r]
    share = next((r["vocab_metrics_share"] for r in lines if "vocab_metrics_share" in r), 0.0)
    assert len(rows) == STEPS and len(micro) == STEPS * ACCUM, (len(rows), len(micro))
    tokens = [r["tokens"] for r in rows]
    intervals = step_intervals([r["time"] for r in rows], WARMUP)
    per_step, speeds = {phase: [] for phase in PHASES}, []
    for step, seconds in enumerate(intervals, start=WARMUP + 1):  # the 0-based step each interval timed
        step_tokens = tokens[step] - tokens[step - 1]
        speeds.append(step_tokens / seconds)
        phases = {p: sum(m.get(p, 0.0) for m in micro[step * ACCUM:(step + 1) * ACCUM]) for p in PHASES}
        phases["vocab_metrics"], phases["logps"] = phases["logps"] * share, phases["logps"] * (1 - share)
        phases["other"] = seconds - sum(phases.values())
        for p in PHASES:
            per_step[p].append(phases[p] * 1000 / step_tokens)
    return {"tokens_per_s": median(speeds), "peak_rss_mb": job.peak_rss / 2**20, "tokens": tokens[-1],
            "losses": [r["loss"] for r in rows],
            "vocab_metrics_share": share, "s_per_1k_tokens": {p: median(v) for p, v in per_step.items()}}


def ours(config, rep: int) -> dict:
    out, cache = WORK / "runs" / f"dpo-trl-ours-{rep}", WORK / "dpo-trl-cache"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache / "reference", ignore_errors=True)  # every run computes its reference once
    phases = out.with_suffix(".phases.jsonl")
    phases.unlink(missing_ok=True)
    phases.parent.mkdir(parents=True, exist_ok=True)
    argv = [PY, str(CHILDREN / "dpo_trl_phases.py"), str(phases), "--config", str(config), f"output_dir={out}",
            f"data.cache_dir={cache}"]
    job = run_child(f"dpo-trl-ours-{rep}", argv, THREADS)
    return measured(job, out / "metrics.jsonl", phases)


def trl(config, rep: int) -> dict:
    out = WORK / "runs" / f"dpo-trl-trl-{rep}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    steps_log, phases = out / "steps.jsonl", out / "phases.jsonl"
    argv = [PY, str(CHILDREN / "dpo_trl.py"), "--config", str(config), "--out", str(out),
            "--steps-log", str(steps_log), "--phases", str(phases)]
    job = run_child(f"dpo-trl-trl-{rep}", argv, THREADS)
    return measured(job, steps_log, phases)


def run(quick: bool) -> dict:
    reps = 1 if quick else 3
    config = trl_config()
    runs = interleaved({"ours": lambda rep: ours(config, rep), "trl": lambda rep: trl(config, rep)}, reps,
                       lambda name, rep, r: log(
                           f"dpo-trl: {name} rep {rep + 1}/{reps}: {r['tokens_per_s']:.0f} tokens/s, {r['tokens']:,} "
                           f"tokens, s a 1k tokens {json.dumps({p: round(s, 3) for p, s in r['s_per_1k_tokens'].items()})}"))
    trained = {name: sorted({r["tokens"] for r in rs}) for name, rs in runs.items()}
    if len(trained["ours"]) != 1 or trained["ours"] != trained["trl"]:
        raise RuntimeError(f"dpo-trl: the two sides trained different tokens over the run: {trained}")
    note = (f"1 process each, fp32, 8-layer hidden-512 Llama, {llama_params(MODEL) / 1e6:.0f}M params, vocab "
            f"{VOCAB:,} (the head {HEAD_SHARE:.0%} of the params), {MICRO} pairs x {ACCUM} micro-steps a step "
            f"(~330-token sequences), reference precomputed on both sides; {trained['ours'][0]:,} input tokens a run "
            f"on both sides (checked); {INTERVALS} step intervals a run after {WARMUP} warm-up steps, medians; "
            f"{reps} alternating runs each; {DEEPSPEED_NOTE}")

    def pair(key: str) -> tuple[list, list]:
        return [r[key] for r in runs["ours"]], [r[key] for r in runs["trl"]]

    def phase(p: str) -> tuple[list, list]:
        return [r["s_per_1k_tokens"][p] for r in runs["ours"]], [r["s_per_1k_tokens"][p] for r in runs["trl"]]

    phase_note = ("bench/children/dpo_trl_phases.py's timers on the same runs; TRL's metrics over the vocabulary "
                  "are its log-probs kernel's time times the share they took of it when rerun without them "
                  f"(median share {median([r['vocab_metrics_share'] for r in runs['trl']]):.0%}); ours computes none")
    return {
        "figures": [
            figure("dpo_trl_speed", "DPO tokens/s, ours / TRL DPOTrainer", *pair("tokens_per_s"), "tokens/s",
                   (">=", 1.0), note),
            figure("dpo_trl_rss", "DPO peak RSS, ours / TRL DPOTrainer", *pair("peak_rss_mb"), "MiB", ("<=", 0.8), note),
            *[figure(f"dpo_trl_{p}", f"DPO {label}, s a 1k tokens, ours / TRL", *phase(p), "s/1k tokens", None,
                     phase_note)
              for p, label in PHASES.items()],
        ],
        "runs": runs,
    }
