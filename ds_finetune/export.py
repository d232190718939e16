"""A checkpoint of any ZeRO stage -> a Hugging Face model folder (`config.json`, `*.safetensors`, tokenizer
files, generation config) that `AutoModelForCausalLM.from_pretrained` loads. One process, no GPU, and no
need for the world size the checkpoint was saved with.

The model config and tokenizer travel inside every checkpoint (`step_N/hf/`, written at save time and
covered by the manifest), so an export needs nothing but the checkpoint folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ds_finetune.checkpoint import CheckpointInfo, inspect_checkpoint, step_of_tag
from ds_finetune.errors import UserError

HF_DIR = "hf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def write_hf_files(tag_dir: Path, model, tokenizer) -> None:
    """Called on rank 0 during a save, before the files are hashed into the manifest."""
    target = tag_dir / HF_DIR
    model.config.save_pretrained(target)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(target)
    tokenizer.save_pretrained(target)


def export_checkpoint(path: Path, out_dir: Path, dtype: str = "fp32", hashes: bool = True) -> Path:
    from huggingface_hub import save_torch_state_dict

    from ds_finetune import reshard

    if not path.is_dir() or step_of_tag(path.name) is None:
        raise UserError(f"export error: {path} is not a checkpoint folder (expected .../checkpoints/step_N)")
    info: CheckpointInfo = inspect_checkpoint(path, hashes)
    if info.status != "complete":
        raise UserError(f"export error: {path} is {info.status} ({'; '.join(info.problems)[:300]}); export a "
                        f"complete checkpoint (see `ds-finetune ckpt list {path.parent}`)")
    if not (path / HF_DIR / "config.json").exists():
        raise UserError(f"export error: {path} has no {HF_DIR}/config.json (saved by an older ds-finetune)")
    if reshard.has_resharded(info):
        weights = reshard.read_resharded(reshard.resharded_dir(info), keys=("weights",))[0]["weights"]
    else:
        weights = reshard.consolidate(info, weights_only=True)[0]["weights"]
    state = {name: t.to(DTYPES[dtype]).contiguous() for name, t in weights.items()}
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"export error: {out_dir} is not empty; pick a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state, str(out_dir), max_shard_size="5GB")  # shards + index when large
    for f in sorted((path / HF_DIR).iterdir()):
        shutil.copy2(f, out_dir / f.name)
    _set_config_dtype(out_dir / "config.json", dtype)
    return out_dir


def _set_config_dtype(config_path: Path, dtype: str) -> None:
    import json
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = config["dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
