"""GRPO beside TRL's GRPOTrainer: steps/s and peak RSS of ds-finetune's GRPO loop against TRL 1.16's on the same
work, one process each on the CPU, and the share of a step each spends generating.

The same model as `dpo-trl` (a random 8-layer Llama, hidden 512, vocabulary 32,000: its LM head is ~28 % of
the parameters), the same prompts file (every prompt PROMPT_TOKENS tokens as both sides tokenize it, the
tokenizer's own special tokens included, so no batch is padded differently on the two sides), PROMPTS prompts a micro-step and ACCUM micro-steps a step, G completions a
prompt of exactly COMPLETION tokens (max_completion_length; the eos token is suppressed on both sides,
bench/children/grpo_generation.py, so no completion ends early and both sides generate the same tokens),
temperature / top_p / top_k SAMPLING, fp32, torch AdamW with the same LR schedule and clipping, loss_type
dapo, beta 0, num_iterations 1, the same reward function (bench/children/grpo_reward.py). Ours runs
ds-finetune's training (`ds_finetune.train.main`) as one process under DeepSpeed ZeRO-0; TRL's Trainer runs
without DeepSpeed and generates with transformers' `generate` (use_vllm False). Every core is an intra-op
thread on both sides. Runs alternate (ours, TRL, TRL, ours, ...).

Each run trains STEPS steps; the first WARMUP are dropped and the figures come from the other INTERVALS step
intervals (end-of-step times: metrics.jsonl on ours, a callback on TRL's log on TRL's). Generation: each
side's generation call is timed (ours: the rollout's `generate`; TRL: `_generate_single_turn`, its padding,
`generate` and eos masking) and a step's share is the time of the calls that ended inside its interval over
the interval (ours' own `time/generate` from metrics.jsonl is kept beside it). Every timed step must have
generated the same completions, tokens and prompt tokens on both sides (checked; the section fails otherwise).
Peak RSS of the process is sampled every 0.1 s; ratios are medians of the neighbouring pairs'.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import yaml

from common import (CHILDREN, INTERVALS, PY, TOKENIZER, WORK, WORDS, Job, figure, interleaved, llama_params, log,
                    median, read_jsonl, run_child, run_config, step_intervals, timed_steps)
from dpo_trl import HEAD_SHARE, MODEL, VOCAB

G = 4
PROMPTS, ACCUM = 2, 1  # prompts a micro-step (x G completions), micro-steps a step
PROMPT_TOKENS, COMPLETION = 24, 48
SAMPLING = {"temperature": 1.0, "top_p": 0.95, "top_k": 50}
WARMUP = 2
STEPS = timed_steps(WARMUP)
STAGE = 0
THREADS = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}  # one process each: every core, on both sides
REWARD = "grpo_reward:known_token_share"  # bench/children/grpo_reward.py, on both children's path


def prompts_dataset(rows: int = 256):
    """Prompts of exactly PROMPT_TOKENS tokens each as `tok(text)` gives them (what both sides run: TRL's
    GRPOTrainer and ds-finetune's format prompt), from the bench's words."""
    path = WORK / "data" / f"grpo-prompts-{rows}-t{PROMPT_TOKENS}-tok.jsonl"
    if path.exists():
        return path
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    rng, out = random.Random(11), []
    while len(out) < rows:
        words = []
        while len(tok(" ".join(words))["input_ids"]) < PROMPT_TOKENS:
            words.append(rng.choice(WORDS))
        text = " ".join(words)
        if len(tok(text)["input_ids"]) == PROMPT_TOKENS:
            out.append({"prompt": text})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in out))
    os.replace(tmp, path)
    return path


def grpo_config(steps: int = STEPS):
    config = run_config("grpo", MODEL, prompts_dataset(), max_length=PROMPT_TOKENS + COMPLETION, micro=PROMPTS,
                        accum=ACCUM, steps=steps, output_dir=WORK / "runs" / "grpo-ours",
                        train={"objective": "grpo", "zero_stage": STAGE})
    cfg = yaml.safe_load(config.read_text())
    cfg["data"].update(format="prompt", max_prompt_length=PROMPT_TOKENS)
    cfg["grpo"] = {"num_generations": G, "max_completion_length": COMPLETION, **SAMPLING, "loss_type": "dapo",
                   "beta": 0.0, "num_iterations": 1}
    cfg["rewards"] = [{"function": REWARD}]
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return config


def measured(job: Job, times: list[float], generations_log, own_generate=None) -> dict:
    """A finished run's figures: steps/s, peak RSS, generation seconds and share of each timed step, and what
    each timed step generated (completions, tokens, prompt tokens)."""
    calls = [json.loads(line) for line in generations_log.read_text().splitlines()]
    assert len(times) == STEPS, (len(times), STEPS)
    intervals = step_intervals(times, WARMUP)
    gen_s, work = [], []
    for k, seconds in enumerate(intervals):
        start, end = times[WARMUP + k], times[WARMUP + k + 1]
        inside = [c for c in calls if start < c["end"] <= end]
        gen_s.append(sum(c["end"] - c["start"] for c in inside))
        work.append(tuple(sum(c[key] for c in inside) for key in ("completions", "tokens", "prompt_tokens")))
    shares = [g / s for g, s in zip(gen_s, intervals)]
    out = {"steps_per_s": 1 / median(intervals), "peak_rss_mb": job.peak_rss / 2**20,
           "generate_s": median(gen_s), "rest_s": median([s - g for g, s in zip(gen_s, intervals)]),
           "generation_share": median(shares), "work": sorted(set(work)), "intervals": intervals}
    if own_generate is not None:  # ours' own time/generate over the same intervals
        out["own_generation_share"] = median([g / s for g, s in zip(own_generate[WARMUP + 1:], intervals)])
    return out


def ours(config, rep: int) -> dict:
    out = WORK / "runs" / f"grpo-ours-{rep}"
    shutil.rmtree(out, ignore_errors=True)
    generations = out.with_suffix(".generations.jsonl")
    generations.unlink(missing_ok=True)
    generations.parent.mkdir(parents=True, exist_ok=True)
    argv = [PY, str(CHILDREN / "grpo_generation.py"), str(generations), "--config", str(config), f"output_dir={out}"]
    job = run_child(f"grpo-ours-{rep}", argv, THREADS)
    rows = read_jsonl(out / "metrics.jsonl")
    return measured(job, [r["time"] for r in rows], generations, [r["time/generate"] for r in rows])


def trl(config, rep: int) -> dict:
    out = WORK / "runs" / f"grpo-trl-{rep}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    steps_log, generations = out / "steps.jsonl", out / "generations.jsonl"
    argv = [PY, str(CHILDREN / "grpo_trl.py"), "--config", str(config), "--out", str(out),
            "--steps-log", str(steps_log), "--generations", str(generations)]
    job = run_child(f"grpo-trl-{rep}", argv, THREADS)
    return measured(job, [r["time"] for r in read_jsonl(steps_log)], generations)


def run(quick: bool) -> dict:
    reps = 1 if quick else 3
    config = grpo_config()
    runs = interleaved({"ours": lambda rep: ours(config, rep), "trl": lambda rep: trl(config, rep)}, reps,
                       lambda name, rep, r: log(
                           f"grpo: {name} rep {rep + 1}/{reps}: {r['steps_per_s']:.3f} steps/s, {r['peak_rss_mb']:.0f} "
                           f"MiB, generation {r['generate_s']:.2f} s of a step ({r['generation_share']:.0%}), rest "
                           f"{r['rest_s']:.2f} s"))
    expected = [(PROMPTS * ACCUM * G, PROMPTS * ACCUM * G * COMPLETION, PROMPTS * ACCUM * G * PROMPT_TOKENS)]
    for name, rs in runs.items():
        for r in rs:
            if r["work"] != expected:
                raise RuntimeError(f"grpo: {name} generated (completions, tokens, prompt tokens) {r['work']} in its "
                                   f"timed steps, not {expected[0]} each: the two sides did not do the same work")
    note = (f"1 process each, fp32, 8-layer hidden-512 Llama, {llama_params(MODEL) / 1e6:.0f}M params, vocab {VOCAB:,} "
            f"(the head {HEAD_SHARE:.0%} of the params); {PROMPTS * ACCUM} prompts of {PROMPT_TOKENS} tokens a step "
            f"({PROMPTS} a micro-step x {ACCUM}), G={G}, {COMPLETION}-token completions (eos suppressed on both sides; "
            f"{expected[0][0]} completions, {expected[0][1]:,} tokens generated a step on both, checked), "
            f"{', '.join(f'{k} {v}' for k, v in SAMPLING.items())}, dapo, beta 0, one iteration; {INTERVALS} step "
            f"intervals a run after {WARMUP} warm-up steps, medians; {reps} alternating runs each; TRL without "
            f"DeepSpeed, transformers' generate; ours under DeepSpeed ZeRO-{STAGE}")

    def pair(key: str) -> tuple[list, list]:
        return [r[key] for r in runs["ours"]], [r[key] for r in runs["trl"]]

    share_note = ("the generation call's time (ours: the rollout's generate; TRL: _generate_single_turn) over the "
                  "step's interval, medians; ours' own time/generate (metrics.jsonl) gives "
                  f"{median([r['own_generation_share'] for r in runs['ours']]):.1%}")
    return {
        "figures": [
            figure("grpo_steps_per_s", "GRPO steps/s, ours / TRL GRPOTrainer", *pair("steps_per_s"), "steps/s",
                   (">=", 1.0), note),
            figure("grpo_peak_rss", "GRPO peak RSS, ours / TRL GRPOTrainer", *pair("peak_rss_mb"), "MiB", ("<=", 0.8),
                   note),
            figure("grpo_generation_share", "GRPO generation share of a step, ours / TRL", *pair("generation_share"),
                   "of a step", None, share_note),
            figure("grpo_generate_s", "GRPO generation, s a step, ours / TRL", *pair("generate_s"), "s", None,
                   share_note),
            figure("grpo_rest_s", "GRPO rest of a step (rewards, log-probs, update), s, ours / TRL", *pair("rest_s"),
                   "s", None, share_note),
        ],
        "runs": runs,
    }
