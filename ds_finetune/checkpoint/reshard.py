"""A stage- and world-size-independent copy of a checkpoint, and loading it into an engine of any ZeRO stage.

DeepSpeed cannot load a checkpoint under another ZeRO stage or data-parallel size (2->3 and 3->2 assert,
0->2 misses files; its own universal-checkpoint route fails whenever stage 3 is involved and does not
read stage 0). So we convert ourselves, one tensor at a time, so that memory is bounded by the largest
tensor (and a shard's mapped pages), never by the model:

* `open_source` reads a verified checkpoint of any stage through `ds_internals.ZeroCheckpoint`: files
  memory-mapped, each parameter's weights and Adam moments merged on demand from the ranks' partitions.
* `write_share` converts a contiguous share of the parameters into safetensors shards of at most
  `SHARD_BYTES` (`{key}-r{rank}-{i}.safetensors`); every rank of the resuming job writes its share into
  one temp folder, and `commit` (rank 0) writes `meta.json` (optimizer step, LR schedule, counters,
  every rank's RNG, which file holds which tensor) and a manifest, then renames the folder to
  `step_N/resharded/`. A crash before the rename leaves only a temp folder, which is never read.
* `ConvertedCopy` reads the copy back one tensor at a time: `load_weights` fills the model before
  `deepspeed.initialize`; `load_optimizer_state` fills, after it, the fp32 master weights (in bf16/fp16
  the engine built them from the module's rounded weights), the moments, step count, LR schedule and
  DeepSpeed's counters, through `safe_set_full_*` (each rank keeps only its partition of each tensor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_finetune.checkpoint import ds_internals
from ds_finetune.checkpoint.layout import MANIFEST, remove_tree
from ds_finetune.checkpoint.tensorfiles import nbytes, plan_shards, read_tensor, write_safetensors
from ds_finetune.checkpoint.verify import CheckpointInfo
from ds_finetune.errors import UserError
from ds_finetune.files import fsync_dir, hash_and_sync, rename_folder, write_atomic

RESHARDED_DIR = "resharded"
TMP_PREFIX = f".{RESHARDED_DIR}.tmp-"
RESHARD_VERSION = 2
TENSOR_FILES = ("weights", "exp_avg", "exp_avg_sq")
SHARD_BYTES = 128 * 2**20  # bounds the converted copy's files (and a reader's mapped pages)


# --------------------------------------------------------------------------------------------- source

def open_source(info: CheckpointInfo):
    """A verified checkpoint, read parameter by parameter (nothing is loaded before `read`)."""
    if info.status != "complete":
        raise UserError(f"checkpoint error: {info.path} is {info.status}; pick a complete one (`ds-finetune ckpt list`)")
    return ds_internals.ZeroCheckpoint(info.path, info.manifest["zero_stage"], info.manifest["world_size"])


def source_meta(info: CheckpointInfo, src) -> dict:
    """Everything but the tensors: plain JSON values."""
    ms = src.model_states
    return {
        "reshard_version": RESHARD_VERSION,
        "source": {"tag": info.tag, "zero_stage": info.manifest["zero_stage"], "world_size": info.manifest["world_size"]},
        "optimizer_step": src.step,
        "global_steps": int(ms.get("global_steps", 0)),
        "global_samples": int(ms.get("global_samples", 0)),
        "skipped_steps": int(ms.get("skipped_steps", 0)),
        "lr_scheduler": _plain(ms.get("lr_scheduler")),
        "rng_states": ms.get("rng_states", []),  # plain values already (dist.capture_rng)
        "objective_states": ms.get("objective_states", []),  # plain values too (GRPO's rollout buffer)
        "shapes": {name: list(src.shapes[name]) for name in src.names},
    }


def _plain(obj):
    """LR scheduler state as JSON values (its tensors, if any, as lists)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.tolist()
    return obj


# ------------------------------------------------------------------------------------------- convert

def resharded_dir(info: CheckpointInfo) -> Path:
    return info.path / RESHARDED_DIR


