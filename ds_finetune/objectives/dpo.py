"""Direct preference optimisation (train.objective: dpo): the loss, its metrics and the objective's step.

A unit of the epoch order is a pair (its chosen and rejected rows, `data.preference`); the global batch
counts pairs. A micro-batch of B pairs runs as one forward of 2B sequences, the chosen ones first (TRL's
concatenated batch), and its per-sequence summed target log-probs come from the fused chunked head
(`loss.fused_sequence_logps`; no logits for every position at once). The reference log-probs are the
base's: with LoRA the same model with its adapters disabled (no second model), else precomputed once
before training (`dpo_reference.py`) and read by row.

The loss is `dpo_losses.py`'s (TRL's DPOTrainer formulas: every pair-defined loss type, a weighted list of
them, `dpo.rpo_alpha`'s NLL term) and the step's loss their mean over the global batch's pairs.
rewards/chosen = beta x chosen log-ratio (rejected alike), rewards/margins their difference,
rewards/accuracies the share of pairs whose chosen reward is higher, logps/chosen and logps/rejected the
policy's summed log-probs: each a mean over the pairs, summed on each rank and reduced with the loss in
the step's one all-reduce. logits/chosen and logits/rejected (the mean over the vocabulary of the logits at
each completion token, averaged over the completion tokens) and mean_token_accuracy (the share of chosen
completion tokens that are the top logit) are TRL's too, token means over the global batch. Not entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ds_finetune import lora
from ds_finetune.data import collate_pairs
from ds_finetune.device_batch import facts_of, host_to_device
from ds_finetune.dist import rng_untouched, seed_everything
from ds_finetune.model import build_model
from ds_finetune.objectives import ObjectiveParts
from ds_finetune.objectives.dpo_losses import dpo_loss_sum, pair_losses
from ds_finetune.objectives.dpo_reference import stored_reference
from ds_finetune.objectives.pairs import PairObjective, chosen_completion_tokens, pack_length
from ds_finetune.sequence import sequence_logps_fn

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
# Means over the completion tokens (of the chosen rows; of the rejected for logits/rejected), from the fused
# head's per-token stats: the mean logit over the vocabulary, whether the target is the top logit.
TOKEN_METRICS = ("logits/chosen", "logits/rejected", "mean_token_accuracy")


def dpo_metric_sums(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's METRICS summed over B pairs, as one float64 vector (no graph)."""
    with torch.no_grad():
        chosen, rejected = policy.chunk(2)
        ref_chosen, ref_rejected = reference.to(policy.dtype).chunk(2)
        r_chosen, r_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        return torch.stack([r_chosen.sum(), r_rejected.sum(), (r_chosen > r_rejected).float().sum(),
                            (r_chosen - r_rejected).sum(), chosen.sum(), rejected.sum()]).double()


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, n_tokens: torch.Tensor, beta: float, loss_type: str,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair losses, the METRICS summed) of one pair-defined loss type: `dpo_losses.pair_losses` on the
    concatenated batch ([2B]: chosen then rejected)."""
    chosen, rejected = policy.chunk(2)
    ref_chosen, ref_rejected = reference.to(policy.dtype).chunk(2)
    n_chosen, n_rejected = n_tokens.to(policy.dtype).chunk(2)
    losses = pair_losses(loss_type, chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected, beta,
                         label_smoothing)
    return losses, dpo_metric_sums(policy, reference, beta)


# ------------------------------------------------------------------------------------------ reference

class AdaptersOff:
    """The reference of a LoRA run: the same model with its adapters disabled, in eval mode (no dropout,
    no RNG drawn), under no_grad. No second model; one forward without a graph per micro-batch."""

    def __init__(self, logps_fn):
        self.logps_fn = logps_fn

    def __call__(self, engine, input_ids, attention_mask, labels, rows, facts=None) -> torch.Tensor:
        module = engine.module
        training = module.training
        module.eval()
        try:
            with torch.no_grad(), module.disable_adapter():
                return self.logps_fn(engine, input_ids, attention_mask, labels, facts)
        finally:
            module.train(training)


class FrozenModel:
    """The reference of `dpo.reference: model`: a frozen copy of the base as a DeepSpeed engine of its own
    (no optimizer; partitioned under ZeRO 3), in eval mode, run under no_grad on every micro-batch."""

    def __init__(self, ref_engine, logps_fn):
        self.ref_engine, self.logps_fn = ref_engine, logps_fn

    def __call__(self, engine, input_ids, attention_mask, labels, rows, facts=None) -> torch.Tensor:
        with torch.no_grad():
            return self.logps_fn(self.ref_engine, input_ids, attention_mask, labels, facts)


class Precomputed:
    """Reference log-probs computed once before training (`dpo_reference.py`), one float per cache row."""

    def __init__(self, values: np.ndarray):
        self.values = values

    def __call__(self, engine, input_ids, attention_mask, labels, rows, facts=None) -> torch.Tensor:
        return host_to_device(np.asarray(self.values[np.asarray(rows)], dtype=np.float32), input_ids.device)


# ------------------------------------------------------------------------------------------ objective

@dataclass(frozen=True)
class DPOLoss:
    """A micro-batch's summed pair losses and metric sums (accumulate's loss_fn contract)."""
    logps_fn: Callable   # (engine, input_ids, attention_mask, labels, facts) -> [2B] summed target log-probs
    reference: Callable  # (engine, input_ids, attention_mask, labels, rows, facts) -> [2B], no graph
    beta: float
    losses: tuple  # ((loss type, weight), ...): dpo.loss_type, dpo.loss_weights, dpo.rpo_alpha
    label_smoothing: float
    discopop_tau: float = 0.05

    def __call__(self, engine, input_ids, attention_mask, labels, rows, facts=None, grad_scale=1.0,
                 nll_scale: float | None = None):
        """`facts`: the batch's data.HostFacts (read back from the labels where None). `nll_scale`: the
        global batch's pairs over its chosen completion tokens (for `sft`; None: this batch's)."""
        facts = facts_of(labels) if facts is None else facts  # once for the policy's forward and the reference's
        reference = self.reference(engine, input_ids, attention_mask, labels, rows, facts)
        counts = facts.sequence_targets()
        stats = torch.empty((sum(counts), 2), dtype=torch.float32, device=input_ids.device)
        policy = self.logps_fn(engine, input_ids, attention_mask, labels, facts, stats=stats)
        n_tokens = host_to_device(np.asarray(counts, dtype=np.int64), input_ids.device)
        if nll_scale is None:
            nll_scale = chosen_nll_scale(facts) if self.needs_nll else 0.0
        loss_sum = dpo_loss_sum(policy, reference, n_tokens, self.beta, self.losses, self.label_smoothing,
                                self.discopop_tau, nll_scale)
        return loss_sum, torch.cat([dpo_metric_sums(policy, reference, self.beta), token_metric_sums(stats, counts)])

    def token_counts(self, data, units: np.ndarray) -> dict:
        """What TOKEN_METRICS' sums are divided by: the completion tokens of `units`' chosen (rejected) rows."""
        chosen, rejected = (int(data.row_targets[units[:, k]].sum()) for k in (0, 1))
        return {"logits/chosen": chosen, "logits/rejected": rejected, "mean_token_accuracy": chosen}

    pack_length: int | None = None  # data.packing isolated: the micro-batch's sequences packed (collate_pairs)

    def collate(self, data, units: np.ndarray, pad_id: int):
        return collate_pairs(data, units, pad_id, self.pack_length)

    @property
    def needs_nll(self) -> bool:
        return any(loss_type == "sft" for loss_type, _ in self.losses)

    def nll_tokens(self, data, units: np.ndarray) -> int | None:
        """sft's token mean is over the chosen completions."""
        return chosen_completion_tokens(data, units) if self.needs_nll else None


