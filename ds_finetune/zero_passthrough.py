"""The run config's `deepspeed:` mapping, deep-merged over the generated DeepSpeed config (zero.py): what
ds-finetune has no key for (NVMe offload, ZeRO++, MiCS, comms logging, `aio`) goes straight to DeepSpeed.

Keys ds-finetune computes itself (batch sizes, precision, the ZeRO stage, clipping) may be repeated with
the same value; another value is a one-line error naming the run config key to set instead, since the
loop, the data order and the checkpoints follow our value, not DeepSpeed's. Sections we replace as a
whole (the optimizer and scheduler are client objects, checkpoints are written by checkpoint/) are refused.
"""

from __future__ import annotations

import copy
from typing import Any

from ds_finetune.errors import UserError

# dotted DeepSpeed key -> the run config key that decides it
OWNED_VALUES = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum (or train.global_batch_size)",
    "gradient_clipping": "train.grad_clip",
    "bf16.enabled": "model.dtype",
    "fp16.enabled": "model.dtype",
    "zero_optimization.stage": "train.zero_stage",
}
OWNED_SECTIONS = {
    "optimizer": "train.optimizer, train.lr, train.weight_decay and train.adam_* (the optimizer is ds-finetune's)",
    "scheduler": "train.lr_schedule, train.warmup_steps and train.lr_scheduler_kwargs (the schedule is ds-finetune's)",
    "checkpoint": "the checkpoint section (checkpoints are written and resumed by ds-finetune)",
    "nebula": "the checkpoint section (checkpoints are written and resumed by ds-finetune)",
}
# What changes only logging, timing or where bytes go, never a computed value: recorded in the resume
# fingerprint as harmless. Everything else (ZeRO++ quantisation, MiCS and hpZ groups, offload, loss
# scaling, data types) may change the arithmetic of a step, so a resume with it changed is refused.
HARMLESS_TOP_LEVEL = {"aio", "comms_logger", "steps_per_print", "wall_clock_breakdown", "flops_profiler", "tensorboard",
                      "wandb", "csv_monitor", "comet", "timers", "dump_state"}
HARMLESS_OFFLOAD = {"nvme_path", "pin_memory", "buffer_count", "buffer_size", "max_in_cpu", "pipeline_read",
                    "pipeline_write", "fast_init"}
OFFLOADS = ("offload_optimizer", "offload_param")


def merge_passthrough(generated: dict, passthrough: dict | None, zero_stage: int) -> dict:
    """`generated` with `passthrough` merged over it, or a one-line UserError (see the module docstring)."""
    if not passthrough:
        return generated
    check_owned_keys(generated, passthrough)
    merged = deep_merge(generated, passthrough)
    check_offload(merged, zero_stage)
    if offloads_optimizer(merged):
        # As zero.py does for train.offload_optimizer: the client optimizer is accepted (model.adamw picks
        # DeepSpeed's CPU Adam on GPUs from this config).
        merged.setdefault("zero_force_ds_cpu_optimizer", False)
    return merged


def deep_merge(base: dict, over: dict) -> dict:
    """A copy of `base` with `over`'s values; mappings on both sides are merged key by key."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_shapes(generated: dict, passthrough: dict, prefix: str = "deepspeed") -> None:
    """A section of ours (zero_optimization, bf16, ...) can be extended, not replaced by a plain value."""
    for key, value in passthrough.items():
        if isinstance(generated.get(key), dict):
            if not isinstance(value, dict):
                raise UserError(f"config error: {prefix}.{key}: must be a mapping (it extends ds-finetune's "
                                f"section), not {_short(value)}")
            check_shapes(generated[key], value, f"{prefix}.{key}")


def check_owned_keys(generated: dict, passthrough: dict) -> None:
    check_shapes(generated, passthrough)
    for section, instead in OWNED_SECTIONS.items():
        if section in passthrough:
            raise UserError(f"config error: deepspeed.{section}: set by ds-finetune; use {instead}")
    for dotted, instead in OWNED_VALUES.items():
        found, value = _lookup(passthrough, dotted)
        ours = _lookup(generated, dotted)[1]
        if found and value != ours:
            raise UserError(f"config error: deepspeed.{dotted}: {_short(value)} conflicts with ds-finetune's "
                            f"{_short(ours)}; remove it and set {instead}")


def check_offload(merged: dict, zero_stage: int) -> None:
    zero = merged.get("zero_optimization") or {}
    for name in OFFLOADS:
        section = zero.get(name)
        if not isinstance(section, dict) or section.get("device", "none") == "none":
            continue
        needs = (1, 2, 3) if name == "offload_optimizer" else (3,)
        if zero_stage not in needs:
            raise UserError(f"config error: deepspeed.zero_optimization.{name} needs train.zero_stage "
                            f"{' or '.join(map(str, needs))} (got {zero_stage})")
        if section["device"] == "nvme" and not section.get("nvme_path"):
            raise UserError(f"config error: deepspeed.zero_optimization.{name}.device nvme needs nvme_path (a folder "
                            f"on a local NVMe drive)")


def offloads_optimizer(ds_config: dict) -> bool:
    section = (ds_config.get("zero_optimization") or {}).get("offload_optimizer")
    return isinstance(section, dict) and section.get("device", "none") != "none"


def fingerprint_parts(passthrough: dict | None) -> tuple[dict, dict]:
    """(exact, harmless) parts of the mapping for the resume fingerprint (see HARMLESS_* above)."""
    exact, harmless = {}, {}
    for key, value in (passthrough or {}).items():
        if key in HARMLESS_TOP_LEVEL:
            harmless[key] = value
        elif key == "zero_optimization" and isinstance(value, dict):
            zero_exact, zero_harmless = _split_offload_io(value)
            if zero_exact:
                exact[key] = zero_exact
            if zero_harmless:
                harmless[key] = zero_harmless
        else:
            exact[key] = value
    return exact, harmless


def _split_offload_io(zero: dict) -> tuple[dict, dict]:
    """zero_optimization's keys, less the offload sections' I/O settings (a path, buffers), and those."""
    exact, harmless = {}, {}
    for key, value in zero.items():
        if key in OFFLOADS and isinstance(value, dict):
            exact[key] = {k: v for k, v in value.items() if k not in HARMLESS_OFFLOAD}
            io = {k: v for k, v in value.items() if k in HARMLESS_OFFLOAD}
            if io:
                harmless[key] = io
        else:
            exact[key] = value
    return exact, harmless


def _lookup(mapping: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
