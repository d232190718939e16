"""Run config -> DeepSpeed JSON config. The only module that knows DeepSpeed's config keys.

Every number is concrete: `deepspeed.initialize` does not resolve "auto" (that is the HF integration's job).
"""

from __future__ import annotations

from typing import Literal

from ds_finetune.errors import UserError


def build_zero_config(
    stage: int,
    micro_batch_size: int = 1,
    grad_accum: int = 1,
    world_size: int = 1,
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
    grad_clip: float = 1.0,
    offload_optimizer: Literal["none", "cpu"] = "none",
    offload_param: Literal["none", "cpu"] = "none",
    on_gpu: bool = True,
) -> dict:
    """`on_gpu`: overlap the gradient reduction with backward and pin offloaded memory (what GPUs want);
    off for CPU runs, where there is no transfer to overlap and nothing to pin."""
    if stage not in (0, 1, 2, 3):
        raise UserError(f"zero stage must be 0, 1, 2 or 3 (got {stage})")
    if offload_param != "none" and stage != 3:
        raise UserError("parameter offload needs ZeRO stage 3")
    if offload_optimizer != "none" and stage == 0:
        raise UserError("optimizer offload needs ZeRO stage 1, 2 or 3")
    for name, value in (("micro batch size", micro_batch_size), ("grad accum", grad_accum), ("world size", world_size)):
        if value < 1:
            raise UserError(f"{name} must be >= 1 (got {value})")

    zero: dict = {"stage": stage}
    if stage in (1, 2):
        # Bucket sizes are DeepSpeed's defaults, written out so the file says what ran.
        zero.update({"contiguous_gradients": True, "overlap_comm": on_gpu,
                     "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000})
    if stage == 3:
        # reduce_scatter is DeepSpeed's default; written out because objective.train_step's gradient scale
        # under sequence parallelism depends on it (ds_internals.gradient_averaging_ranks).
        zero.update({"contiguous_gradients": True, "overlap_comm": on_gpu, "reduce_bucket_size": 500_000_000,
                     "reduce_scatter": True,
                     "stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000,
                     "stage3_gather_16bit_weights_on_model_save": False})
    if offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": offload_optimizer, "pin_memory": on_gpu}
    if offload_param != "none":
        zero["offload_param"] = {"device": offload_param, "pin_memory": on_gpu}

    config = {
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 1_000_000_000,  # we log; keep DeepSpeed's own step prints quiet
        "wall_clock_breakdown": False,
    }
    if offload_optimizer != "none":
        # On the CPU we pass a client torch.optim.AdamW (no JIT-built ops needed); let ZeRO-Offload accept it.
        # (On GPUs model.build_engine passes DeepSpeedCPUAdam, which DeepSpeed takes anyway.)
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def zero_config_for_run(cfg, world_size: int, micro: int | None = None, accum: int | None = None,
                        on_gpu: bool = False) -> dict:
    """DeepSpeed's batch is per data-parallel rank: under sequence parallelism world / SP of them."""
    if micro is None or accum is None:
        micro, accum, _ = cfg.batch_layout(world_size)
    t = cfg.train
    data_parallel = cfg.data_parallel_size(world_size)
    return build_zero_config(t.zero_stage, micro, accum, data_parallel, cfg.model.dtype, t.grad_clip,
                             t.offload_optimizer, t.offload_param, on_gpu)
