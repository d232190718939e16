"""Figure 5 - the chunked loss: peak RSS and step time of training steps whose logits would be large (a
151,936-token vocabulary, as Qwen2.5's, and one 2,048-token sequence a micro-step), with the LM head and
cross-entropy in chunks of `train.loss_chunk_tokens` target tokens against the full-logits path
(`loss_chunk_tokens: 0`). One rank, ZeRO-2, the tiny 2-layer model otherwise; runs alternate
(full, chunked, chunked, full, ...) so drifting load hits both alike.
"""

from __future__ import annotations

import shutil

from common import (WORK, Job, figure, median, ours_argv, read_jsonl, run_config, step_intervals,
                    timed_steps, warm_cache, write_text_dataset)

VOCAB = 151_936
WARMUP = 2
STEPS = timed_steps(WARMUP)  # INTERVALS step intervals a run after the warm-up


def loss_config(chunk: int):
    model = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "max_position_embeddings": 2048, "tie_word_embeddings": False, "pad_token_id": 2, "bos_token_id": 0,
             "eos_token_id": 1}
    # ~1,400 words: every row fills the 2,048 tokens (1.6 tokens a word with the shipped tokenizer)
    data = write_text_dataset(WORK / "data" / "rows-200-w1400.jsonl", rows=200, words_per_row=1400, seed=3)
    return run_config(f"loss-c{chunk}", model, data, max_length=2048, micro=1, accum=1, steps=STEPS,
                      output_dir=WORK / "runs" / f"loss-c{chunk}", train={"loss_chunk_tokens": chunk})


def one_run(chunk: int, rep: int) -> dict:
    config = loss_config(chunk)
    out = WORK / "runs" / f"loss-c{chunk}-{rep}"
    shutil.rmtree(out, ignore_errors=True)
    job = Job(ours_argv(config, [f"output_dir={out}"], nproc=1),
              WORK / "logs" / f"loss-c{chunk}-{rep}.log").start()
    job.wait(900)
    times = [r["time"] for r in read_jsonl(out / "metrics.jsonl")]
    return {"peak_rss_mb": job.peak_rss / 2**20, "step_s": median(step_intervals(times, WARMUP))}


def run(quick: bool) -> dict:
    reps = 1 if quick else 3
    warm_cache(loss_config(0))  # the same data for both: tokenized once, before anything is measured
    runs = {0: [], 256: []}
    for rep in range(reps):
        for chunk in ((0, 256) if rep % 2 == 0 else (256, 0)):
            runs[chunk].append(one_run(chunk, rep))
    note = (f"1 rank, ZeRO-2, vocab {VOCAB:,}, 2,048 tokens a micro-step; {reps} alternating pairs; medians; step "
            f"time the median of a run's {STEPS - WARMUP - 1} step intervals after {WARMUP} warm-up steps")

    def pair(key: str) -> tuple[list, list]:
        return [r[key] for r in runs[256]], [r[key] for r in runs[0]]

    return {
        "figures": [
            figure("loss_rss", "peak RSS of training, chunked loss (256) / full logits", *pair("peak_rss_mb"), "MiB",
                   ("<=", 0.35), note),
            figure("loss_step_time", "step time, chunked loss (256) / full logits", *pair("step_s"), "s",
                   ("<=", 1.1), note),
        ],
        "raw": {str(k): v for k, v in runs.items()},
    }
