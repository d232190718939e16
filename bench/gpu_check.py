"""The GPU smoke check: what only a CUDA machine can show, in a few minutes on the tiny model.

    .venv/bin/python bench/gpu_check.py [--gpus N]      # default: every visible GPU (at most 2)

On CUDA + NCCL, bf16, deterministic kernels: a run with evaluation and background saves; a copy killed
with SIGKILL in the middle of a step and resumed (its losses must be bitwise those of the uninterrupted
run); the same save resumed under ZeRO 3 (converted; losses within 1e-5); an fp16 run (loss scaling with
the fused loss); an export loaded by transformers on the GPU. Prints one line per check and a JSON
summary; exits non-zero if a check fails. Run it where a GPU is lent (docs/development.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import harness  # noqa: E402

WORK = harness.ROOT / "build" / "gpu-check"
GPU = {"DS_ACCELERATOR": "cuda"}  # harness.child_env forces the CPU otherwise
COMMON = ["model.dtype=bf16", "train.zero_stage=2", "train.max_steps=6", "eval.fraction=0.05", "eval.every_steps=3",
          "checkpoint.async_save=true"]


def train(out: Path, overrides, nproc: int, **kw):
    return harness.train(out, [*COMMON, *overrides], nproc=nproc, env={**GPU, **kw.pop("env", {})}, **kw)


def check_resume(nproc: int) -> dict:
    ref, killed = WORK / "ref", WORK / "killed"
    train(ref, [], nproc)
    proc = train(killed, [], nproc, fault="mid_accum:rank0@step4", expect_ok=False)
    assert "[fault injection] SIGKILL at mid_accum rank 0 step 4" in proc.stdout, proc.stdout[-3000:]
    converted = shutil.copytree(killed, WORK / "to-zero3")
    saved = harness.committed_steps(killed / "checkpoints")  # async saves: the newest commit may lag a step
    step = saved[-1] if saved else None
    harness.assert_resumed(train(killed, [], nproc, resume="auto"), step=step)
    harness.assert_same_run(killed, ref)
    harness.assert_resumed(train(converted, ["train.zero_stage=3"], nproc, resume="auto"), step=step)
    harness.assert_close_run(converted, ref, rel=1e-5)
    rows = harness.metrics(ref)
    return {"losses": [r["loss"] for r in rows], "eval_loss": [r["eval_loss"] for r in rows if "eval_loss" in r]}


def check_fp16(nproc: int) -> dict:
    out = WORK / "fp16"
    train(out, ["model.dtype=fp16"], nproc)
    losses = [r["loss"] for r in harness.metrics(out)]
    assert all(loss == loss and loss < 1e3 for loss in losses), losses  # finite: the scaler found its level
    return {"losses": losses}


def check_export() -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from ds_finetune.checkpoint.export import export_checkpoint
    from ds_finetune.checkpoint.verify import find_resumable_checkpoint

    info, _ = find_resumable_checkpoint(WORK / "ref" / "checkpoints")
    out = export_checkpoint(info.path, WORK / "export", "bf16")
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.bfloat16).cuda()
    logits = model(torch.arange(16, device="cuda")[None]).logits
    assert torch.isfinite(logits.float()).all()
    return {"exported": str(out)}


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing checked")
        return 2
    nproc = args.gpus or min(2, torch.cuda.device_count())
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    summary, failed = {"device": f"{nproc} x {torch.cuda.get_device_name(0)}"}, False
    for name, check in [("resume", lambda: check_resume(nproc)), ("fp16", lambda: check_fp16(nproc)),
                        ("export", check_export)]:
        start = time.time()
        try:
            summary[name] = {"ok": True, **check()}
        except Exception as e:  # noqa: BLE001 - every check reports, the exit code says whether all passed
            summary[name], failed = {"ok": False, "error": f"{type(e).__name__}: {str(e)[-2000:]}"}, True
        summary[name]["seconds"] = round(time.time() - start, 1)
        print(f"gpu_check {name}: {'ok' if summary[name]['ok'] else 'FAILED'} ({summary[name]['seconds']} s)",
              flush=True)
    print(json.dumps(summary, indent=1))
    if not failed:
        shutil.rmtree(WORK, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