def has_resharded(info: CheckpointInfo) -> bool:
    """A committed copy of the current format (an older format is converted again)."""
    path = resharded_dir(info)
    if not (path / MANIFEST).exists():
        return False
    try:
        return json.loads((path / "meta.json").read_text()).get("reshard_version") == RESHARD_VERSION
    except (OSError, ValueError):
        return False


def share_of(names: list[str], shapes: dict, rank: int, world: int) -> list[str]:
    """Rank `rank`'s contiguous share of the parameters, balanced by size (contiguous: its reads come from
    neighbouring regions of the source files)."""
    sizes = [max(1, torch.Size(shapes[n]).numel()) for n in names]
    total, begin, out = sum(sizes), 0, []
    for name, size in zip(names, sizes):
        # a parameter belongs to the rank whose equal slice of the total holds its middle
        if (2 * begin + size) * world // (2 * total) == rank:
            out.append(name)
        begin += size
    return out


def share_bytes(src, names: list[str]) -> int:
    """Bytes `write_share` writes for `names` (the fp32 weights and both moments)."""
    return len(TENSOR_FILES) * sum(nbytes(src.shapes[n], torch.float32) for n in names)


def write_share(src, names: list[str], folder: Path, rank: int, shard_bytes: int = SHARD_BYTES,
                progress=lambda n: None) -> dict:
    """Convert `names` into `folder`, key by key and tensor by tensor, calling `progress(n)` after each
    tensor of n bytes is read. Returns {"files": {file: size, sha256}, "tensors": {key: {name: file}}}."""
    shapes = {n: src.shapes[n] for n in names}
    sizes = {n: nbytes(shapes[n], torch.float32) for n in names}
    files, tensors = {}, {key: {} for key in TENSOR_FILES}

    def read(name: str, key: str) -> torch.Tensor:
        value = src.read(name, key)
        progress(sizes[name])
        return value

    for key in TENSOR_FILES:
        for i, shard in enumerate(plan_shards(names, sizes, shard_bytes)):
            fname = f"{key}-r{rank:05d}-{i:05d}.safetensors"
            files[fname] = write_safetensors(folder / fname, shard, shapes, torch.float32,
                                             lambda name, key=key: read(name, key))
            tensors[key].update({name: fname for name in shard})
    return {"files": files, "tensors": tensors}


def commit(target: Path, tmp: Path, parts: list[dict], meta: dict) -> Path:
    """Rank 0: meta.json and the manifest into the temp folder, then rename it into place (the commit)."""
    meta = dict(meta, tensors={key: {n: f for part in parts for n, f in part["tensors"][key].items()}
                               for key in TENSOR_FILES})
    missing = [n for n in meta["shapes"] if any(n not in meta["tensors"][k] for k in TENSOR_FILES)]
    if missing:
        raise UserError(f"checkpoint error: the conversion of {target.parent} wrote no tensors for {missing[0]}")
    write_atomic(tmp / "meta.json", json.dumps(meta))
    files = {name: m for part in parts for name, m in part["files"].items()}
    files["meta.json"] = hash_and_sync(tmp / "meta.json")
    fsync_dir(tmp)  # every rank's shards are in the folder before the manifest that lists them
    write_atomic(tmp / MANIFEST, json.dumps({"files": files}, indent=1))
    if target.exists():  # an older format's copy: out of the way crash-safely
        remove_tree(target)
    rename_folder(tmp, target)
    return target


# ------------------------------------------------------------------------------------------- read back

@dataclass(frozen=True)
class ConvertedCopy:
    """A committed converted copy: plain metadata, and tensors read one at a time on demand."""
    path: Path
    meta: dict   # optimizer step, LR schedule, engine counters, every saved rank's RNG, shapes, tensor files

    @property
    def names(self) -> list[str]:
        return list(self.meta["shapes"])

    def read(self, name: str, key: str) -> torch.Tensor:
        if name not in self.meta["shapes"]:
            raise UserError(f"checkpoint error: the checkpoint has no weights for {name}; it is from another model")
        return read_tensor(self.path / self.meta["tensors"][key][name], name)


