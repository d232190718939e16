"""`make bench` section `long`: what sequence parallelism (`train.sequence_parallel`, DeepSpeed Ulysses) buys
a rank on one long sequence. SP=2 is 2 ranks sharing each sequence (DP=1); SP=1, the baseline, is 1 rank
training the whole sequence: the same sequence and the same global batch on each layout, compared per rank.

1. Memory at 16,384 tokens: per-rank peak RSS, SP=2 / SP=1, two ways: the step's increment (the peak
   during step 2 above the RSS once the engine was built: activations, gradients, the all-to-all buffers,
   which SP divides, and the optimizer state, which ZeRO-3 partitions over the 2 ranks) and the process's
   total peak (with the imports, the model, the ZeRO partitions and the data). SP=2's figure is its larger
   rank's. Target <= 0.6 on both.
2. Longest sequence within a per-rank cap, SP=2 / SP=1: the cap is SP=1's median total peak at 16,384
   tokens in this invocation (what one rank needs to train that sequence alone), and each layout's longest
   length is extrapolated linearly from its total peaks at 4,096, 8,192 and 16,384 tokens (a least-squares
   line; its worst residual is recorded). Linear because nothing here grows faster with the length: sdpa on
   the CPU runs its flash kernel (no length x length scores), the loss is the fused chunked one. Not a search
   by training at each length: a 32k-token step takes minutes on this machine. Target >= 1.8.
3. Step time at 16,384 tokens, SP=2 / SP=1 (no target): the median of TIME_STEPS steps at that length a
   launch (the slower rank's time each); each rank computes with one core (OMP_NUM_THREADS, as every
   section), so SP=2 uses two cores where SP=1 uses one.

The model is a random Llama sized for this machine (4 layers, hidden 128, 4 query / 2 key-value heads) with
Llama-2's 32,000-token vocabulary, so the head and the loss (fused, 256 targets a chunk) are a real share;
fp32, ZeRO-3 as configs/llama3-8b-32k-sp4-zero3.yaml, no gradient checkpointing. Each launch (one a layout
and repetition) trains a 512-token warm-up step (the first all-to-alls; Adam's state and the gradient
buffers are allocated there), then one step at each length, 4k, 8k, 16k (the memory figures: lengths
ascend, so no step runs on heap a longer one left), then TIME_STEPS - 1 more at 16k (the time figure): the
first tokens of the same 16k-token sequence, measured by bench/children/long_context.py reading /proc in each rank.
Launches alternate SP=1, SP=2, SP=2, SP=1, ..., 3 repetitions.

Why SP=2 is not at 0.5 (measured, 2026-12, issue 30):
- The allocator. glibc's default malloc raises its mmap threshold to each freed mmapped block's size, so
  after the first step activations come from the heap and stay in RSS once freed: RSS counts freed-but-kept
  heap and fragmentation as well as what the step holds. The figures are measured with that default
  allocator, what users get (the launcher sets no malloc tunable). An earlier round ran the jobs with
  MALLOC_MMAP_THRESHOLD_=65536 (RSS then follows live memory), a setting no user run has: it measured the
  reach at 2.04 where the default allocator gave 1.47, and the 16k step increment at 0.60 where the default
  gave 0.73 (1,130 MiB at SP=1, 828 at SP=2: 250-290 MiB a rank of freed-but-kept heap, more of SP=2's
  share). The accounting below is from that round, of live memory.
- Per token SP=2 holds 0.52 of SP=1 (23.5 vs 44.9 MiB a 1k tokens): the tensors saved for backward halve
  (counted with saved_tensors_hooks at 8k: 198 vs 366 MiB), Ulysses' gathered q/k/v/output being the
  same bytes as the slices they came from; the 4 % above 0.5 is the attention output's second copy (after
  the all-to-all back, o_proj saves its own input; at SP=1 that input is sdpa's output). Nothing of ours
  is full-length on a rank: no 4-D mask (Ulysses drops it; sdpa runs causal), positions, rotary tables and
  labels are sliced before the model (only Ulysses all-gathers the int64 positions), and the fused loss
  runs on the slice's targets.
- About 160 MiB a rank of the step did not depend on the length and was the same at SP=1 and SP=2: the
  part of ZeRO-3's reduce bucket the full gradients touched (~36 MiB with DeepSpeed's 5e8-element bucket;
  ds_finetune/zero.py now sizes it hidden_size^2 as transformers' "auto", 64 KiB here), Adam's state
  (68 MiB at SP=1, 34 at SP=2, allocated by the warm-up step), the loss's 256 x 32,000 fp32 chunk buffer
  (31 MiB), the head's gradient (16 MiB), gathered embedding/head weights and comm buffers. Most of it
  follows the vocabulary, 8.2M of the model's 9M parameters. It is not an artefact of the small model: for
  configs/llama3-8b-32k-sp4-zero3.yaml (gradient checkpointing, 8k tokens a rank) the head's fp32
  gradient (2 GiB), the loss's chunk buffer (0.5 GiB) and the gathered head are of the same order as the
  per-token memory. At 16k it kept the step ratio just above 0.6 (0.613 with the 5e8 bucket); with ideal
  halving per token it would have been 0.59. The total peak adds ~480-530 MiB a process (torch,
  DeepSpeed, the model, the data) that no layout divides, so its 0.6 target is out of reach at this size.
"""

