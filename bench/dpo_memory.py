"""DPO at a large vocabulary: peak RSS and step time of DPO training steps whose logits would be large (a
151,936-token vocabulary, as Qwen2.5's; one pair a micro-step, i.e. two ~1,000-token sequences), with the
per-sequence log-probs from the chunked head (`train.loss_chunk_tokens: 256`) against the full logits
(`loss_chunk_tokens: 0`). One rank, ZeRO-2, full fine-tuning (the reference log-probs precomputed before
training, by the same path), the tiny 2-layer model otherwise; runs alternate (full, chunked, chunked,
full, ...). The comparison with TRL's DPOTrainer the issue asks for is not measured here.
"""

from __future__ import annotations

import shutil

from common import (WORK, WORDS, Job, figure, median, ours_argv, read_jsonl, run_config, step_intervals,
                    timed_steps, write_jsonl_dataset)

VOCAB = 151_936
WARMUP = 2
STEPS = timed_steps(WARMUP)  # INTERVALS step intervals a run after the warm-up


def pairs_dataset():
    def row(rng):
        return {"prompt": " ".join(rng.choices(WORDS, k=100)), "chosen": " " + " ".join(rng.choices(WORDS, k=500)),
                "rejected": " " + " ".join(rng.choices(WORDS, k=500))}
    # One pair a step: the reference pass (over the whole set) computes no pair the run does not train.
    return write_jsonl_dataset(WORK / "data" / f"pairs-{STEPS}-w100-500.jsonl", rows=STEPS, seed=5, make_row=row)


def dpo_config(chunk: int):
    model = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "max_position_embeddings": 1024, "tie_word_embeddings": False, "pad_token_id": 2, "bos_token_id": 0,
             "eos_token_id": 1}
    config = run_config(f"dpo-c{chunk}", model, pairs_dataset(), max_length=1024, micro=1, accum=1, steps=STEPS,
                        output_dir=WORK / "runs" / f"dpo-c{chunk}", train={"loss_chunk_tokens": chunk,
                                                                            "objective": "dpo"})
    config.write_text(config.read_text().replace("format: text", "format: preference"))
    return config


def one_run(chunk: int, rep: int, cache: str) -> dict:
    config = dpo_config(chunk)
    out = WORK / "runs" / f"dpo-c{chunk}-{rep}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(WORK / cache / "reference", ignore_errors=True)  # every run computes its reference once
    job = Job(ours_argv(config, [f"output_dir={out}", f"data.cache_dir={WORK / cache}"], nproc=1),
              WORK / "logs" / f"dpo-c{chunk}-{rep}.log").start()
    job.wait(900)
    times = [r["time"] for r in read_jsonl(out / "metrics.jsonl")]
    return {"peak_rss_mb": job.peak_rss / 2**20, "step_s": median(step_intervals(times, WARMUP))}


def run(quick: bool) -> dict:
    reps = 1 if quick else 3
    runs = {0: [], 256: []}
    for rep in range(reps):
        for chunk in ((0, 256) if rep % 2 == 0 else (256, 0)):
            runs[chunk].append(one_run(chunk, rep, f"dpo-cache-{chunk}"))
    note = (f"1 rank, ZeRO-2, DPO, vocab {VOCAB:,}, one pair (2 x ~1,000 tokens) a micro-step; {reps} alternating pairs"
            f"; step time the median of a run's {STEPS - WARMUP - 1} step intervals after {WARMUP} warm-up steps")

    def pair(key: str) -> tuple[list, list]:
        return [r[key] for r in runs[256]], [r[key] for r in runs[0]]

    return {
        "figures": [
            figure("dpo_rss", "peak RSS of DPO training, chunked log-probs (256) / full logits", *pair("peak_rss_mb"),
                   "MiB", ("<=", 0.4), note),
            figure("dpo_step_time", "DPO step time, chunked log-probs (256) / full logits", *pair("step_s"), "s",
                   ("<=", 1.2), note),
        ],
        "runs": {str(k): v for k, v in runs.items()},
    }