def open_resharded(path: Path, verify_files_of=None) -> ConvertedCopy:
    """The copy at `path`. `verify_files_of(manifest)` returns problems with its files (None: trust them,
    e.g. just written by this job); any problem is a user error."""
    manifest = json.loads((path / MANIFEST).read_text())
    problems = verify_files_of(manifest) if verify_files_of else []
    if problems:
        raise UserError(f"checkpoint error: converted copy {path} is damaged ({problems[0]}); delete it to convert again")
    return ConvertedCopy(path, json.loads((path / "meta.json").read_text()))


# ------------------------------------------------------------------------------------- into an engine

def load_weights(model, copy: ConvertedCopy) -> None:
    """Copy full fp32 weights into a plain model (before deepspeed.initialize), one tensor at a time."""
    import deepspeed

    for name, p in model.named_parameters():
        if not p.requires_grad and name not in copy.meta["shapes"]:
            continue  # a LoRA run's frozen base: loaded from its own files, not saved in the checkpoint
        value = copy.read(name, "weights")
        if tuple(value.shape) != tuple(getattr(p, "ds_shape", p.shape)):
            raise UserError(f"checkpoint error: {name} has shape {tuple(value.shape)} in the checkpoint but "
                            f"{tuple(getattr(p, 'ds_shape', p.shape))} in the model; it is from another model")
        if hasattr(p, "ds_id"):  # built under zero.Init: partitioned; gather this one parameter only
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value)
        else:
            p.data.copy_(value)
        del value


def load_master_weights(engine, copy: ConvertedCopy) -> None:
    """bf16/fp16: the fp32 weights into the fp32 masters the optimizer updates. `deepspeed.initialize` cast
    the module to bf16/fp16 and built the masters from that rounding; left so, the first update would
    start from weights rounded to 8 bits of mantissa."""
    from deepspeed.utils import safe_set_full_fp32_param

    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return  # the module's fp32 weights are the masters
    masters = ds_internals.stage0_masters(engine)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        value = copy.read(name, "weights").to(p.device)
        if masters:
            masters[id(p)].data.copy_(value.view_as(masters[id(p)]))
        else:
            safe_set_full_fp32_param(p, value)  # copies only this rank's partition
        del value


def load_optimizer_state(engine, copy: ConvertedCopy) -> None:
    """fp32 masters, Adam moments, step count, LR schedule and DeepSpeed's step counters, on any ZeRO stage."""
    from deepspeed.utils import safe_set_full_optimizer_state

    meta = copy.meta
    base, keys = ds_internals.optimizer_and_state_keys(engine)
    step = torch.tensor(float(meta["optimizer_step"]))
    # torch's AdamW creates its state lazily at the first step; create it now so it can be filled.
    for p in keys:
        state = base.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        # torch's AdamW counts steps in a tensor; DeepSpeed's CPU Adam (offload) and FusedAdam (GPUs) in a
        # Python int, which FusedAdam hands its kernel as an int argument
        state["step"] = step.clone() if isinstance(base, torch.optim.AdamW) else int(step)
    ds_internals.link_optimizer_state(engine)
    load_master_weights(engine, copy)
    stage, masters = engine.zero_optimization_stage(), ds_internals.stage0_masters(engine)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:  # frozen: no optimizer state
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            value = copy.read(name, key).to(p.device)
            if stage == 0:  # the state is keyed by the parameter, or by its fp32 master in bf16/fp16
                state = base.state[masters.get(id(p), p)][key]
                state.copy_(value.view_as(state))
            else:
                safe_set_full_optimizer_state(p, value, key)  # copies only this rank's partition
            del value
    if meta["lr_scheduler"] is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        for group, lr in zip(base.param_groups, meta["lr_scheduler"].get("_last_lr", [])):
            group["lr"] = lr  # load_state_dict restores the schedule's position, not the optimizer's lr
    ds_internals.set_step_counters(engine, meta["global_steps"], meta["global_samples"], meta["skipped_steps"])