def token_metric_sums(stats: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """TOKEN_METRICS summed over a batch's tokens (rows: chosen, then rejected) from the head's per-token stats."""
    with torch.no_grad():
        per_row = torch.stack([part.sum(0) for part in torch.split(stats, counts)])  # [2B, 2], a fixed order
        chosen, rejected = per_row.chunk(2)
        return torch.stack([chosen[:, 0].sum(), rejected[:, 0].sum(), chosen[:, 1].sum()]).double()


def chosen_nll_scale(facts) -> float:
    """A batch's pairs over its chosen rows' targets (the rows are [chosen..., rejected...])."""
    targets = facts.sequence_targets()
    pairs = len(targets) // 2
    return pairs / max(sum(targets[:pairs]), 1)


def build(parts: ObjectiveParts) -> PairObjective:
    """The DPO objective of a run: its loss with the reference that fits (adapters off, a frozen copy of the
    base, or precomputed while the engine holds the base's weights, i.e. before a checkpoint is loaded)."""
    cfg, d = parts.cfg, parts.cfg.dpo
    logps_fn = sequence_logps_fn(lora.hf_model(parts.model), parts)

    def objective(reference, eval_reference=None) -> PairObjective:
        def loss(ref):
            return DPOLoss(logps_fn, ref, d.beta, d.weighted_losses, d.label_smoothing, d.discopop_tau,
                           pack_length(cfg))
        return PairObjective(METRICS + TOKEN_METRICS, parts.data, parts.layout, loss(reference), parts.pad_id,
                             parts.group.dp_rank, loss(eval_reference) if eval_reference is not None else None,
                             reports=parts.group.rank == 0)

    if cfg.model.lora is not None:
        return objective(AdaptersOff(logps_fn))
    if d.reference == "model":
        return objective(frozen_base(parts))
    def stored(data) -> Precomputed:
        return Precomputed(stored_reference(parts, logps_fn, data))
    own_eval = parts.eval_data is not None and parts.eval_data is not parts.data  # eval.path/sources: its own
    eval_reference = stored(parts.eval_data) if own_eval else None
    return objective(stored(parts.data), eval_reference)


def frozen_base(parts) -> FrozenModel:
    """The base model again (built from the same seed, so an inline config draws the same weights), as an
    engine without an optimizer: ZeRO 3 partitions it like the policy, a lower stage keeps it whole on every
    rank (as TRL does). Every RNG is put back: the policy's dropout draws what it would without it."""
    import deepspeed

    cfg = parts.cfg
    config = {k: v for k, v in parts.ds_config.items() if k not in ("optimizer", "scheduler")}
    if config.get("zero_optimization", {}).get("stage") != 3:
        config["zero_optimization"] = {"stage": 0}
    with rng_untouched():
        seed_everything(cfg.train.seed)
        base = build_model(cfg, config)
        base.eval()
        base.requires_grad_(False)
        ref_engine, *_ = deepspeed.initialize(model=base, config=config)
        ref_engine.eval()
    return FrozenModel(ref_engine, sequence_logps_fn(base, parts))
