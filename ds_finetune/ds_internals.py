"""Every use of DeepSpeed's private API outside checkpoints, in one place, behind a version check (the
checkpoint code's own uses are in `checkpoint/ds_internals.py`, which imports this module for the check).

What is private and why we use it:
* `engine.seq_dp_world_size` / `sequence_parallel_size` and which reduction each ZeRO stage runs: the
  number of ranks DeepSpeed divides a gradient by (`gradient_averaging_ranks`).
* The fp16 optimizer wrappers' `loss_scale` (`loss_scale`).
* The Ulysses module `register_with_transformers` hides in a closure, and its registered shapes
  (`registered_ulysses`, `set_ulysses_batch_size`).
* `deepspeed.ops.__compatible_ops__`: the CPU backend's shared-memory all-reduce is marked unbuildable
  (`skip_cpu_inference_all_reduce`).
* The optimizer's `_global_grad_norm`, which `engine.get_global_grad_norm()` copies (`reports_grad_norm`).
* `engine.enable_backward_allreduce`: no gradient all-reduce over one rank at ZeRO 0
  (`skip_single_rank_allreduce`).
* `deepspeed.runtime.zero.muon.muon_optimizer` and `original_muon`: stand-ins (`skip_muon_import`), so that
  no ZeRO engine compiles Muon's kernels.
* ZeRO-3's parameter coordinator (`optimizer.parameter_offload`: its forward/backward hooks, its trace,
  `_register_deepspeed_module`): GRPO's generation runs on gathered parameters without the hooks
  (`WholeForGeneration`), as TRL's unwrap_model_for_generation does.

Tested with DeepSpeed 0.19 only; another minor version is refused in one line (setup.cfg pins it too).
"""

from __future__ import annotations

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


# ------------------------------------------------------------------------------------------- processes

def skip_cpu_inference_all_reduce() -> None:
    """DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce (deepspeed_shm_comm) when the
    process group starts: ~30 s of both cores at the first launch on a machine (`comm/torch.py`
    build_shm_op). Only `inference_all_reduce` (AutoTP inference layers) uses it; training's collectives
    are the process group's. Marked incompatible, build_shm_op returns None and nothing is built."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def skip_muon_import() -> None:
    """DeepSpeed imports its Muon optimizer's modules in every ZeRO engine (the optimizer check at
    `deepspeed.initialize`, and ZeRO 1/2's gradient reduction and partitioning on every step) to ask whether
    the optimizer is Muon, and they wrap their kernels in `torch.compile` at import: torch._dynamo and inductor
    load, ~2 s of CPU a rank a start (a quarter of a tiny test run's). We never train with Muon, so both
    modules are stand-ins: a Muon class no optimizer of ours is an instance of, and an update that is only
    called for parameters marked `use_muon` (none are)."""
    import sys
    import types

    class MuonWithAuxAdam(torch.optim.Optimizer):
        """Never instantiated: `isinstance(optimizer, MuonWithAuxAdam)` is False for ours."""

    def muon_update(*args, **kwargs):
        raise RuntimeError("DeepSpeed's Muon optimizer is not available in ds-finetune (AdamW trains)")

    for name, attrs in (("muon_optimizer", {"MuonWithAuxAdam": MuonWithAuxAdam}),
                        ("original_muon", {"muon_update": muon_update})):
        full = f"deepspeed.runtime.zero.muon.{name}"
        if full not in sys.modules:
            stub = types.ModuleType(full)
            stub.__dict__.update(attrs)
            sys.modules[full] = stub


# ------------------------------------------------------------------------------------------ the engine

def skip_single_rank_allreduce(engine) -> None:
    """ZeRO 0 on one data-parallel rank: DeepSpeed's gradient all-reduce (`allreduce_gradients` ->
    `buffered_allreduce_fallback`) copies every gradient into flat buckets of up to 5e8 elements and back: for a
    model under 5e8 parameters a second copy of all its gradients at once (a peak the size of the fp32
    gradients), for an all-reduce over one rank. Turned off there with the engine's own switch
    (`enable_backward_allreduce`, which DeepSpeed clears for optimizers that reduce by themselves): the
    gradients keep the same bits (a sum over one rank, divided by 1). Left on for the wrappers that track the
    accumulation boundary through that call (ZeROOptimizer: bf16's, ZeRO 1-3's)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    if engine.zero_optimization_stage() == 0 and engine.seq_dp_world_size == 1 and \
            not isinstance(engine.optimizer, ZeROOptimizer) and engine.gradient_predivide_factor() == 1.0:
        engine.enable_backward_allreduce = False


# ------------------------------------------------------------------------------------------ the loss

