"""`make bench`: the figures that decide between ds-finetune and HF Trainer + DeepSpeed, on this machine.

Every figure is a ratio against a baseline measured in this same invocation (the machine is shared and
noisy; absolute times are not stable), from medians of interleaved repetitions:

  1. overhead      ds-finetune's loop vs a bare DeepSpeed loop            (bench/overhead.py)
  2. resume        resume-to-first-step at 90 % vs 1 % of an epoch        (bench/resume_cost.py)
  3. checkpoint    save MB/s vs a dd-style write + fsync                   (bench/ckpt_throughput.py)
  4. side-by-side  steps/s, peak RSS, kill/resume exactness vs HF Trainer (bench/side_by_side.py)
  5. gpu           bf16 ZeRO-2/3 tokens/s and MFU, where a GPU is present  (bench/gpu.py)
  6. data          preparation rows/s vs datasets.map; RSS vs dataset size (bench/data_prep.py)
  7. elastic       peak RSS of a converted resume / export vs a fresh run  (bench/elastic.py)
  8. loss          peak RSS and step time, chunked loss vs full logits     (bench/loss_memory.py)
  9. lora          checkpoint size, save stall, step time: LoRA vs full    (bench/lora_cost.py)
 10. async         save stall per checkpoint, background vs synchronous    (bench/async_cost.py)
 11. verify        resume hashing, 2 ranks sharing vs 1 process alone      (bench/verify_split.py)
 12. mixture       a mixture's resume at sample 5M vs 0; order RSS vs rows  (bench/mixture.py)
 13. dpo           DPO peak RSS and step time, chunked log-probs vs full     (bench/dpo_memory.py)
 14. dpo-trl       DPO tokens/s, peak RSS, phases vs TRL's DPOTrainer      (bench/dpo_trl.py)
 15. long          per-rank RSS, reach, step time: SP=2 vs SP=1 at 16k     (bench/long_context.py)
 16. grpo          GRPO steps/s, peak RSS, generation share vs TRL         (bench/grpo.py)

Prints a table and writes bench/results/<date>-<machine>.json and .png (`-quick` added for --quick). Every
figure carries its id, value (ratio), spread over its repetitions, target, whether it is met, the commit and
the machine. A full run of every section without errors also writes docs/benchmarks.md from its template
(bench/benchmarks.md.in); a run of some sections without errors then replaces those sections' figures in it
(the doc names both files); `python bench/report.py --render` rewrites it after an edit of the template.
Scratch files go to build/bench/; each section's run folders (checkpoints) are deleted when it ends.

    python bench/run.py [--quick] [--only overhead,resume,...]
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, WORK, log  # noqa: E402
import report  # noqa: E402

SECTIONS = {"overhead": "overhead", "checkpoint": "ckpt_throughput", "resume": "resume_cost",
            "side-by-side": "side_by_side", "loss": "loss_memory", "data": "data_prep", "elastic": "elastic",
            "lora": "lora_cost", "async": "async_cost", "verify": "verify_split", "mixture": "mixture",
            "gpu": "gpu", "dpo": "dpo_memory", "dpo-trl": "dpo_trl", "long": "long_context",
            "grpo": "grpo", "orpo-trl": "orpo_trl"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions and steps: a smoke run of a few minutes")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    args = p.parse_args(argv)
    args.sections = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def run_sections(names: list[str], quick: bool) -> tuple[dict, list, dict, dict]:
    """Run each section; one that fails is reported and the others still run."""
    results, figures, errors, skipped = {}, [], {}, {}
    for name in names:
        t0 = time.time()
        log(f"== {name} ==")
        try:
            result = importlib.import_module(SECTIONS[name]).run(quick)
        except Exception as e:  # a broken section must not cost the figures of the others
            traceback.print_exc()
            errors[name] = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            results[name] = {"error": errors[name]}
            continue
        finally:  # a full bench writes ~40 GB of checkpoints; its figures are taken, the folders are not needed
            shutil.rmtree(WORK / "runs", ignore_errors=True)
        result["wall_s"] = round(time.time() - t0, 1)
        results[name] = result
        figures += [{**f, "section": name} for f in result.get("figures", [])]
        if result.get("skipped"):
            skipped[name] = result["skipped"]
        log(f"{name} took {result['wall_s']:.0f} s")
    return results, figures, errors, skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    machine = report.machine_info(WORK)
    log(f"machine: {machine['cpu']}, {machine['logical_cores']} cores, torch {machine['torch']}, "
        f"deepspeed {machine['deepspeed']}; mode {'quick' if args.quick else 'full'}")
    at_start = report.code_version(ROOT)
    results, figures, errors, skipped = run_sections(args.sections, args.quick)
    machine["load_avg_at_end"] = os.getloadavg()

    subset = "" if set(args.sections) == set(SECTIONS) else "-" + "-".join(args.sections)  # never overwrite a full run
    stem = f"{time.strftime('%Y-%m-%d')}-{report.machine_slug(machine)}{subset}{'-quick' if args.quick else ''}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    wall = time.time() - t0
    version = report.code_version(ROOT)
    # The sections' processes import the checkout while the run lasts: an edit at any point of it counts.
    if at_start != version:
        version = {**version, "uncommitted_changes": True}
    figures = [{**f, "commit": version["commit"], "machine": report.machine_slug(machine)} for f in figures]
    payload = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "mode": "quick" if args.quick else "full",
               **version,
               "command": " ".join(map(shlex.quote, [sys.executable, *sys.argv])), "wall_s": round(wall, 1),
               "machine": machine, "figures": figures, "errors": errors, "skipped": skipped, "sections": results}
    report.write_json(RESULTS / f"{stem}.json", payload)
    title = (f"ds-finetune `make bench` ({payload['mode']}), {payload['date'][:16]}\n{machine['cpu']}, "
             f"{machine['logical_cores']} cores, torch {machine['torch']}, deepspeed {machine['deepspeed']}")
    report.write_chart(RESULTS / f"{stem}.png", figures, title)
    if not args.quick and not errors:  # docs/benchmarks.md quotes a full run, or a full run and later sections
        if set(args.sections) == set(SECTIONS):
            report.update_doc([f"{stem}.json"])
        elif report.doc_results_names():
            report.update_doc(report.with_later_run(report.doc_results_names(), f"{stem}.json"))

    print()
    print(report.table(figures, errors, skipped))
    print(f"\nwall time {wall / 60:.1f} min; results: {RESULTS / stem}.json, {RESULTS / stem}.png")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
