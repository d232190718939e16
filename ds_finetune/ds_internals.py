"""Every use of DeepSpeed's private API, in one place, behind a version check.

What is private and why we use it:
* `engine.checkpoint_engine.save`: replaced per save so shards stream through our hashing file object
  (sha256 and size as the bytes go out, fsync before they count) instead of a second read.
* `deepspeed.utils.zero_to_fp32` helpers and the layout of `*_optim_states.pt`: merging ZeRO 1-3
  partitions into full tensors (weights and, with the same flat layout, both Adam moments).
* ZeRO's flat fp32 groups, `_lazy_init_hp_params_optimizer_state` and the engine's step counters:
  filling the optimizer state of a fresh engine from a converted checkpoint.

Tested with DeepSpeed 0.19 only; another minor version is refused in one line (setup.cfg pins it too).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ds_finetune.errors import UserError

TESTED_MINOR = (0, 19)


def check_deepspeed_version() -> None:
    import deepspeed
    minor = tuple(int(x) for x in deepspeed.__version__.split(".")[:2])
    if minor != TESTED_MINOR:
        raise UserError(f"deepspeed {deepspeed.__version__} is installed but ds-finetune is tested with "
                        f"{'.'.join(map(str, TESTED_MINOR))}.x only; pip install 'deepspeed>=0.19,<0.20'")


check_deepspeed_version()


# ------------------------------------------------------------------------------------------------ save

def route_checkpoint_writes(engine, save) -> bool:
    """Make this engine's next `save_checkpoint` write each file with `save(state_dict, path)`. Returns
    False (and changes nothing) when the engine uses a checkpoint engine other than torch's."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        return False
    engine.checkpoint_engine.save = save  # an instance attribute, replaced at every save: never nested
    return True


# ------------------------------------------------------------------------------------ merge partitions

def _load(path: Path) -> dict:
    # Only called on files the checkpoint's manifest has verified (sizes and sha256).
    return torch.load(path, map_location="cpu", weights_only=False)


def _read_optimizer_partition(path: Path) -> tuple[int, list, dict, float, list | None]:
    """One rank's `*_optim_states.pt` -> (stage, fp32 flat groups, {moment: flat groups}, step, paddings)."""
    osd = _load(path)["optimizer_state_dict"]
    stage = int(osd["zero_stage"])
    if stage <= 2:
        weights, states, paddings = (osd["single_partition_of_fp32_groups"], osd["base_optimizer_state"]["state"],
                                     osd.get("param_alignment_paddings"))
    else:
        weights, states, paddings = osd["fp32_flat_groups"], osd["optimizer_state_dict"]["state"], None
    groups = range(len(weights))
    moments = {key: [states[g][key] if g in states else torch.zeros_like(weights[g]) for g in groups]
               for key in ("exp_avg", "exp_avg_sq")}
    step = max([0.0] + [float(states[g]["step"]) for g in groups if g in states])
    return stage, weights, moments, step, paddings


def merge_zero_partitions(tag_dir: Path, keys: tuple[str, ...]) -> tuple[dict[str, dict], float]:
    """A ZeRO 1-3 checkpoint folder -> ({key: {param name: full fp32 tensor}} for `keys` among weights,
    exp_avg, exp_avg_sq; the optimizer step)."""
    from deepspeed.utils import zero_to_fp32 as z

    zero_model_states = z.parse_model_states(z.get_model_state_files(str(tag_dir)))
    optim_files = z.get_optim_files(str(tag_dir))
    flats = {key: [] for key in ("weights", "exp_avg", "exp_avg_sq")}
    stage, paddings, step = None, None, 0.0
    for f in optim_files:
        stage, weights, moments, rank_step, paddings = _read_optimizer_partition(Path(f))
        flats["weights"].append(weights)
        for key, groups in moments.items():
            flats[key].append(groups)
        step = max(step, rank_step)
    merged = {}
    for key in keys:
        out = {}
        if stage <= 2:
            z._zero2_merge_trainable_params(out, len(optim_files), flats[key], zero_model_states, paddings)
        else:
            z._zero3_merge_trainable_params(out, len(optim_files), flats[key], zero_model_states)
        merged[key] = {k: v.contiguous().float().clone() for k, v in out.items()}
    return merged, step


# ------------------------------------------------------------------------------ fill a fresh engine

def optimizer_and_state_keys(engine):
    """The torch optimizer doing the update and the tensors its state is keyed by: the model's parameters
    at stage 0, ZeRO's flat fp32 partitions at stages 1-3 (not its param_groups, which ZeRO swaps in
    only during step())."""
    opt = engine.optimizer
    if hasattr(opt, "single_partition_of_fp32_groups"):
        return opt.optimizer, list(opt.single_partition_of_fp32_groups)
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return opt.optimizer, list(opt.fp32_partitioned_groups_flat)
    return opt, [p for group in opt.param_groups for p in group["params"]]


def link_optimizer_state(engine) -> None:
    """ZeRO 1/2 link each parameter's fragment to the optimizer state lazily; do it now, so
    `safe_set_full_optimizer_state` can write into it before the first step."""
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def set_step_counters(engine, global_steps: int, global_samples: int, skipped_steps: int) -> None:
    engine.global_steps = global_steps
    engine.global_samples = global_samples
    engine.skipped_steps = skipped_steps
