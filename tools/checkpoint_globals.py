"""Which Python classes checkpoint files hold: what the safe loader's allowlist must name
(safe_pickle.CHECKPOINT_GLOBALS), found by saving for real.

    python tools/checkpoint_globals.py RUN_OR_CKPT_DIR ...   # list the globals of every *.pt below them
    python tools/checkpoint_globals.py --survey WORK_DIR     # train tiny runs of every variant, then list

The survey saves (2 ranks, 2 steps, a checkpoint each) at ZeRO 0-3 in fp32, bf16 and fp16, with LoRA,
optimizer (and parameter) offload and background saves, and prints every global beyond torch's own
allowlist that their files name, with the variants that need it, marking those outside ours ('!'), then
every file the safe loader refuses. DeepSpeed's CPU accelerator refuses fp16 on CPUs without mkldnn fp16;
the survey tells it fp16 works (`--fp16-shim`: the saved state's types are what matters, not its speed).
Rerun it when DeepSpeed, torch or peft changes version.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

VARIANTS = {
    **{f"z{s}-{d}": [f"train.zero_stage={s}", f"model.dtype={d}"] for s in range(4) for d in ("fp32", "bf16", "fp16")},
    "z1-offload": ["train.zero_stage=1", "train.offload_optimizer=cpu"],
    "z2-offload-bf16": ["train.zero_stage=2", "train.offload_optimizer=cpu", "model.dtype=bf16"],
    "z3-offload-both": ["train.zero_stage=3", "train.offload_optimizer=cpu", "train.offload_param=cpu"],
    "z2-async": ["train.zero_stage=2", "checkpoint.async_save=true"],
    "z3-async-bf16": ["train.zero_stage=3", "checkpoint.async_save=true", "model.dtype=bf16"],
    "z0-async": ["train.zero_stage=0", "checkpoint.async_save=true"],
}
LORA = {"z0-lora": 0, "z2-lora": 2, "z3-lora-bf16": 3}


def globals_of(path: Path) -> list[str]:
    import torch

    return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))


def scan(folders: list[Path]) -> tuple[dict[str, set[str]], list[str]]:
    """({global: {folder names whose files need it}}, [files the safe loader refuses, and why]) over every
    *.pt file below the folders."""
    from ds_finetune.checkpoint.ds_internals import load_checkpoint_file
    from ds_finetune.checkpoint.safe_pickle import UnsafeCheckpointFile

    found: dict[str, set[str]] = defaultdict(set)
    refused = []
    for folder in folders:
        for f in sorted(folder.rglob("*.pt")):
            for g in globals_of(f):
                found[g].add(folder.name)
            try:
                load_checkpoint_file(f, mmap=True)
            except UnsafeCheckpointFile as e:
                refused.append(f"{f}: {e.what}")
    return found, refused


def survey(work: Path) -> list[Path]:
    import harness

    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    if not base.exists():
        from ds_finetune.config import load_config
        from ds_finetune.dist import seed_everything
        from ds_finetune.model import build_model

        cfg = load_config(harness.TINY, [f"output_dir={work / 'unused'}"])
        seed_everything(7)
        build_model(cfg, {}).save_pretrained(base)
    runs = {name: overrides for name, overrides in VARIANTS.items()}
    for name, stage in LORA.items():
        runs[name] = ["model.config=null", f"model.name_or_path={base}", "model.lora.r=4", f"train.zero_stage={stage}",
                      *(["model.dtype=bf16"] if "bf16" in name else [])]
    done = []
    for name, overrides in runs.items():
        out = work / name
        if not (out / "checkpoints").is_dir():
            argv = harness.train_argv(out, [*overrides, "train.max_steps=2"], nproc=2)
            if "fp16" in name:
                script = argv.index(str(ROOT / "launch" / "train.py"))
                argv[script:script] = [str(Path(__file__).resolve()), "--fp16-shim"]
            proc = harness.run(argv)
            if proc.returncode != 0:
                last = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()][-1:]
                print(f"{name}: training failed ({proc.returncode}): {last}", flush=True)
                continue
        print(f"{name}: saved", flush=True)
        done.append(out)
    return done


def fp16_shim(argv: list[str]) -> None:
    """Run a training script with DeepSpeed's CPU accelerator saying it supports fp16."""
    import runpy

    import torch
    from deepspeed.accelerator import cpu_accelerator

    cpu_accelerator.CPU_Accelerator.is_fp16_supported = lambda self: True
    cpu_accelerator.CPU_Accelerator.supported_dtypes = lambda self: [torch.float, torch.bfloat16, torch.float16]
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


def main(argv: list[str]) -> None:
    if argv[0] == "--fp16-shim":
        return fp16_shim(argv[1:])
    from ds_finetune.checkpoint.safe_pickle import CHECKPOINT_GLOBALS

    folders = survey(Path(argv[1])) if argv[0] == "--survey" else [Path(a) for a in argv]
    found, refused = scan(folders)
    print(f"{len(folders)} runs; the globals their files name beyond torch's own allowlist ('!': not allowed):")
    for g, where in sorted(found.items()):
        print(f"{'  ' if g in CHECKPOINT_GLOBALS else '! '}{g}: {', '.join(sorted(where))}")
    print(f"files the safe loader refuses: {len(refused)}")
    for line in refused:
        print(f"  {line}")


if __name__ == "__main__":
    main(sys.argv[1:])
