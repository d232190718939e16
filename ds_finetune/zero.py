"""Run config -> DeepSpeed JSON config. The only module that knows DeepSpeed's config keys.

Every number is concrete: `deepspeed.initialize` does not resolve "auto" (that is the HF integration's job).
"""

from __future__ import annotations

from typing import Literal

from ds_finetune.errors import UserError
from ds_finetune.optim import ADAM
from ds_finetune.zero_passthrough import merge_passthrough


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
    hidden_size: int | None = None,
    untested_optimizer: bool = False,
) -> dict:
    """`on_gpu`: overlap the gradient reduction with backward and pin offloaded memory (what GPUs want);
    off for CPU runs, where there is no transfer to overlap and nothing to pin. `hidden_size`: the model's,
    which sizes the reduce bucket (unknown: DeepSpeed's default). `untested_optimizer`: the client optimizer is not
one of the classes DeepSpeed's ZeRO lists as tested (Lion in plain torch, Adafactor, bitsandbytes' AdamW8bit)."""
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
    # The reduce bucket is allocated whole on the device and gradients wait in it until reduced: DeepSpeed's
    # default 5e8 elements is 1 GB a rank in bf16 (2 in fp32) whatever the model, memory no parallelism
    # divides, and ZeRO 1-2 keep two of them under overlap_comm (stage_1_and_2.py's double buffer): 2 GB,
    # more than a 0.5B model's weights. transformers' "auto" sizes it hidden_size^2 (32 MiB in bf16 at
    # width 4096); so do we, at every stage (never above DeepSpeed's default).
    bucket = min(hidden_size * hidden_size, 500_000_000) if hidden_size else 500_000_000
    if stage in (1, 2):
        # The all-gather bucket only chunks the gather of updated weights (nothing is allocated for it):
        # DeepSpeed's default, written out so the file says what ran.
        zero.update({"contiguous_gradients": True, "overlap_comm": on_gpu,
                     "reduce_bucket_size": bucket, "allgather_bucket_size": 500_000_000})
    if stage == 3:
        # reduce_scatter is DeepSpeed's default, written out because accumulate's gradient scale under
        # sequence parallelism depends on it (gradient_averaging_ranks).
        zero.update({"contiguous_gradients": True, "overlap_comm": on_gpu, "reduce_bucket_size": bucket,
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
    if untested_optimizer and stage > 0:
        # ZeRO refuses an optimizer class it has not tested unless told; ours update each flat partition
        # elementwise (Lion, AdamW8bit's blocks) as on whole tensors, which is all ZeRO 1-3 need.
        config["zero_allow_untested_optimizer"] = True
    return config


def zero_config_for_run(cfg, world_size: int, micro: int | None = None, accum: int | None = None,
                        on_gpu: bool = False, download_model_config: bool = False) -> dict:
    """DeepSpeed's batch is per data-parallel rank: under sequence parallelism world / SP of them.
    `download_model_config`: a named model's config may be fetched (the training process, which downloads
    the model next anyway); otherwise only the local Hugging Face cache is read."""
    if micro is None or accum is None:
        micro, accum, _ = cfg.batch_layout(world_size)
    t = cfg.train
    data_parallel = cfg.data_parallel_size(world_size)
    generated = build_zero_config(t.zero_stage, micro, accum, data_parallel, cfg.model.dtype, t.grad_clip,
                                  t.offload_optimizer, t.offload_param, on_gpu,
                                  model_hidden_size(cfg.model, download=download_model_config),
                                  untested_optimizer=t.optimizer not in ADAM)
    return merge_passthrough(generated, cfg.deepspeed, t.zero_stage)  # the run config's `deepspeed:` mapping


def model_hidden_size(model, download: bool = False) -> int | None:
    """The hidden size of the run's model (`model` is the config's model section): from the inline config,
    else the pretrained model's config as transformers reads it (a folder, or a named model from the local
    cache; fetched where `download`); None where none says (the model's own load reports a bad folder)."""
    config = model.config
    if config is None:
        from transformers import AutoConfig
        try:
            loaded = AutoConfig.from_pretrained(model.name_or_path, local_files_only=not download,
                                                **model.hub_options())
            config = loaded.get_text_config().to_dict()
        except (OSError, ValueError, KeyError, TypeError):
            config = {}
    size = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
    return size if isinstance(size, int) and size > 0 else None