def loss_scale(engine) -> float:
    """fp16's current loss scale (every DeepSpeed fp16 optimizer wrapper has `loss_scale`); 1 otherwise."""
    return float(engine.optimizer.loss_scale) if engine.fp16_enabled() else 1.0


# ------------------------------------------------------------------------------ sequence parallelism

def gradient_averaging_ranks(engine) -> int:
    """How many ranks DeepSpeed divides each summed gradient by; the loss is scaled to cancel it.

    DeepSpeed means to average over the data-parallel ranks and to sum over a sequence-parallel group (each
    rank's gradient is the part of its slice of the sequence). ZeRO 0-2 do, dividing by DP x SP / SP. ZeRO-3's
    reduce-scatter (DeepSpeed's default, and our config's) does not: `reduce_scatter_coalesced` divides by
    every rank of the partition group, DP x SP, with no SP correction (0.19.8, `stage3.__avg_scatter_grads`;
    only its all-reduce path corrects, and that path is taken per bucket by size). Without SP both are DP."""
    ranks, sp = engine.seq_dp_world_size, engine.sequence_parallel_size
    if sp > 1 and engine.zero_optimization_stage() == 3:
        if not engine.zero_reduce_scatter():  # some buckets would be divided by DP, others by DP x SP
            raise RuntimeError("ZeRO-3 under sequence parallelism needs zero_optimization.reduce_scatter: true")
        return ranks
    return ranks // sp


def registered_ulysses(impl: str):
    """The `UlyssesSPAttentionHF` that `register_with_transformers` put behind transformers' attention
    function `impl` (it returns only the mpu; the module is a variable of the wrapper it registers)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fn = ALL_ATTENTION_FUNCTIONS[impl]
    for cell in getattr(fn, "__closure__", None) or ():
        if isinstance(cell.cell_contents, UlyssesSPAttentionHF):
            return cell.cell_contents
    raise RuntimeError(f"no Ulysses module behind the {impl} attention function: DeepSpeed's registration changed")


def set_ulysses_batch_size(ulysses, rows: int) -> None:
    """Ulysses reshapes with the micro-batch size it was registered with (the sequence length it takes from
    each call); an evaluation batch may hold fewer rows, so its batch dimension is set per call."""
    if ulysses.batch_size == rows:
        return
    ulysses.batch_size = rows
    for name in ("required_query_shape", "required_key_value_shape", "required_context_shape"):
        shape = list(getattr(ulysses, name))
        shape[1] = rows
        setattr(ulysses, name, torch.Size(shape))


# ---------------------------------------------------------------------- ZeRO-3 whole for generation

def zero3_offload(engine):
    """The engine's ZeRO-3 parameter coordinator (DeepSpeedZeRoOffload), or None below stage 3."""
    optimizer = getattr(engine, "optimizer", None)
    if getattr(engine, "zero_optimization_stage", lambda: 0)() != 3 or optimizer is None:
        return None
    return getattr(optimizer, "parameter_offload", optimizer)


class WholeForGeneration:
    """Under ZeRO-3, every parameter gathered on this rank and the module's fetch/release hooks taken off
    for the duration (TRL's unwrap_model_for_generation with gather_deepspeed3_params): a rank then runs
    as many forwards as its own completions need, with no collective inside them (ranks that sample
    different lengths need not run in lockstep). Afterwards the hooks are registered again and the
    coordinator's trace invalidated, as TRL's add_hooks does. Below stage 3 it does nothing."""

    def __init__(self, engine):
        self.engine, self.offload, self.gathered = engine, zero3_offload(engine), None

    def __enter__(self):
        if self.offload is None:
            return self
        import deepspeed
        self.gathered = deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        self.gathered.__enter__()
        for p in self.offload.module.parameters(recurse=True):
            p.ds_active_sub_modules.clear()
        for hook in self.offload.forward_hooks + self.offload.backward_hooks:
            hook.remove()
        self.offload.forward_hooks, self.offload.backward_hooks = [], []
        return self

    def __exit__(self, *exc):
        if self.offload is None:
            return False
        try:
            coordinator = getattr(self.offload, "param_coordinator", None)
            if coordinator is not None and not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()
            self.offload._register_deepspeed_module(self.offload.module)
        finally:
            self.gathered.__exit__(*exc)
        return False


# -------------------------------------------------------------------------------------- grad norm

def reports_grad_norm(engine) -> bool:
    """Whether `engine.get_global_grad_norm()` will hold the step's norm: the engine copies it from its
    optimizer's `_global_grad_norm`, which ZeRO 1-3 and the fp16/bf16 wrappers keep and a client optimizer
    handed over as it is (ZeRO 0, fp32) lacks."""
    return hasattr(engine.optimizer, "_global_grad_norm")
