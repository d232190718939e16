"""A stage- and world-size-independent copy of a checkpoint, and loading it into an engine of any ZeRO stage.

DeepSpeed cannot load a checkpoint under another ZeRO stage or data-parallel size (2->3 and 3->2 assert,
0->2 misses files; its own universal-checkpoint route fails whenever stage 3 is involved and does not
read stage 0). So we convert ourselves:

* `consolidate` (one process, no GPU, no process group): reads a verified checkpoint of any stage and
  returns full fp32 weights and both Adam moments per parameter name, the optimizer step count, the LR
  scheduler state and every rank's RNG. Stages 1-3 reuse the partition-merging code of DeepSpeed's own
  `zero_to_fp32.py` (applied to the moments too: they share the fp32 partitions' flat layout).
* `write_resharded` stores that as safetensors + JSON in `step_N/resharded/` (once; later resumes and
  `ckpt export` reuse it), with its own manifest, so every rank reads plain tensors, never pickles.
* `load_weights` fills the model before `deepspeed.initialize` (ZeRO then builds its fp32 master copies
  from it); `load_optimizer_state` fills the moments, step count, LR schedule and DeepSpeed's counters
  after it, through `safe_set_full_optimizer_state`, which works on every stage.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ds_finetune.checkpoint import MANIFEST, CheckpointInfo, hash_and_sync, verify_files, write_atomic
from ds_finetune.errors import UserError

RESHARDED_DIR = "resharded"
RESHARD_VERSION = 1
TENSOR_FILES = ("weights", "exp_avg", "exp_avg_sq")


# ------------------------------------------------------------------------------------------ consolidate

def _load(path: Path) -> dict:
    # Only called on files the checkpoint's manifest has verified (sizes and sha256).
    return torch.load(path, map_location="cpu", weights_only=False)


def _model_states_file(tag_dir: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).exists():
            return tag_dir / name
    raise UserError(f"checkpoint error: {tag_dir} holds no DeepSpeed model states file")


def _consolidate_stage0(model_states: dict) -> tuple[dict, float]:
    weights = {k: v.float() for k, v in model_states["module"].items()}
    optim = model_states["optimizer"]
    names = [n for group in model_states["param_group_names"] for n in group]
    index = [i for group in optim["param_groups"] for i in group["params"]]
    exp_avg, exp_avg_sq, step = {}, {}, 0.0
    for name, i in zip(names, index):
        state = optim["state"].get(i, {})
        exp_avg[name] = state.get("exp_avg", torch.zeros_like(weights[name]))
        exp_avg_sq[name] = state.get("exp_avg_sq", torch.zeros_like(weights[name]))
        step = float(state.get("step", step))
    return {"weights": weights, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, step


def consolidate(info: CheckpointInfo, weights_only: bool = False) -> tuple[dict[str, dict], dict]:
    """Verified checkpoint -> ({"weights"|"exp_avg"|"exp_avg_sq": {param name: fp32 tensor}}, meta)."""
    if info.status != "complete":
        raise UserError(f"checkpoint error: {info.path} is {info.status}; pick a complete one (`ds-finetune ckpt list`)")
    model_states = _load(_model_states_file(info.path))
    if info.manifest["zero_stage"] == 0:
        tensors, step = _consolidate_stage0(model_states)
    else:
        from ds_finetune import ds_internals
        tensors, step = ds_internals.merge_zero_partitions(info.path, ("weights",) if weights_only else TENSOR_FILES)
    meta = {
        "reshard_version": RESHARD_VERSION,
        "source": {"tag": info.tag, "zero_stage": info.manifest["zero_stage"], "world_size": info.manifest["world_size"]},
        "optimizer_step": step,
        "global_steps": int(model_states.get("global_steps", 0)),
        "global_samples": int(model_states.get("global_samples", 0)),
        "skipped_steps": int(model_states.get("skipped_steps", 0)),
        "lr_scheduler": _plain(model_states.get("lr_scheduler")),
        "rng_states": model_states.get("rng_states", []),  # plain values already (dist.capture_rng)
    }
    return tensors, meta


def _plain(obj):
    """LR scheduler state as JSON values (its tensors, if any, as lists)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.tolist()
    return obj


# ------------------------------------------------------------------------------------- on-disk copy

def resharded_dir(info: CheckpointInfo) -> Path:
    return info.path / RESHARDED_DIR


def write_resharded(info: CheckpointInfo) -> Path:
    """Convert once into `step_N/resharded/` (temp folder + rename: a crash leaves no half copy)."""
    from safetensors.torch import save_file

    target = resharded_dir(info)
    tensors, meta = consolidate(info)
    tmp = info.path / f".{RESHARDED_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for key in TENSOR_FILES:
        save_file(tensors[key], str(tmp / f"{key}.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta))
    files = {p.name: hash_and_sync(p) for p in sorted(tmp.iterdir())}
    write_atomic(tmp / MANIFEST, json.dumps({"files": files}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def read_resharded(path: Path, keys=TENSOR_FILES) -> tuple[dict[str, dict], dict]:
    from safetensors.torch import load_file

    manifest = json.loads((path / MANIFEST).read_text())
    problems = verify_files(path, manifest)
    if problems:
        raise UserError(f"checkpoint error: converted copy {path} is damaged ({problems[0]}); delete it to convert again")
    return ({k: load_file(str(path / f"{k}.safetensors")) for k in keys},
            json.loads((path / "meta.json").read_text()))


def has_resharded(info: CheckpointInfo) -> bool:
    return (resharded_dir(info) / MANIFEST).exists()


# ------------------------------------------------------------------------------------- into an engine

def load_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy full fp32 weights into a plain model (before deepspeed.initialize)."""
    import deepspeed

    for name, p in model.named_parameters():
        if name not in weights:
            raise UserError(f"checkpoint error: the checkpoint has no weights for {name}; it is from another model")
        value = weights[name]
        if tuple(value.shape) != tuple(getattr(p, "ds_shape", p.shape)):
            raise UserError(f"checkpoint error: {name} has shape {tuple(value.shape)} in the checkpoint but "
                            f"{tuple(p.shape)} in the model; it is from another model")
        if hasattr(p, "ds_id"):  # built under zero.Init: already partitioned
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value)
        else:
            p.data.copy_(value)


def load_optimizer_state(engine, tensors: dict[str, dict], meta: dict) -> None:
    """Adam moments, step count, LR schedule and DeepSpeed's step counters, on any ZeRO stage."""
    from deepspeed.utils import safe_set_full_optimizer_state

    from ds_finetune import ds_internals

    base, keys = ds_internals.optimizer_and_state_keys(engine)
    step = torch.tensor(float(meta["optimizer_step"]))
    # torch's AdamW creates its state lazily at the first step; create it now so it can be filled.
    for p in keys:
        state = base.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = step.clone()
    ds_internals.link_optimizer_state(engine)
    stage = engine.zero_optimization_stage()
    for name, p in engine.module.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            value = tensors[key][name].to(p.device)
            if stage == 0:
                base.state[p][key].copy_(value.view_as(base.state[p][key]))
            else:
                safe_set_full_optimizer_state(p, value, key)
    if meta["lr_scheduler"] is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        for group, lr in zip(base.param_groups, meta["lr_scheduler"].get("_last_lr", [])):
            group["lr"] = lr  # load_state_dict restores the schedule's position, not the optimizer's lr
    ds_internals.set_step_counters(engine, meta["global_steps"], meta["global_samples"], meta["skipped_steps"])
