"""The optimizer (`train.optimizer`) and the LR schedule (`train.lr_schedule`) a run trains with.

Both are client objects (model.build_engine) handed to `deepspeed.initialize`, which saves and loads their state with the engine,
so a resumed run continues with the same moments and the same position in the schedule.

Optimizers: DeepSpeed's own where it has one for the place the optimizer runs (its fused CUDA kernels on a
GPU, its vectorised C++ CPU Adam and Lion when ZeRO offloads the optimizer from GPUs: torch's would be
several times slower there); torch's (or a plain-torch Lion) on a CPU-only run, which builds no JIT op and
computes the same arithmetic with and without offload; transformers' Adafactor and bitsandbytes' 8-bit
AdamW, which DeepSpeed has no version of.

Schedules: `cosine`, `linear` and `constant` are ds-finetune's own (since the first release; kept bitwise):
warmup reaches lr/warmup on the first step, and the decay ends at `min_lr_ratio`. Every other name is
`transformers.get_scheduler`'s, with its numbers (warmup starts from 0, as in the HF Trainer and TRL) and
its keyword arguments from `train.lr_scheduler_kwargs`.
"""

from __future__ import annotations

import inspect
import math

from ds_finetune.errors import UserError

OPTIMIZERS = ("adamw", "adamw_fused", "lion", "adafactor", "adamw_8bit")
OWN_SCHEDULES = ("cosine", "linear", "constant")
# transformers.SchedulerType's names (5.x) that are not ours; the two metric-driven ones are refused below.
HF_SCHEDULES = ("cosine_with_restarts", "polynomial", "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr",
                "cosine_warmup_with_min_lr", "warmup_stable_decay", "reduce_lr_on_plateau", "greedy")
SCHEDULES = OWN_SCHEDULES + HF_SCHEDULES
# A scheduler that steps on a measured loss: DeepSpeed steps the scheduler after each optimizer step with no
# metric, and nothing would put the metric's history into a checkpoint, so a resume could not be exact.
METRIC_DRIVEN = ("reduce_lr_on_plateau", "greedy")
# Adam: what DeepSpeed's ZeRO lists as tested, and the moments a checkpoint converted to another ZeRO stage or
# world size carries.
ADAM = ("adamw", "adamw_fused")


# ------------------------------------------------------------------------------------------- checks

def check_train_settings(t) -> None:
    """The optimizer and schedule settings of the `train` section (`t`), or a ValueError whose text the config
    error shows on one line. Schedule arguments are checked against transformers' own function, so a typo or a
    missing argument stops the run before anything launches."""
    if t.lr_schedule in METRIC_DRIVEN:
        raise ValueError(f"train.lr_schedule {t.lr_schedule} steps on a measured loss, which DeepSpeed's step does "
                         f"not pass and a checkpoint does not keep (no exact resume); use cosine_with_min_lr or "
                         f"warmup_stable_decay")
    if t.warmup_steps and t.warmup_ratio:
        raise ValueError("set train.warmup_steps or train.warmup_ratio, not both")
    if t.lr_schedule in OWN_SCHEDULES:
        if t.lr_scheduler_kwargs:
            raise ValueError(f"train.lr_scheduler_kwargs is for transformers' schedules; {t.lr_schedule} takes "
                             f"train.min_lr_ratio (or use cosine_with_min_lr with its min_lr_rate)")
    else:
        if t.min_lr_ratio:
            raise ValueError(f"train.min_lr_ratio ({t.min_lr_ratio}) is for cosine/linear; with {t.lr_schedule} set "
                             f"it to 0 and pass the schedule's own argument in train.lr_scheduler_kwargs (e.g. "
                             f"min_lr_rate for cosine_with_min_lr, min_lr_ratio for warmup_stable_decay)")
        hf_schedule_factor(t, total_steps=max(t.max_steps or 0, 1000))  # raises on bad arguments
    if t.optimizer == "adafactor" and t.zero_stage != 0:
        raise ValueError("train.optimizer adafactor needs train.zero_stage 0: ZeRO 1-3 hand the optimizer flat 1-D "
                         "partitions, on which Adafactor's factored moments do not exist; set train.zero_stage=0 "
                         "or use adamw")


def check_convertible(optimizer: str) -> None:
    """Converting a checkpoint to another ZeRO stage or world size carries Adam's moments only."""
    if optimizer not in ADAM:
        raise UserError(f"resume error: a checkpoint of a train.optimizer {optimizer} run resumes only on its own ZeRO "
                        f"stage and world size (its state is not Adam's moments, which conversion carries); resume "
                        f"with the checkpoint's train.zero_stage and number of ranks")


def check_same_optimizer(saved_fingerprint: dict, fingerprint: dict, path) -> None:
    """The checkpoint's optimizer state is that optimizer's: another one cannot load it, whatever
    --allow-config-change allows (a fingerprint without the key is adamw's; adamw_fused reads adamw's state)."""
    def name(fp):
        return (fp or {}).get("exact", {}).get("train.optimizer", {}).get("optimizer", "adamw")
    was, now = name(saved_fingerprint), name(fingerprint)
    if was != now and not (was in ADAM and now in ADAM):  # the two AdamWs keep the same state
        raise UserError(f"resume error: {path} holds the state of train.optimizer {was}, not {now}; resume with "
                        f"train.optimizer={was}, or start a new run")