from __future__ import annotations

import json
import shutil

from common import CHILDREN, WORK, Job, log, median, run_config, torchrun, warm_cache, write_text_dataset

VOCAB = 32_000
MAIN, FIT = 16_384, (4_096, 8_192, 16_384)
QUICK_MAIN, QUICK_FIT = 4_096, (1_024, 2_048, 4_096)
WARMUP_TOKENS = 512  # step 1: the warm-up (first all-to-alls, Adam's state, gradient buffers), not measured
TIME_STEPS = 5  # steps at the main length a launch, for its step time (the first is also its memory step)
MiB = 2**20


def model_config(max_length: int) -> dict:
    return {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 128, "intermediate_size": 384,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": max_length, "attn_implementation": "sdpa", "tie_word_embeddings": False,
            "pad_token_id": 2, "bos_token_id": 0, "eos_token_id": 1}


def long_config(length: int, sp: int, steps: int = 2):
    # ~1.6 tokens a word with the shipped tokenizer: 12,000 words fill 16,384 tokens (rows are truncated to
    # max_length, so every step trains exactly `length` tokens).
    words = max(1_000, length * 3 // 4)
    data = write_text_dataset(WORK / "data" / f"long-rows-16-w{words}.jsonl", rows=16, words_per_row=words, seed=7)
    return run_config(f"long-{length}-sp{sp}", model_config(length), data, max_length=length, micro=1, accum=1,
                      steps=steps, output_dir=WORK / "runs" / f"long-{length}-sp{sp}",
                      train={"zero_stage": 3, "loss_chunk_tokens": 256, "sequence_parallel": sp, "warmup_steps": 0})


def one_run(lengths, sp: int, rep: int) -> dict:
    """One launch: a warm-up step, one step at each of `lengths` (ascending; the first tokens of the same
    sequence), then TIME_STEPS - 1 more at the longest; per length, per-rank memory of its first step and the
    median time of its steps (the slower rank's each), from the probe's JSON."""
    name = f"long-sp{sp}-{rep}"
    out, report = WORK / "runs" / name, WORK / "runs" / f"{name}.json"
    shutil.rmtree(out, ignore_errors=True)
    timed = (*lengths, *[lengths[-1]] * (TIME_STEPS - 1))
    tokens = ",".join(str(n) for n in (WARMUP_TOKENS, *timed))
    config = long_config(max(lengths), sp, steps=1 + len(timed))
    argv = torchrun(CHILDREN / "long_context.py", [str(report), "--tokens", tokens, "--config", str(config),
                                               f"output_dir={out}"], nproc=sp)
    Job(argv, WORK / "logs" / f"{name}.log").start().wait(900)
    ranks = json.loads(report.read_text())["ranks"]
    shutil.rmtree(out, ignore_errors=True)
    report.unlink()
    seconds = [max(r["steps"][i]["seconds"] for r in ranks) for i in range(1, 1 + len(timed))]
    result = {}
    for i, n in enumerate(lengths, start=1):
        # The step's peak above the rank's RSS when its engine was built (so it includes what the warm-up
        # left for every later step: Adam's state, gradient buffers); the total is the peak a process that
        # trained this one length would reach: startup, warm-up and this step. The larger rank's.
        step = [r["steps"][i] for r in ranks]
        result[n] = {"step_mib": max(s["peak"] - r["base"] for s, r in zip(step, ranks)) / MiB,
                     "peak_mib": max(max(r["startup_peak"], r["steps"][0]["peak"], s["peak"])
                                     for s, r in zip(step, ranks)) / MiB,
                     "base_mib": max(r["base"] for r in ranks) / MiB,
                     "rss_before_step_mib": max(s["rss_before"] for s in step) / MiB,
                     "step_s": median([t for t, m in zip(seconds, timed) if m == n]),
                     "steps_s": [t for t, m in zip(seconds, timed) if m == n]}
    return result


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Least-squares y = a + b x; returns (a, b, the largest |residual|)."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    a = my - b * mx
    return a, b, max(abs(y - a - b * x) for x, y in points)


def longest_within(cap: float, peaks: dict, sp: int, lengths) -> dict:
    """The length at which SP=sp's total peak per rank (`peaks[(length, sp)]`), fitted by a line over
    `lengths`, reaches `cap`."""
    a, b, residual = fit_line([(n, peaks[(n, sp)]) for n in lengths])
    return {"tokens": (cap - a) / b, "mib_at_0": a, "mib_per_1k_tokens": b * 1024, "worst_residual_mib": residual}


def reach_of(cap: float, peaks: dict, lengths) -> float:
    return longest_within(cap, peaks, 2, lengths)["tokens"] / longest_within(cap, peaks, 1, lengths)["tokens"]


def spread(xs: list[float]) -> list[float]:
    return [min(xs), max(xs)]


def run(quick: bool) -> dict:
    main, lengths = (QUICK_MAIN, QUICK_FIT) if quick else (MAIN, FIT)
    warm_cache(long_config(main, 1))  # tokenized once, before anything is measured (not SP-dependent)
    runs = {(n, sp): [] for n in lengths for sp in (1, 2)}
    for rep in range(3):
        for sp in ((1, 2) if rep % 2 == 0 else (2, 1)):
            for n, r in one_run(lengths, sp, rep).items():
                runs[(n, sp)].append(r)
                log(f"long: {n} tokens, SP={sp}, rep {rep}: {r}")
    a, b = runs[(main, 2)], runs[(main, 1)]
    step_ratios = [x["step_mib"] / y["step_mib"] for x, y in zip(a, b)]
    peak_ratios = [x["peak_mib"] / y["peak_mib"] for x, y in zip(a, b)]
    time_ratios = [x["step_s"] / y["step_s"] for x, y in zip(a, b)]
    # The reach from the medians, and from each repetition alone (its own cap and lines) for the spread.
    cap = median([r["peak_mib"] for r in b])
    medians = {key: median([r["peak_mib"] for r in rs]) for key, rs in runs.items()}
    longest = {sp: longest_within(cap, medians, sp, lengths) for sp in (1, 2)}
    reach = longest[2]["tokens"] / longest[1]["tokens"]
    reach_reps = [reach_of(b[i]["peak_mib"], {key: rs[i]["peak_mib"] for key, rs in runs.items()}, lengths)
                  for i in range(len(b))]
    setup = (f"one {main:,}-token sequence a step; SP=2: 2 ranks (DP=1), SP=1: 1 rank; ZeRO-3, fp32, 4-layer "
             f"hidden-128 Llama, vocab {VOCAB:,}, sdpa, fused loss (256); 3 alternating repetitions, medians; "
             f"per rank (SP=2: the larger rank); glibc's default malloc settings; lengths as steps of one launch "
             f"after a {WARMUP_TOKENS}-token warm-up")
    return {
        "figures": [
            {"id": "long_step_rss", "figure": f"step's RSS increment per rank at {main // 1024}k tokens, SP=2 / SP=1",
             "ours": median([r["step_mib"] for r in a]), "baseline": median([r["step_mib"] for r in b]),
             "unit": "MiB", "ratio": median(step_ratios),
             "reps": len(a), "spread": spread(step_ratios), "target": ["<=", 0.6], "met": median(step_ratios) <= 0.6,
             "note": setup + "; peak during the step (VmHWM reset before it) minus RSS once the engine was built"},
            {"id": "long_peak_rss", "figure": f"total peak RSS per rank at {main // 1024}k tokens, SP=2 / SP=1",
             "ours": median([r["peak_mib"] for r in a]), "baseline": median([r["peak_mib"] for r in b]),
             "unit": "MiB", "ratio": median(peak_ratios), "reps": len(a), "spread": spread(peak_ratios), "target": ["<=", 0.6],
             "met": median(peak_ratios) <= 0.6,
             "note": setup + "; the process's VmHWM: imports, model, ZeRO partitions, data, the warm-up and the step"},
            {"id": "long_reach", "figure": "longest sequence within a per-rank cap, SP=2 / SP=1 (extrapolated)",
             "ours": longest[2]["tokens"], "baseline": longest[1]["tokens"], "unit": "tokens", "ratio": reach,
             "reps": len(a), "spread": spread(reach_reps), "target": [">=", 1.8], "met": reach >= 1.8,
             "note": (f"cap {cap:,.0f} MiB a rank (SP=1's median total peak at {main:,} tokens); each layout's "
                      f"median total peaks at {', '.join(f'{n:,}' for n in lengths)} tokens fitted by a line "
                      f"and solved for the cap: extrapolated, not trained at that length")},
            {"id": "long_step_time", "figure": f"step time at {main // 1024}k tokens, SP=2 / SP=1",
             "ours": median([r["step_s"] for r in a]), "baseline": median([r["step_s"] for r in b]), "unit": "s",
             "ratio": median(time_ratios), "reps": len(a), "spread": spread(time_ratios), "target": None, "met": None,
             "note": setup + f"; median of {TIME_STEPS} steps' wall times a launch (the slower rank's each); one core "
                                    "a rank, so SP=2 computes on 2"},
        ],
        "cap_mib": cap,
        "fits": {f"sp{sp}": v for sp, v in longest.items()},
        "runs": {f"{n}-sp{sp}": v for (n, sp), v in runs.items()},
    }
