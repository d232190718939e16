"""A checkpoint of any ZeRO stage -> a Hugging Face model folder (`config.json`, `*.safetensors`, tokenizer
files, generation config) that `AutoModelForCausalLM.from_pretrained` loads. One process, no GPU, no
need for the world size the checkpoint was saved with, and memory bounded by one tensor: the weights are
read from the checkpoint's mapped files one parameter at a time and written shard by shard
(`--max-shard-size`).

The model config and tokenizer travel inside every checkpoint (`step_N/hf/`, written at save time and
covered by the manifest), so an export needs nothing but the checkpoint folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ds_finetune import lora
from ds_finetune.checkpoint import reshard
from ds_finetune.checkpoint.layout import step_of_tag
from ds_finetune.checkpoint.tensorfiles import nbytes, parse_size, plan_shards, write_safetensors
from ds_finetune.checkpoint.verify import CheckpointInfo, inspect_checkpoint, manifest_bytes, verify_files
from ds_finetune.errors import UserError
from ds_finetune.state import TrainState

HF_DIR = "hf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = "5GB"  # save_pretrained's default


def write_hf_files(tag_dir: Path, model, tokenizer) -> None:
    """Called on rank 0 during a save, before the files are hashed into the manifest."""
    target = tag_dir / HF_DIR
    model.config.save_pretrained(target)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    lora.write_adapter_config(target, model)


def export_checkpoint(path: Path, out_dir: Path, dtype: str = "fp32", hashes: bool = True,
                      max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, merge: bool = False,
                      bar=lambda desc, total: (lambda n: None)) -> Path:
    """Stream the checkpoint's weights into `out_dir` shard by shard, tensor by tensor (cast one at a
    time): memory is bounded by one tensor, whatever the model's size. A LoRA checkpoint becomes a PEFT
    adapter folder, or with `merge` the base model with the adapters merged (memory: the whole model).
    `bar(desc, total_bytes)` returns a progress callback, for the hashing and for the reading."""
    if not path.is_dir() or step_of_tag(path.name) is None:
        raise UserError(f"export error: {path} is not a checkpoint folder (expected .../checkpoints/step_N)")
    max_bytes = parse_size(max_shard_size)
    info: CheckpointInfo = inspect_checkpoint(path, hashes, progress=bar("hashing", manifest_bytes(path))
                                              if hashes else None)
    if info.status != "complete":
        raise UserError(f"export error: {path} is {info.status} ({'; '.join(info.problems)[:300]}); export a "
                        f"complete checkpoint (see `ds-finetune ckpt list {path.parent}`)")
    if not (path / HF_DIR / "config.json").exists():
        raise UserError(f"export error: {path} has no {HF_DIR}/config.json (saved by an older ds-finetune)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"export error: {out_dir} is not empty; pick a new folder")
    adapters = lora.is_adapter_checkpoint(path / HF_DIR)
    if merge and not adapters:
        raise UserError(f"export error: {path} is a full fine-tuning checkpoint; --merge is for LoRA checkpoints "
                        f"(export it without --merge)")
    if reshard.has_resharded(info):  # an earlier converted resume left plain safetensors: cheaper to read
        target = reshard.resharded_dir(info)
        source = reshard.open_resharded(target, lambda m: verify_files(target, m, hashes))
        names, shapes = source.names, {n: tuple(s) for n, s in source.meta["shapes"].items()}
    else:
        source = reshard.open_source(info)
        names, shapes = source.names, source.shapes

    progress = bar("reading weights", sum(nbytes(shapes[n], torch.float32) for n in names))

    def read(name: str) -> torch.Tensor:
        value = source.read(name, "weights")
        progress(nbytes(shapes[name], torch.float32))
        return value

    if merge:
        base_files = run_identity(info).get("model.base_files")
        return lora.export_merged(path / HF_DIR, out_dir, names, read, DTYPES[dtype], base_files, max_bytes,
                                  hub_options(info))
    if adapters:
        return lora.export_adapter(path / HF_DIR, out_dir, names, read, DTYPES[dtype], hub_options(info))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_weights(out_dir, names, shapes, DTYPES[dtype], read, max_bytes)
    for f in sorted((path / HF_DIR).iterdir()):
        shutil.copy2(f, out_dir / f.name)
    _set_config_dtype(out_dir / "config.json", dtype)
    return out_dir


def run_identity(info: CheckpointInfo) -> dict:
    """The `exact` part of the fingerprint the checkpoint was saved with."""
    return (TrainState.from_manifest(info.manifest).fingerprint or {}).get("exact", {})


def hub_options(info: CheckpointInfo) -> dict:
    """The run's model.revision and model.trust_remote_code (recorded in its fingerprint when set): the base
    is loaded for a merge as training loaded it."""
    model = run_identity(info).get("model", {})
    return {k: model[k] for k in ("revision", "trust_remote_code") if model.get(k)}


def write_weights(out_dir: Path, names: list[str], shapes: dict, dtype: torch.dtype, read, max_bytes: int) -> None:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of at most `max_bytes` plus
    `model.safetensors.index.json`, named as `save_pretrained` names them. `names` are the trained
    parameters, so of tied weights only the first name is there, which is what `save_pretrained` keeps."""
    sizes = {n: nbytes(shapes[n], dtype) for n in names}
    shards = plan_shards(names, sizes, max_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(files, shards):
        write_safetensors(out_dir / fname, shard, shapes, dtype, read)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: fname for fname, shard in zip(files, shards) for name in shard}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _set_config_dtype(config_path: Path, dtype: str) -> None:
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = config["dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
