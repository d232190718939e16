"""Objectives: what one optimizer step computes from the global batch, behind one seam.

`train.objective` names an entry of `OBJECTIVES` (its module); `build_objective(parts)` builds it once the
engine exists.
The loop (`train.fit`) calls `objective.step(engine, units, step, before_update)` with the step's units of
the epoch order and gets a `StepResult` back; the evaluator calls `eval_batch`. Neither knows which objective
runs, what a unit holds (a row, a pack, a preference pair: `data` decides how rows group into units) or
whether the sequences are split over ranks (sequence parallelism is inside the loss an objective is built
with, `sequence.ShardedLoss`).

Each objective is a file: `sft.py` (next-token loss), `dpo.py` (preference pairs; its reference model; its
loss types in `dpo_losses.py`), `dpo_reference.py` (the reference log-probs stored before training),
`orpo.py` and `cpo.py` (ORPO, CPO and SimPO: pairs without a reference), `kto.py` (unpaired rows, DPO's
reference), `reward_model.py` (a sequence classifier on pairs); `pairs.py` is the step every pair
objective shares; `grpo.py` (online RL: `rollout.py` samples, `rewards.py` scores, `grpo_loss.py` is TRL's
math, `grpo_gather.py` its cross-rank exchanges). A new one is a module with a
`build(parts)` and a line in `OBJECTIVES` (and a choice of `train.objective` in config.py); its config section is named like it (`dpo:`), and its settings go
into the exact fingerprint (`fingerprint_settings`).

Every objective's step is `accumulate`: its micro-batches through the engine (forward, backward, step),
the `mid_accum` fault point after each, the update hook before the step that changes the weights, and the
loss normalised by what the objective counts in the global batch (target tokens, pairs).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from ds_finetune.device_batch import to_device
from ds_finetune.ds_internals import gradient_averaging_ranks, loss_scale
from ds_finetune.faults import fault_point


@dataclass(frozen=True)
class StepResult:
    """One optimizer step of one rank. Metric `sums` are this rank's, reduced with the loss in the loop's one
    all-reduce and divided by their count (a metric whose count is 0 in the step is not logged); `counts`
    are numbers of the global batch every rank knows, logged as they are."""
    loss_sum: torch.Tensor  # this rank's summed loss, on the device (the loop reduces it)
    normaliser: int         # what the step's loss is divided by: the global batch's target tokens, pairs, ...
    sums: dict = field(default_factory=dict)    # metric name -> (this rank's sum, the global batch's count)
    counts: dict = field(default_factory=dict)  # metric name -> a number of the global batch


@runtime_checkable
class Objective(Protocol):
    """A training objective. `metric_names`: what its `StepResult.sums` and `eval_batch` sums are called
    beside `loss` (TRL's names where TRL has the method); `perplexity`: whether its loss is a mean token
    loss (the evaluator then reports `eval_ppl`)."""
    metric_names: ClassVar[tuple[str, ...]]
    perplexity: ClassVar[bool]

    def step(self, engine, units: np.ndarray, step: int, before_update: Callable | None) -> StepResult:
        """Optimizer step `step` (1-based) over the global batch `units` (every rank gets all of them and
        takes its share); `before_update()` runs right before the engine's step changes the weights."""

    def eval_batch(self, engine, data, units: np.ndarray, counted: bool) -> tuple[torch.Tensor, int, dict]:
        """(summed loss on the device, its count, metric sums) of eval `units` of `data` (this rank's; one row
        or group a unit, never packed). A batch not `counted` (a rank whose share ran out) runs the same
        forwards and counts nothing, so that every rank runs as many (ZeRO-3 gathers in each)."""


@dataclass(frozen=True)
class ObjectiveParts:
    """What an objective is built from: the run's pieces once the engine exists."""
    cfg: object                # config.RunConfig
    engine: object             # the DeepSpeed engine
    model: torch.nn.Module     # the engine's module (a PEFT model under LoRA)
    ds_config: dict
    data: object               # data.TokenizedData | data.MixedData: the training rows
    eval_data: object | None   # the evaluator's rows where it has its own (eval.path, eval.sources)
    layout: object             # sampler.BatchLayout
    pad_id: int
    rank: int
    world: int
    group: object              # sequence.SequenceGroup: this rank's place in the DP x SP layout
    ulysses: object | None     # DeepSpeed's Ulysses module under sequence parallelism
    weights_are_base: bool     # no checkpoint's weights are loaded yet (a converted one may already be)
    say: Callable
    tokenizer: object = None   # the run's tokenizer (GRPO decodes its completions)
    config_dir: object = None  # the config file's folder (GRPO imports module:callable rewards from it)


def accumulate(engine, loss_fn, micro_batches: list, normaliser: int, step: int, before_update=None,
               per_batch: list[dict] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over this rank's micro-batches; returns this rank's summed loss and, for a loss_fn
    that returns (loss, metric sums), the metric sums added over the micro-batches. `per_batch`: extra
    keyword arguments of loss_fn for each micro-batch.

    The step's loss is (sum of the losses over the global batch) / `normaliser`. DeepSpeed divides each
    micro-step's loss by grad_accum and each gradient by the ranks it averages over
    (`ds_internals.gradient_averaging_ranks`: the data-parallel size, or every rank under ZeRO-3 with
    sequence parallelism), so each micro-step's sum is scaled by grad_accum * ranks / normaliser to cancel
    both. Backward then brings the loss that gradient times fp16's loss scale over grad_accum, which the
    fused loss needs to know in advance under fp16."""
    grad_accum = len(micro_batches)
    scale = grad_accum * gradient_averaging_ranks(engine) / normaliser
    expected_grad = scale * loss_scale(engine) / grad_accum
    local_sum = torch.zeros((), dtype=torch.float64, device=engine.device)  # no host sync per micro-step
    extra_sum = None
    for i, batch in enumerate(micro_batches):
        loss_sum = loss_fn(engine, *to_device(batch, engine.device), grad_scale=expected_grad,
                           **(per_batch[i] if per_batch else {}))
        if isinstance(loss_sum, tuple):
            loss_sum, extra = loss_sum
            extra_sum = extra if extra_sum is None else extra_sum + extra
        engine.backward(loss_sum * scale)
        if before_update is not None and engine.is_gradient_accumulation_boundary():
            before_update()  # this step() changes the weights and optimizer state
        engine.step()
        local_sum += loss_sum.detach().double()
        fault_point("mid_accum", engine.global_rank, step)
    return local_sum, extra_sum


def fingerprint_settings(cfg) -> dict:
    """The objective's settings in the exact fingerprint: its name and its config section. None for SFT,
    so that SFT checkpoints from before objectives existed still match."""
    name = cfg.train.objective
    if name == "sft":
        return {}
    section = getattr(cfg, name)
    settings = section.fingerprint() if hasattr(section, "fingerprint") else section.model_dump(mode="json")
    rewards = {"rewards": [r.model_dump(mode="json") for r in cfg.rewards]} if cfg.rewards else {}
    return {"train.objective": name, name: settings, **rewards}


# train.objective -> the module whose `build(parts)` makes it (imported when chosen: each is a file here).
OBJECTIVES = {
    "sft": "ds_finetune.objectives.sft",
    "dpo": "ds_finetune.objectives.dpo",
    "orpo": "ds_finetune.objectives.orpo",
    "simpo": "ds_finetune.objectives.cpo",  # SimPO is CPO's simpo loss, with its own section and defaults
    "cpo": "ds_finetune.objectives.cpo",
    "kto": "ds_finetune.objectives.kto",
    "reward": "ds_finetune.objectives.reward_model",
    "grpo": "ds_finetune.objectives.grpo",  # online RL: rollout.py samples, rewards.py scores, grpo_loss.py
}


def build_objective(parts: ObjectiveParts) -> Objective:
    return importlib.import_module(OBJECTIVES[parts.cfg.train.objective]).build(parts)
