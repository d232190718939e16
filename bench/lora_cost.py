"""LoRA against full fine-tuning on the checkpoint bench's model (a 40M-param Llama whose full ZeRO-2
checkpoint is ~645 MB): checkpoint size, the training stall a save causes, and step time, LoRA ÷ full.

Both runs start from the same pretrained folder (the model saved once with `save_pretrained`), train the
same steps on the same data on 2 ranks at ZeRO 2, and save every `EVERY` steps (`common.save_stall_run`
measures a save's stall). The runs alternate, each repeated, so load from other jobs falls on both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from common import TOKENIZER, WORK, figure, llama, log, long_rows, median, run_config, save_stall_run

SIZE_TARGET = 0.05
EVERY = 4


def make_base(model: dict) -> Path:
    """The bench model as a pretrained folder (the frozen base of the LoRA run, the start of the full one)."""
    from ds_finetune.config import validate_config
    from ds_finetune.dist import seed_everything
    from ds_finetune.model import build_model

    folder = WORK / "lora-base"
    if (folder / "config.json").exists():
        return folder
    cfg = validate_config({"model": {"config": model, "tokenizer": str(TOKENIZER)},
                           "data": {"path": "unused"}, "train": {"max_steps": 1}, "output_dir": str(WORK / "unused")})
    seed_everything(1234)
    tmp = WORK / "lora-base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build_model(cfg, {}).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def run(quick: bool) -> dict:
    reps, steps = (1, 2 * EVERY + 1) if quick else (3, 3 * EVERY + 1)
    model = llama(640, 8, 1728, 10, 10, 256)
    base = make_base(model)
    config = run_config("lora", model, long_rows(), max_length=64, micro=1, accum=1, steps=steps,
                        output_dir=WORK / "runs" / "lora-unused",
                        checkpoint={"every_steps": EVERY, "keep_last": 0})
    results = {"full": [], "lora": []}
    for rep in range(reps):
        for kind in ("full", "lora") if rep % 2 == 0 else ("lora", "full"):
            overrides = ["model.config=null", f"model.name_or_path={base}"]
            overrides += ["model.lora.r=16", "model.lora.alpha=32"] if kind == "lora" else []
            results[kind].append(save_stall_run(f"lora-{kind}-{rep}", config, overrides, EVERY))
            log(f"lora: {kind} rep {rep}: {results[kind][-1]}")
    full, lora = results["full"], results["lora"]

    def pair(key: str, scale: float = 1.0) -> tuple[list, list]:
        return [r[key] * scale for r in lora], [r[key] * scale for r in full]

    note = (f"40M-param Llama from a pretrained folder, ZeRO 2, 2 ranks, LoRA r=16 on every linear layer; "
            f"{reps} runs each, {steps} steps, a save every {EVERY}")
    floor = median([r["floor_s"] for r in lora])
    return {
        "figures": [
            figure("lora_ckpt_size", "checkpoint size, LoRA / full fine-tuning", *pair("ckpt_bytes", 1e-6), "MB",
                   ("<=", SIZE_TARGET), note),
            figure("lora_save_stall", "training stall per save, LoRA / full fine-tuning",
                   [max(r["stall_s"], r["floor_s"]) for r in lora], [r["stall_s"] for r in full], "s", None,
                   f"a save step's interval minus the median step; LoRA's taken as max(stall, noise floor), "
                   f"floor {floor:.3f} s"),
            figure("lora_step_time", "step time, LoRA / full fine-tuning", *pair("step_s"), "s", None,
                   "median step without a save"),
        ],
        "raw": results,
    }
