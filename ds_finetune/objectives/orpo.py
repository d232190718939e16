"""Odds-ratio preference optimisation (train.objective: orpo): TRL's ORPOTrainer (`trl.experimental.orpo`),
without a reference model.

Per pair, with c and r the per-token mean log-probs of the chosen and rejected completions (TRL's
`average_log_prob=True`):
  log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r))
  loss     = -beta logsigmoid(log_odds), plus the chosen sequences' mean token NLL
and the NLL, as TRL computes it, runs over the chosen sequence's prompt AND completion (every attended
token after the first). So the chosen rows' head runs on their prompt tokens too (their log-probs are
summed separately over the completion); the rejected rows' only on the completion. The NLL's token mean is
over the global batch's chosen tokens (`pairs.py`).

Metrics, TRL's names: rewards/chosen = beta c (rejected alike), rewards/accuracies, rewards/margins,
logps/chosen and logps/rejected (c and r), nll_loss, log_odds_ratio (mean logsigmoid(log_odds)),
log_odds_chosen (mean log_odds). Not logits/chosen and logits/rejected: TRL's are the mean over the whole
vocabulary of every position of its padded batch, padding and prompt included, which the fused head (it
runs on target positions only) never computes, and which changes with the batch's padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ds_finetune import lora
from ds_finetune.data import IGNORE_INDEX, HostFacts, TokenizedData, collate_pairs
from ds_finetune.device_batch import host_to_device
from ds_finetune.fused_head import segment_sums
from ds_finetune.objectives import ObjectiveParts
from ds_finetune.objectives.pairs import PairObjective, pack_length
from ds_finetune.sequence import token_logps_fn

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen")


class ChosenPromptBatch(NamedTuple):
    """A micro-batch of B pairs (2B rows, chosen first) whose chosen rows' labels are every attended token
    (prompt included: the NLL's targets) and whose rejected rows' are the completion. `completion`: one bool
    per target of `facts` (row-major), whether it is a completion token; `completion_counts`: per row."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    completion: torch.Tensor
    facts: HostFacts
    completion_counts: np.ndarray


def collate_with_chosen_prompts(data: TokenizedData, units: np.ndarray, pad_id: int,
                                pack_length: int | None = None) -> ChosenPromptBatch:
    """ORPO's micro-batch of `units`; packed (`pack_length`, as `collate_pairs` packs) where given."""
    if pack_length is None:
        batch = collate_pairs(data, units, pad_id)
        return with_chosen_prompts(batch.input_ids, batch.attention_mask, batch.labels)
    completions = collate_pairs(data, units, pad_id, pack_length)  # the completion targets
    whole = collate_pairs(_WholeChosen(data, units[:, 0]), units, pad_id, pack_length)  # the NLL's targets
    completion = completions.facts.targets[whole.facts.targets]
    return ChosenPromptBatch(whole.input_ids, None, whole.labels, torch.from_numpy(completion), whole.facts,
                             data.row_targets[whole.rows])


class _WholeChosen:
    """The rows of `data` with each chosen row's every token but its first a target (the NLL's targets: prompt
    and completion); the first never is, so that in a pack no target crosses into the sequence before."""

    def __init__(self, data: TokenizedData, chosen: np.ndarray):
        self.data, self.chosen, self.lengths = data, {int(r) for r in chosen}, data.lengths

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self.data.row(i)
        return (ids, np.arange(len(ids)) > 0) if int(i) in self.chosen else (ids, mask)


def with_chosen_prompts(input_ids, attention_mask, labels) -> ChosenPromptBatch:
    """The host tensors of 2B rows (chosen first, completion labels) as ORPO's micro-batch."""
    completion_targets = HostFacts.of_labels(labels.numpy()).targets
    pairs = input_ids.size(0) // 2
    labels = labels.clone()
    labels[:pairs] = input_ids[:pairs].masked_fill(attention_mask[:pairs] == 0, IGNORE_INDEX)
    facts = HostFacts.of_labels(labels.numpy())
    completion = completion_targets[facts.targets]  # a completion target is an attended one
    return ChosenPromptBatch(input_ids, attention_mask, labels, torch.from_numpy(completion), facts,
                             completion_targets.sum(1))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, TRL's branches (at -ln 2, against cancellation)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_terms(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_odds, logsigmoid(log_odds)) per pair from the mean log-probs."""
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return log_odds, F.logsigmoid(log_odds)


@dataclass(frozen=True)
class ORPOLoss:
    """A micro-batch's summed ORPO loss and metric sums (accumulate's loss_fn contract)."""
    token_logps_fn: Callable  # (engine, input_ids, attention_mask, labels, facts) -> log p of each target
    beta: float
    pack_length: int | None = None  # data.packing isolated: the micro-batch's sequences packed

    def collate(self, data, units: np.ndarray, pad_id: int) -> ChosenPromptBatch:
        return collate_with_chosen_prompts(data, units, pad_id, self.pack_length)

    def nll_tokens(self, data: TokenizedData, units: np.ndarray) -> int:
        """The chosen rows' attended tokens after the first (the NLL's targets)."""
        return int((data.lengths[units[:, 0]] - 1).sum())

    def __call__(self, engine, input_ids, attention_mask, labels, completion, facts, completion_counts,
                 grad_scale=1.0, nll_scale: float | None = None):
        counts = facts.sequence_targets()
        pairs = len(counts) // 2
        if nll_scale is None:  # an eval batch: its own chosen tokens
            nll_scale = pairs / max(sum(counts[:pairs]), 1)
        token_logps = self.token_logps_fn(engine, input_ids, attention_mask, labels, facts)
        whole = segment_sums(token_logps, counts)
        completion_sums = segment_sums(token_logps * completion, counts)
        means = completion_sums / host_to_device(np.maximum(completion_counts, 1).astype(np.float32), input_ids.device)
        chosen, rejected = means.chunk(2)
        log_odds, ratio = odds_ratio_terms(chosen, rejected)
        nll_sum = -whole[:pairs].sum() * nll_scale
        loss_sum = nll_sum - self.beta * ratio.sum()
        with torch.no_grad():
            r_chosen, r_rejected = self.beta * chosen, self.beta * rejected
            sums = torch.stack([r_chosen.sum(), r_rejected.sum(), (r_chosen > r_rejected).float().sum(),
                                (r_chosen - r_rejected).sum(), chosen.sum(), rejected.sum(), nll_sum,
                                ratio.sum(), log_odds.sum()]).double()
        return loss_sum, sums


def build(parts: ObjectiveParts) -> PairObjective:
    cfg = parts.cfg
    token_logps = token_logps_fn(lora.hf_model(parts.model), parts)
    return PairObjective(METRICS, parts.data, parts.layout, ORPOLoss(token_logps, cfg.orpo.beta, pack_length(cfg)),
                         parts.pad_id, parts.group.dp_rank, reports=parts.group.rank == 0)