def check_installed(optimizer: str) -> None:
    if optimizer == "adamw_8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("config error: train.optimizer adamw_8bit needs bitsandbytes, which is not installed; "
                            "pip install 'ds-finetune[qlora]' (or use adamw)") from None


# ------------------------------------------------------------------------------------------ optimizer

def build_optimizer(groups: list[dict], t, offloaded: bool, on_gpu: bool):
    """The optimizer doing the update over `groups` (decayed and undecayed parameters). `offloaded`: ZeRO
    keeps the optimizer on the CPU of a GPU run."""
    import torch

    betas = (t.adam_beta1, t.adam_beta2)
    name = t.optimizer
    if name in ("adamw", "adamw_fused"):
        if offloaded:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(groups, lr=t.lr, betas=betas, eps=t.adam_eps, adamw_mode=True)
        # At ZeRO 0 in bf16/fp16 DeepSpeed wraps its own FusedAdam in its fused FP16_Optimizer, whose flat
        # fp32 masters a conversion or an export cannot read per parameter; torch's fused AdamW (one kernel
        # over a group's tensors as well) gets the wrapper that keeps them per parameter.
        if name == "adamw_fused" and on_gpu and t.zero_stage != 0:
            from deepspeed.ops.adam import FusedAdam
            return FusedAdam(groups, lr=t.lr, betas=betas, eps=t.adam_eps, adam_w_mode=True)
        # torch's fused kernel runs on the CPU too (one kernel over all tensors of a group); adamw keeps
        # torch's default implementation, as before the option existed
        fused = {"fused": True} if name == "adamw_fused" else {}
        return torch.optim.AdamW(groups, lr=t.lr, betas=betas, eps=t.adam_eps, **fused)
    if name == "lion":  # as the HF Trainer, adam_beta1/adam_beta2 are Lion's two betas
        if offloaded:
            from deepspeed.ops.lion import DeepSpeedCPULion
            return DeepSpeedCPULion(groups, lr=t.lr, betas=betas)
        if on_gpu:
            from deepspeed.ops.lion import FusedLion
            return FusedLion(groups, lr=t.lr, betas=betas)
        from ds_finetune.lion import Lion
        return Lion(groups, lr=t.lr, betas=betas)
    if name == "adafactor":  # the HF Trainer's `adafactor`: a fixed lr (the schedule's), no parameter scaling
        from transformers.optimization import Adafactor
        return Adafactor(groups, lr=t.lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "adamw_8bit":
        if offloaded:
            raise UserError("config error: train.optimizer adamw_8bit with an offloaded optimizer is not supported "
                            "(ZeRO-Offload runs DeepSpeed's CPU Adam); remove the offload or use adamw")
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=betas, eps=t.adam_eps)
    raise UserError(f"config error: train.optimizer {name} is not one of {', '.join(OPTIMIZERS)}")


# ------------------------------------------------------------------------------------------- schedule

def warmup_steps(t, total_steps: int) -> int:
    """train.warmup_steps, or train.warmup_ratio of the run's steps rounded up (the HF Trainer's rule)."""
    return t.warmup_steps if t.warmup_steps or not t.warmup_ratio else math.ceil(total_steps * t.warmup_ratio)


def lr_factor(t, total_steps: int):
    """step -> the lr's factor (`step`: optimizer steps already taken), for a LambdaLR."""
    if t.lr_schedule in OWN_SCHEDULES:
        return own_schedule_factor(t, total_steps)
    try:
        return hf_schedule_factor(t, total_steps)
    except ValueError as e:  # e.g. warmup_stable_decay's decay steps beyond this run's steps
        raise UserError(f"config error: {e}") from None


def own_schedule_factor(t, total_steps: int):
    warmup = warmup_steps(t, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay
    return factor


def hf_schedule_factor(t, total_steps: int):
    """transformers' schedule `t.lr_schedule` as a step -> factor function. Built on a stand-in optimizer of
    lr `t.lr` (polynomial reads the peak lr from it), so the engine's LambdaLR drives DeepSpeed's wrapped
    optimizer with it. A ValueError names a bad argument."""
    import torch
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType, get_scheduler

    kwargs = dict(t.lr_scheduler_kwargs)
    function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(t.lr_schedule)]
    params = inspect.signature(function).parameters
    ours = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
    accepted = [p for p in params if p not in ours]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"train.lr_scheduler_kwargs: {t.lr_schedule} takes no {', '.join(unknown)} "
                         f"(it takes: {', '.join(accepted) or 'nothing'})")
    missing = [p for p in accepted if params[p].default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ValueError(f"train.lr_schedule {t.lr_schedule} needs train.lr_scheduler_kwargs.{missing[0]}")
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.lr)
    try:
        scheduler = get_scheduler(t.lr_schedule, stand_in, num_warmup_steps=warmup_steps(t, total_steps),
                                  num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"train.lr_schedule {t.lr_schedule}: {' '.join(str(e).split())}") from None
    return scheduler.lr_lambdas[0]
