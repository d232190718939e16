"""Figure 6 - elastic memory: resuming under another ZeRO stage and exporting, with memory bounded by a
tensor or a shard rather than by the model. For a random Llama of hidden 1024 and 12 layers (155M params,
0.62 GB fp32) and one twice as deep, trained 2 steps at ZeRO-2 on 2 ranks:

* peak RSS of each rank during a converted resume to ZeRO-3 (conversion included) / the same in a fresh
  ZeRO-3 run on 2 ranks of the same model (target <= 1.15);
* `ckpt export --max-shard-size` of a quarter of the model: peak above the import baseline / (2 shards +
  the largest tensor) (target <= 1);
* doubling the depth: export and conversion peaks, deep / shallow (target <= 1.10);
* the conversion alone on 1 and 2 ranks: its time (2 ranks / 1 rank) and per-rank peak.

Peaks are the kernel's per-process high-water marks (VmHWM). --quick runs a 4x smaller pair of models.
"""

from __future__ import annotations

import json
import shutil

from common import BENCH, PY, WORK, Job, llama, llama_params, log, long_rows, ours_argv, run_config, torchrun

GB = 1e9


def models(quick: bool) -> dict:
    hidden, inter, heads = (512, 1408, 8) if quick else (1024, 2816, 16)
    return {depth: llama(hidden, depth, inter, heads, heads, 256) for depth in ((6, 12) if quick else (12, 24))}


def rank_peak(job: Job) -> int:
    return max(job.process_peaks.values())


def measure(depth: int, model: dict) -> dict:
    base = WORK / "elastic" / f"d{depth}"
    shutil.rmtree(base, ignore_errors=True)
    params = llama_params(model)
    config = run_config(f"elastic-d{depth}", model, long_rows(), max_length=64, micro=1, accum=1, steps=2,
                        output_dir=base / "run", checkpoint={"save_final": True})
    train = Job(ours_argv(config), WORK / "logs" / f"elastic-d{depth}-train.log").start()
    train.wait(1800)
    ckpt = next((base / "run" / "checkpoints").glob("step_*"))
    result = {"params": params, "train_rank_peak": rank_peak(train)}

    shard = params * 4 // 4  # a quarter of the fp32 model
    out = WORK / "elastic" / f"d{depth}-export.json"
    out.unlink(missing_ok=True)
    Job([PY, str(BENCH / "elastic_probe.py"), "export", str(ckpt), str(out), str(base / "hf"), str(shard)],
        WORK / "logs" / f"elastic-d{depth}-export.log").start().wait(1800)
    result["export"] = dict(json.loads(out.read_text()), shard=shard, largest=max_tensor_bytes(model))

    for nproc in (1, 2):
        out = WORK / "elastic" / f"d{depth}-convert{nproc}.json"
        out.unlink(missing_ok=True)
        Job(torchrun(BENCH / "elastic_probe.py", ["convert", str(ckpt), str(out)], nproc),
            WORK / "logs" / f"elastic-d{depth}-convert{nproc}.log").start().wait(1800)
        result[f"convert{nproc}"] = json.loads(out.read_text())
        shutil.rmtree(ckpt / "resharded")  # the resume below converts again

    no_save = ["train.max_steps=3", "checkpoint.save_final=false", "train.zero_stage=3"]
    resumed = Job(ours_argv(config, no_save, resume="auto"), WORK / "logs" / f"elastic-d{depth}-resume.log").start()
    resumed.wait(1800)
    fresh = Job(ours_argv(config, no_save + [f"output_dir={base / 'fresh'}"]),
                WORK / "logs" / f"elastic-d{depth}-fresh.log").start()
    fresh.wait(1800)
    result.update(resume_rank_peak=rank_peak(resumed), fresh_rank_peak=rank_peak(fresh))
    shutil.rmtree(base, ignore_errors=True)  # GBs of checkpoints
    log(f"elastic d{depth}: {json.dumps(result)}")
    return result


def max_tensor_bytes(m: dict) -> int:
    return 4 * max(m["vocab_size"] * m["hidden_size"], m["hidden_size"] * m["intermediate_size"],
                   m["hidden_size"] * m["hidden_size"])


def figure(fid: str, text: str, ours: float, baseline: float, target: float, note: str, unit: str = "GB") -> dict:
    ratio = ours / baseline
    return {"id": fid, "figure": text, "ours": round(ours, 3), "baseline": round(baseline, 3), "unit": unit,
            "ratio": ratio, "target": ["<=", target], "met": ratio <= target, "note": note}


def run(quick: bool) -> dict:
    (WORK / "elastic").mkdir(parents=True, exist_ok=True)
    r = {depth: measure(depth, m) for depth, m in models(quick).items()}
    shallow, deep = sorted(r)
    s, d = r[shallow], r[deep]

    def export_peak(x, above_imports=True):
        return (x["export"]["peak"] - (x["export"]["baseline"] if above_imports else 0)) / GB

    def convert_peak(x, n):
        return max(row["peak"] for row in x[f"convert{n}"]["ranks"]) / GB

    note = f"{s['params'] / 1e6:.0f}M params, {shallow} layers; ZeRO-2 on 2 ranks -> ZeRO-3 on 2 ranks"
    figures = [
        figure("elastic_resume", "converted resume, peak RSS per rank / fresh run at the target stage",
               s["resume_rank_peak"] / GB, s["fresh_rank_peak"] / GB, 1.15, note),
        figure("elastic_resume_deep", f"converted resume ({deep} layers) / fresh run, peak RSS per rank",
               d["resume_rank_peak"] / GB, d["fresh_rank_peak"] / GB, 1.15, f"{d['params'] / 1e6:.0f}M params"),
        figure("elastic_export", "export peak above imports / (2 shards + largest tensor)", export_peak(s),
               (2 * s["export"]["shard"] + s["export"]["largest"]) / GB, 1.0,
               f"--max-shard-size {s['export']['shard'] / 1e6:.0f} MB (a quarter of the model), from the ZeRO-2 files"),
        figure("elastic_export_depth", f"export peak RSS, {deep} / {shallow} layers", export_peak(d, False),
               export_peak(s, False), 1.10, f"whole process, each at a quarter of its model; above the imports: "
               f"{export_peak(d) * 1e3:.0f} / {export_peak(s) * 1e3:.0f} MB"),
        figure("elastic_convert_depth", f"conversion peak RSS (2 ranks, per rank), {deep} / {shallow} layers",
               convert_peak(d, 2), convert_peak(s, 2), 1.10, "whole process, imports included"),
        figure("elastic_convert_time", "conversion time, 2 ranks / 1 rank", s["convert2"]["seconds"],
               s["convert1"]["seconds"], 1.0, f"{shallow} layers; {deep} layers: {d['convert2']['seconds']:.1f} s / "
               f"{d['convert1']['seconds']:.1f} s", unit="s"),
    ]
    for f in figures:
        log(f"{f['figure']}: {f['ours']} / {f['baseline']} {f['unit']} = {f['ratio']:.3f} (target {f['target']})")
    return {"figures": figures, "raw": {str(k): v for k, v in r.items()}}
