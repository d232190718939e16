"""Figure 6 - elastic memory: resuming under another ZeRO stage and exporting, with memory bounded by a
tensor or a shard rather than by the model. For a random Llama of hidden 640 and 8 layers (40M params,
0.16 GB fp32) and one twice as deep, each trained 2 steps at ZeRO-2 on 2 ranks once, then 3 interleaved
repetitions of:

* peak RSS of each rank during a converted resume to ZeRO-3 (conversion included) / the same in a fresh
  ZeRO-3 run on 2 ranks of the same model (target <= 1.15; the 8-layer model);
* `ckpt export --max-shard-size` of a quarter of the model: peak above the import baseline / (2 shards +
  the largest tensor) (target <= 1);
* doubling the depth: export and conversion peaks above the imports, deep / shallow (target <= 1.10);
* the conversion alone on 1 and 2 ranks: its time (2 ranks / 1 rank) and per-rank peak.

Peaks are the kernel's per-process high-water marks (VmHWM); "above the imports" is the peak minus the
RSS the same process had once its imports were done (bench/children/elastic.py resets VmHWM there): the
imports are most of a whole-process peak at this size and the same at every depth. --quick runs one
repetition of a 4x smaller pair of models. (Earlier rounds measured once a rank at 155M / 310M params; this
size lets every figure have 3 repetitions within the bench's time.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from common import (CHILDREN, PY, WORK, Job, figure, llama, llama_params, log, long_rows, median, ours_argv,
                    run_config, torchrun)

GB = 1e9


def models(quick: bool) -> dict:
    hidden, inter, heads, depths = (320, 864, 5, (4, 8)) if quick else (640, 1728, 10, (8, 16))
    return {depth: llama(hidden, depth, inter, heads, heads, 256) for depth in depths}


def rank_peak(job: Job) -> int:
    return max(job.process_peaks.values())


def train(depth: int, model: dict) -> tuple[Path, Path]:
    """The ZeRO-2 checkpoint every repetition starts from: (run config, checkpoint folder)."""
    base = WORK / "elastic" / f"d{depth}"
    shutil.rmtree(base, ignore_errors=True)
    config = run_config(f"elastic-d{depth}", model, long_rows(), max_length=64, micro=1, accum=1, steps=2,
                        output_dir=base / "run", checkpoint={"save_final": True})
    Job(ours_argv(config), WORK / "logs" / f"elastic-d{depth}-train.log").start().wait(1800)
    return config, next((base / "run" / "checkpoints").glob("step_*"))


def probe(name: str, argv_of) -> dict:
    out = WORK / "elastic" / f"{name}.json"
    out.unlink(missing_ok=True)
    Job(argv_of(out), WORK / "logs" / f"elastic-{name}.log").start().wait(1800)
    return json.loads(out.read_text())


def export(depth: int, model: dict, ckpt: Path, rep: int) -> dict:
    shard, folder = llama_params(model) * 4 // 4, WORK / "elastic" / f"d{depth}-hf-{rep}"  # a quarter of the model
    r = probe(f"d{depth}-export-{rep}", lambda out: [PY, str(CHILDREN / "elastic.py"), "export", str(ckpt),
                                                      str(out), str(folder), str(shard)])
    shutil.rmtree(folder, ignore_errors=True)
    return dict(r, shard=shard, largest=max_tensor_bytes(model))


def convert(depth: int, ckpt: Path, nproc: int, rep: int) -> dict:
    r = probe(f"d{depth}-convert{nproc}-{rep}",
              lambda out: torchrun(CHILDREN / "elastic.py", ["convert", str(ckpt), str(out)], nproc))
    shutil.rmtree(ckpt / "resharded")  # the next conversion and the resume convert again
    return r


def resume_and_fresh(depth: int, config: Path, rep: int) -> dict:
    """A converted resume to ZeRO-3 and a fresh ZeRO-3 run of the same model, one after the other."""
    no_save = ["train.max_steps=3", "checkpoint.save_final=false", "train.zero_stage=3"]
    fresh_dir = WORK / "elastic" / f"d{depth}" / "fresh"
    resumed = Job(ours_argv(config, no_save, resume="auto"), WORK / "logs" / f"elastic-d{depth}-resume-{rep}.log")
    resumed.start().wait(1800)
    fresh = Job(ours_argv(config, no_save + [f"output_dir={fresh_dir}"]), WORK / "logs" / f"elastic-d{depth}-fresh-{rep}.log")
    fresh.start().wait(1800)
    shutil.rmtree(fresh_dir, ignore_errors=True)
    return {"resume_rank_peak": rank_peak(resumed), "fresh_rank_peak": rank_peak(fresh)}


def measure(models_by_depth: dict, reps: int) -> dict:
    shallow, deep = sorted(models_by_depth)
    start = {depth: train(depth, m) for depth, m in models_by_depth.items()}
    r = {depth: {"params": llama_params(m), "export": [], "convert1": [], "convert2": [], "resume": []}
         for depth, m in models_by_depth.items()}
    for rep in range(reps):  # each repetition measures every depth once, alternating which goes first
        for depth in ((shallow, deep) if rep % 2 == 0 else (deep, shallow)):
            config, ckpt = start[depth]
            r[depth]["export"].append(export(depth, models_by_depth[depth], ckpt, rep))
            r[depth]["convert2"].append(convert(depth, ckpt, 2, rep))
            if depth == shallow:  # the time figure and the converted resume are the shallow model's
                r[depth]["convert1"].append(convert(depth, ckpt, 1, rep))
                r[depth]["resume"].append(resume_and_fresh(depth, config, rep))
        log(f"elastic rep {rep + 1}/{reps}: {json.dumps({depth: x['export'][-1] for depth, x in r.items()})} (exports)")
    shutil.rmtree(WORK / "elastic", ignore_errors=True)  # GBs of checkpoints
    return r


def max_tensor_bytes(m: dict) -> int:
    return 4 * max(m["vocab_size"] * m["hidden_size"], m["hidden_size"] * m["intermediate_size"],
                   m["hidden_size"] * m["hidden_size"])


def run(quick: bool) -> dict:
    (WORK / "elastic").mkdir(parents=True, exist_ok=True)
    r = measure(models(quick), 1 if quick else 3)
    shallow, deep = sorted(r)
    s, d = r[shallow], r[deep]

    def export_peaks(x, above_imports=True):
        return [(e["peak"] - (e["baseline"] if above_imports else 0)) / GB for e in x["export"]]

    def convert_peaks(x, above_imports=True):  # 2 ranks, the larger rank's
        return [max(row["peak"] - (row["baseline"] if above_imports else 0) for row in c["ranks"]) / GB
                for c in x["convert2"]]

    def whole(peaks_of) -> str:
        return f"whole-process peaks (medians) {median(peaks_of(d, False)):.3f} / {median(peaks_of(s, False)):.3f} GB"

    bound = [(2 * e["shard"] + e["largest"]) / GB for e in s["export"]]
    note = f"{s['params'] / 1e6:.0f}M params, {shallow} layers; ZeRO-2 on 2 ranks -> ZeRO-3 on 2 ranks"
    figures = [
        figure("elastic_resume", "converted resume, peak RSS per rank / fresh run at the target stage",
               [x["resume_rank_peak"] / GB for x in s["resume"]], [x["fresh_rank_peak"] / GB for x in s["resume"]],
               "GB", ("<=", 1.15), note),
        figure("elastic_export", "export peak above imports / (2 shards + largest tensor)", export_peaks(s), bound,
               "GB", ("<=", 1.0), f"--max-shard-size {s['export'][0]['shard'] / 1e6:.0f} MB (a quarter of the model), "
                                  f"from the ZeRO-2 files"),
        figure("elastic_export_depth", f"export peak RSS above imports, {deep} / {shallow} layers", export_peaks(d),
               export_peaks(s), "GB", ("<=", 1.10),
               f"each at a quarter of its model; the process's peak minus its RSS after the imports; "
               f"{whole(export_peaks)}"),
        figure("elastic_convert_depth", f"conversion peak RSS above imports (2 ranks, per rank), {deep} / {shallow} "
               f"layers", convert_peaks(d), convert_peaks(s), "GB", ("<=", 1.10),
               f"each rank's peak minus its RSS after the imports, the larger rank's; {whole(convert_peaks)}"),
        figure("elastic_convert_time", "conversion time, 2 ranks / 1 rank", [c["seconds"] for c in s["convert2"]],
               [c["seconds"] for c in s["convert1"]], "s", ("<=", 1.0), f"{shallow} layers"),
    ]
    for f in figures:
        log(f"{f['figure']}: {f['ours']:.3f} / {f['baseline']:.3f} {f['unit']} = {f['ratio']:.3f} (target {f['target']})")
    return {"figures": figures, "raw": {str(k): v for k, v in r.items()}}
