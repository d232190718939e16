"""Contrastive preference optimisation and SimPO (train.objective: cpo | simpo): TRL's CPOTrainer
(`trl.experimental.cpo`), where SimPO is its loss_type simpo. No reference model.

Per pair, with c and r the policy's completion log-probs (summed; the per-token mean for ipo and simpo, as
TRL's `average_log_prob`), d = c - r and eps the label smoothing:
  sigmoid  -logsigmoid(beta d) (1 - eps) - logsigmoid(-beta d) eps
  hinge    relu(1 - beta d)
  ipo      (d - 1 / (2 beta))^2
  simpo    sigmoid's form on d - gamma / beta (gamma: the target margin)
plus alpha x the chosen completions' mean token NLL (CPO's behaviour-cloning term; SimPO's alpha is 0 by
default, CPO-SimPO above it), its token mean over the global batch's chosen completions (`pairs.py`).
`simpo:` is CPO's simpo with SimPO's own defaults; `cpo:` is CPOTrainer's settings (cpo.alpha: cpo_alpha).

Metrics, TRL's names: rewards/chosen = beta c (rejected alike), rewards/accuracies, rewards/margins,
logps/chosen and logps/rejected (c and r), nll_loss where alpha > 0 (TRL logs 0 when it computes none).
Not logits/*: as for ORPO (orpo.py), TRL's are means over every position of its padded batch.
Not done: TRL's AlphaPO reward shaping (CPOConfig.alpha).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ds_finetune import lora
from ds_finetune.data import TokenizedData, collate_pairs
from ds_finetune.device_batch import facts_of, host_to_device
from ds_finetune.objectives import ObjectiveParts
from ds_finetune.objectives.pairs import PairObjective, chosen_completion_tokens, pack_length
from ds_finetune.sequence import sequence_logps_fn

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def cpo_pair_losses(chosen, rejected, loss_type: str, beta: float, eps: float, gamma: float) -> torch.Tensor:
    d = chosen - rejected
    if loss_type == "simpo":
        d = d - gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        return -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown CPO loss_type {loss_type!r}")


@dataclass(frozen=True)
class CPOLoss:
    """A micro-batch's summed CPO / SimPO loss and metric sums (accumulate's loss_fn contract)."""
    logps_fn: Callable  # (engine, input_ids, attention_mask, labels, facts) -> [2B] summed target log-probs
    loss_type: str
    beta: float
    alpha: float            # the NLL's weight
    label_smoothing: float
    gamma: float = 0.0      # simpo's target margin
    pack_length: int | None = None  # data.packing isolated: the micro-batch's sequences packed (collate_pairs)

    def collate(self, data, units: np.ndarray, pad_id: int):
        return collate_pairs(data, units, pad_id, self.pack_length)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return (*METRICS, "nll_loss") if self.alpha else METRICS

    def nll_tokens(self, data: TokenizedData, units: np.ndarray) -> int | None:
        return chosen_completion_tokens(data, units) if self.alpha else None

    def __call__(self, engine, input_ids, attention_mask, labels, rows, facts=None, grad_scale=1.0,
                 nll_scale: float | None = None):
        facts = facts_of(labels) if facts is None else facts
        counts = facts.sequence_targets()
        pairs = len(counts) // 2
        if nll_scale is None:  # an eval batch: its own chosen tokens
            nll_scale = pairs / max(sum(counts[:pairs]), 1)
        sums = self.logps_fn(engine, input_ids, attention_mask, labels, facts)
        if self.loss_type in ("ipo", "simpo"):  # per-token means
            logps = sums / host_to_device(np.asarray(counts, dtype=np.int64), input_ids.device)
        else:
            logps = sums
        chosen, rejected = logps.chunk(2)
        loss_sum = cpo_pair_losses(chosen, rejected, self.loss_type, self.beta, self.label_smoothing,
                                   self.gamma).sum()
        nll_sum = -sums[:pairs].sum() * nll_scale
        if self.alpha:
            loss_sum = loss_sum + self.alpha * nll_sum
        with torch.no_grad():
            r_chosen, r_rejected = self.beta * chosen, self.beta * rejected
            metrics = [r_chosen.sum(), r_rejected.sum(), (r_chosen > r_rejected).float().sum(),
                       (r_chosen - r_rejected).sum(), chosen.sum(), rejected.sum()]
            metric_sums = torch.stack(metrics + ([nll_sum] if self.alpha else [])).double()
        return loss_sum, metric_sums


def build(parts: ObjectiveParts) -> PairObjective:
    cfg = parts.cfg
    logps_fn = sequence_logps_fn(lora.hf_model(parts.model), parts)
    if cfg.train.objective == "simpo":
        s = cfg.simpo
        loss = CPOLoss(logps_fn, "simpo", s.beta, s.alpha, s.label_smoothing, s.gamma, pack_length(cfg))
    else:
        c = cfg.cpo
        loss = CPOLoss(logps_fn, c.loss_type, c.beta, c.alpha, c.label_smoothing, c.simpo_gamma, pack_length(cfg))
    return PairObjective(loss.metric_names, parts.data, parts.layout, loss, parts.pad_id, parts.group.dp_rank,
                         reports=parts.group.rank == 0)
