"""DPO beside TRL's DPOTrainer: steps/s and peak RSS of ds-finetune's DPO loop against TRL 1.16's on the same
work, one process each on the CPU: the same model (a 2-layer Llama with a 151,936-token vocabulary, as
Qwen2.5's, where the LM head dominates), the same pairs file (~100-word prompts, ~200-word completions),
the same batch (2 pairs a micro-step, 2 micro-steps a step), fp32, torch AdamW, the same LR schedule,
sigmoid loss, beta 0.1, full fine-tuning with the reference log-probs precomputed before training on both
sides (TRL: `precompute_ref_log_probs=True`; ours: `reference.py`, its folder deleted before every run so
each run computes it, as TRL does for an in-memory dataset).

Ours runs `launch/train.py` as one process (no launcher) under DeepSpeed at `train.zero_stage` STAGE; TRL's
Trainer runs without DeepSpeed (`bench/trl_dpo_train.py`; see DEEPSPEED_NOTE). Runs alternate (ours, TRL,
TRL, ours, ...), each with every core as intra-op threads; steps/s from the per-step end times after WARMUP steps, peak RSS of the process sampled
every 0.1 s (the reference pass included on both sides); ratios are medians of the neighbouring pairs'.
"""

from __future__ import annotations

import os
import shutil

from common import (BENCH, PY, ROOT, WORK, WORDS, Job, figure, read_jsonl, run_config,
                    step_intervals, steps_per_s, write_jsonl_dataset)

VOCAB = 151_936
STEPS, WARMUP = 5, 2
STAGE = 0
THREADS = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}  # one process each: every core, on both sides
DEEPSPEED_NOTE = (f"TRL runs plain PyTorch (no DeepSpeed, see docs/benchmarks.md); ours runs under DeepSpeed "
                  f"ZeRO-{STAGE}, its cheapest stage on one process")


def pairs_dataset():
    def row(rng):
        return {"prompt": " ".join(rng.choices(WORDS, k=100)), "chosen": " " + " ".join(rng.choices(WORDS, k=100)),
                "rejected": " " + " ".join(rng.choices(WORDS, k=100))}
    # STEPS x 4 pairs: TRL precomputes the reference over the whole dataset, so it holds no pair a run skips
    return write_jsonl_dataset(WORK / "data" / "pairs-20-w100-100.jsonl", rows=20, seed=7, make_row=row)


def trl_config():
    model = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "max_position_embeddings": 1024, "tie_word_embeddings": False, "pad_token_id": 2, "bos_token_id": 0,
             "eos_token_id": 1}
    config = run_config("dpo-trl", model, pairs_dataset(), max_length=1024, micro=2, accum=2, steps=STEPS,
                        output_dir=WORK / "runs" / "dpo-trl-ours", train={"objective": "dpo", "zero_stage": STAGE})
    config.write_text(config.read_text().replace("format: text", "format: preference"))
    return config


def ours(config, rep: int) -> dict:
    out, cache = WORK / "runs" / f"dpo-trl-ours-{rep}", WORK / "dpo-trl-cache"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache / "reference", ignore_errors=True)  # every run computes its reference once
    argv = [PY, str(ROOT / "launch" / "train.py"), "--config", str(config), f"output_dir={out}",
            f"data.cache_dir={cache}"]
    job = Job(argv, WORK / "logs" / f"dpo-trl-ours-{rep}.log", THREADS).start()
    job.wait(900)
    rows = read_jsonl(out / "metrics.jsonl")
    return {"steps_per_s": steps_per_s(step_intervals([r["time"] for r in rows], WARMUP)),
            "peak_rss_mb": job.peak_rss / 2**20, "losses": [r["loss"] for r in rows]}


def trl(config, rep: int) -> dict:
    out = WORK / "runs" / f"dpo-trl-trl-{rep}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    steps_log = out / "steps.jsonl"
    argv = [PY, str(BENCH / "trl_dpo_train.py"), "--config", str(config), "--out", str(out),
            "--steps-log", str(steps_log)]
    job = Job(argv, WORK / "logs" / f"dpo-trl-trl-{rep}.log", THREADS).start()
    job.wait(900)
    rows = read_jsonl(steps_log)
    return {"steps_per_s": steps_per_s(step_intervals([r["time"] for r in rows], WARMUP)),
            "peak_rss_mb": job.peak_rss / 2**20, "losses": [r["loss"] for r in rows]}


def run(quick: bool) -> dict:
    reps = 1 if quick else 3
    config = trl_config()
    runs = {"ours": [], "trl": []}
    sides = {"ours": ours, "trl": trl}
    for rep in range(reps):
        for name in (("ours", "trl") if rep % 2 == 0 else ("trl", "ours")):
            runs[name].append(sides[name](config, rep))
    note = (f"1 process each, fp32, vocab {VOCAB:,}, 2 pairs x 2 micro-steps a step (~320-token sequences), "
            f"reference precomputed on both sides; {reps} alternating runs each; {DEEPSPEED_NOTE}")

    def pair(key: str) -> tuple[list, list]:
        return [r[key] for r in runs["ours"]], [r[key] for r in runs["trl"]]

    return {
        "figures": [
            figure("dpo_trl_speed", "DPO steps/s, ours / TRL DPOTrainer", *pair("steps_per_s"), "steps/s",
                   (">=", 1.0), note),
            figure("dpo_trl_rss", "DPO peak RSS, ours / TRL DPOTrainer", *pair("peak_rss_mb"), "MiB", ("<=", 0.8), note),
        ],
        "runs": runs,
    }
