"""Kahneman-Tversky optimisation (train.objective: kto): TRL 1.16's KTOTrainer on unpaired rows (data.format
unpaired_preference: a prompt, a completion and a label, true where the completion is desirable).

A unit of the epoch order is a row; the global batch counts rows. Per row, with r = the policy's minus the
reference's summed completion log-probs and z the KL estimate of its micro-step:
  kto                desirable: desirable_weight (1 - sigmoid(beta (r - z)))
                     undesirable: undesirable_weight (1 - sigmoid(beta (z - r)))
  apo_zero_unpaired  desirable: desirable_weight (1 - sigmoid(beta r)); undesirable: undesirable_weight
                     sigmoid(beta r)  (no KL estimate: z is 0 and logged as 0, as TRL does)
and the step's loss is their mean over the global batch's rows (TRL's mean over its per-device batch: the
same number where the global batch is one micro-batch).

The KL estimate is TRL's: each row's prompt with the completion of the row before it in its block of
train.micro_batch_size rows of the data (the block's first takes its last: TRL's `add_kl_completion_ids`,
a batched map of per_device_train_batch_size rows over its dataset in order, truncated to data.max_length
like any row), so a row's mismatched partner is fixed and a precomputed reference can store it. z of a
micro-step is the mean over its rows of (policy - reference) log-probs of their KL rows, without a graph,
averaged over the data-parallel ranks and clamped at 0 (TRL's gather, mean, clamp). Every micro-step's z
is known before its backward (the weights only change at the step's end), so the step computes them all
first, in eval mode (no dropout: TRL's disable_dropout default) and with one all-reduce on the device.

With data.packing isolated a micro-batch's rows are packed into rows of at most data.max_length tokens,
and its KL rows apart from them, each sequence attending only to itself (`data.pack_isolated`): the same
per-row log-probs with less padding.

Its reference is DPO's (`dpo.py`): the model with adapters off under LoRA, a frozen copy of the base
(kto.reference: model), or log-probs stored before training, two a row (`dpo_reference.py`). Under sequence
parallelism every log-prob, the KL rows' too, is joined over the group (`sequence.JoinedLogps`), as for the
pair objectives: each rank of it computes the same z and loss, and the group's first rank reports.

Metrics, TRL's names: rewards/chosen and logps/chosen (beta r and the policy's log-probs, means over the
global batch's desirable rows), rewards/rejected and logps/rejected (over its undesirable rows; a metric of
a class the batch lacks is not logged, as TRL), rewards/margins (their difference, where the batch has
both), kl (the mean of the step's micro-steps' z), logits/chosen and logits/rejected (the mean logit over
the vocabulary at each completion token of the desirable, undesirable rows, averaged over those tokens;
the fused head's per-token stats, as DPO's). In evaluation z is each eval batch's, over the ranks'
batches. Not logged: entropy, num_tokens.
A global batch of one label only is trained as TRL trains it (the loss of the rows it has).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

from ds_finetune import lora
from ds_finetune.data import HostFacts, MixedData, TokenizedData, collate_sequences, pack_isolated
from ds_finetune.device_batch import to_device
from ds_finetune.dist import frozen_eval, mean_over_ranks
from ds_finetune.objectives import ObjectiveParts, StepResult, accumulate
from ds_finetune.objectives.dpo import AdaptersOff, Precomputed, frozen_base
from ds_finetune.objectives.dpo_reference import Walk, stored_reference
from ds_finetune.objectives.pairs import pack_length
from ds_finetune.sampler import BatchLayout
from ds_finetune.sequence import sequence_logps_fn

METRICS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins", "kl",
           "logits/chosen", "logits/rejected")


def kl_partners(rows: np.ndarray, num_rows, block: int, first=0) -> np.ndarray:
    """The row whose completion each row's KL row takes: the one before it in its block of `block` rows of
    the data (the block's first takes the block's last; the data's last block may be shorter). `first` and
    `num_rows` (each row's, in a mixture: blocks run within a source) place the data's rows."""
    rows = np.asarray(rows, dtype=np.int64) - first
    start = rows // block * block
    size = np.minimum(block, num_rows - start)
    return first + start + (rows - start - 1) % size


def source_spans(data, rows: np.ndarray):
    """(first row, rows) of each row's data: its source's in a mixture, else the whole data's."""
    if not isinstance(data, MixedData):
        return 0, data.num_rows
    s = data.source_of(rows)
    return data.bases[s], data.bases[s + 1] - data.bases[s]


class KTOBatch(NamedTuple):
    """A micro-batch of B rows and their B KL rows (each row's prompt, its partner's completion); `rows`:
    each row's cache row (the precomputed reference reads it); `desirable`: 1.0 where the row's label is true."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    rows: np.ndarray
    facts: HostFacts
    kl_input_ids: torch.Tensor
    kl_attention_mask: torch.Tensor
    kl_labels: torch.Tensor
    kl_facts: HostFacts
    desirable: torch.Tensor


def kl_row(data: TokenizedData, row: int, partner: int, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Row's prompt + partner's completion, cut to max_length (a row's targets are its completion, after its
    prompt: the prompt is what precedes its first target)."""
    ids, mask = data.row(row)
    prompt = ids[:int(np.argmax(mask))]
    p_ids, p_mask = data.row(partner)
    completion = p_ids[p_mask]
    seq = np.concatenate([prompt, completion])[:max_length]
    return seq, (np.arange(len(seq)) >= len(prompt))


def collate_kto(data: TokenizedData, rows: np.ndarray, pad_id: int, block: int, max_length: int,
                pack_length: int | None = None) -> KTOBatch:
    """The rows and their KL rows, each set right-padded, or (`pack_length`: data.packing isolated) packed
    into rows of at most that many tokens, each sequence attending only to itself."""
    rows = np.asarray(rows, dtype=np.int64)
    first, num_rows = source_spans(data, rows)
    partners = kl_partners(rows, num_rows, block, first)
    main = _batch([data.row(int(r)) for r in rows], pad_id, pack_length)
    kl = _batch([kl_row(data, int(r), int(p), max_length) for r, p in zip(rows, partners)], pad_id, pack_length)
    desirable = torch.from_numpy(np.asarray(data.row_labels[rows], dtype=np.float32))
    return KTOBatch(main.input_ids, main.attention_mask, main.labels, rows, main.facts, kl.input_ids,
                    kl.attention_mask, kl.labels, kl.facts, desirable)


def _batch(seqs: list[tuple[np.ndarray, np.ndarray]], pad_id: int, pack_length: int | None):
    if pack_length is None:
        return collate_sequences([[seq] for seq in seqs], pad_id)
    return pack_isolated(seqs, pad_id, pack_length)


def kto_losses(ratio: torch.Tensor, desirable: torch.Tensor, kl, loss_type: str, beta: float,
               desirable_weight: float, undesirable_weight: float) -> torch.Tensor:
    """Each row's weighted loss from its log-ratio (policy - reference), its label (1.0 desirable) and z."""
    if loss_type == "kto":
        good, bad = 1 - torch.sigmoid(beta * (ratio - kl)), 1 - torch.sigmoid(beta * (kl - ratio))
    elif loss_type == "apo_zero_unpaired":
        good, bad = 1 - torch.sigmoid(beta * ratio), torch.sigmoid(beta * ratio)
    else:
        raise ValueError(f"unknown kto.loss_type {loss_type!r}")
    return desirable * desirable_weight * good + (1 - desirable) * undesirable_weight * bad


@dataclass(frozen=True)
class KTOLoss:
    """A micro-batch's summed KTO loss and metric sums (accumulate's loss_fn contract)."""
    logps_fn: Callable     # (engine, input_ids, attention_mask, labels, facts) -> [B] summed target log-probs
    reference: Callable    # (engine, input_ids, attention_mask, labels, rows, facts) -> [B], no graph
    kl_reference: Callable  # the same for the KL rows
    loss_type: str
    beta: float
    desirable_weight: float
    undesirable_weight: float

    @property
    def uses_kl(self) -> bool:
        return self.loss_type == "kto"

    def kl_gap(self, engine, batch: KTOBatch) -> torch.Tensor:
        """The mean (policy - reference) log-probs of the batch's KL rows, no graph (the caller puts the model
        in eval mode)."""
        inputs = to_device([batch.kl_input_ids, batch.kl_attention_mask, batch.kl_labels], engine.device)
        with torch.no_grad():
            policy = self.logps_fn(engine, *inputs, batch.kl_facts)
            reference = self.kl_reference(engine, *inputs, batch.rows, batch.kl_facts)
        return (policy - reference.to(policy.dtype)).mean()

    def __call__(self, engine, input_ids, attention_mask, labels, rows, facts, kl_input_ids, kl_attention_mask,
                 kl_labels, kl_facts, desirable, grad_scale=1.0, kl=0.0, weights=(0.0, 0.0, 0.0, 0.0)):
        """`kl`: the micro-step's z; `weights`: (1 / desirable rows, 1 / undesirable rows of the global batch (0
        where none), the weight of this micro-step's z in the step's kl metric, 1 where the margin is logged).
        Returns (summed loss, the METRICS' sums, each already divided by what the step divides it by but the
        rows: see `KTOObjective.step`)."""
        reference = self.reference(engine, input_ids, attention_mask, labels, rows, facts)
        counts = facts.sequence_targets()
        stats = torch.empty((sum(counts), 2), dtype=torch.float32, device=input_ids.device)
        policy = self.logps_fn(engine, input_ids, attention_mask, labels, facts, stats=stats)
        ratio = policy - reference.to(policy.dtype)
        losses = kto_losses(ratio, desirable, kl, self.loss_type, self.beta, self.desirable_weight,
                            self.undesirable_weight)
        with torch.no_grad():
            rewards, undesirable = self.beta * ratio.detach(), 1 - desirable
            inv_good, inv_bad, kl_weight, margin = weights
            good_rewards, bad_rewards = (rewards * desirable).sum(), (rewards * undesirable).sum()
            logits = torch.stack([part.sum(0)[0] for part in torch.split(stats, counts)])  # per row, a fixed order
            sums = torch.stack([good_rewards, bad_rewards, (policy.detach() * desirable).sum(),
                                (policy.detach() * undesirable).sum(),
                                margin * (good_rewards * inv_good - bad_rewards * inv_bad),
                                torch.as_tensor(kl, dtype=rewards.dtype, device=rewards.device) * kl_weight,
                                (logits * desirable).sum(), (logits * undesirable).sum()]).double()
        return losses.sum(), sums


@dataclass(frozen=True)
class KTOObjective:
    """KTO on rows: the shared accumulate, each micro-step given its KL estimate."""
    data: TokenizedData
    layout: BatchLayout
    loss_fn: KTOLoss
    pad_id: int
    share: int       # which share of the global batch this rank takes (its data-parallel rank)
    ranks: int       # the data-parallel size (the KL estimate's mean runs over it)
    max_length: int
    block: int       # train.micro_batch_size: the KL partners' blocks
    eval_loss_fn: KTOLoss | None = None  # with the eval data's own reference, where it has its own (eval.path)
    pack_length: int | None = None  # data.packing isolated: the rows, and apart their KL rows, packed
    # False on all but the first rank of a sequence-parallel group, as for the pair objectives (pairs.py): each
    # rank of it computes the same loss, KL estimates and metrics from the group's joined log-probs
    reports: bool = True
    metric_names = METRICS
    perplexity = False

    def collate(self, data, rows) -> KTOBatch:
        return collate_kto(data, rows, self.pad_id, self.block, self.max_length, self.pack_length)

    def kl_estimates(self, engine, loss_fn: KTOLoss, batches: list[KTOBatch], counted: bool = True) -> torch.Tensor:
        """Each micro-batch's z: the ranks' mean of its KL gap, clamped at 0 (zeros without a KL term)."""
        if not loss_fn.uses_kl:
            return torch.zeros(len(batches), device=engine.device)
        with frozen_eval(engine.module):
            gaps = torch.stack([loss_fn.kl_gap(engine, b) for b in batches]).float()
        weight = torch.full_like(gaps, 1.0 if counted else 0.0)
        return mean_over_ranks(gaps, weight).clamp(min=0)

    def step(self, engine, units: np.ndarray, step: int, before_update=None) -> StepResult:
        layout = self.layout
        rows = [units[layout.micro_slice(0, m, self.share)][:, 0] for m in range(layout.grad_accum)]
        batches = [self.collate(self.data, r) for r in rows]
        z = self.kl_estimates(engine, self.loss_fn, batches)
        good, bad, good_tokens, bad_tokens = label_counts(self.data, units)
        both = 1.0 if good and bad else 0.0
        weights = (1 / good if good else 0.0, 1 / bad if bad else 0.0, 1 / (layout.grad_accum * self.ranks), both)
        per_batch = [{"kl": z[m], "weights": weights} for m in range(len(batches))]
        loss_sum, sums = accumulate(engine, self.loss_fn, batches, layout.global_batch, step, before_update,
                                    per_batch=per_batch)
        if not self.reports:
            loss_sum, sums = torch.zeros_like(loss_sum), torch.zeros_like(sums)
        counts = (good, bad, good, bad, int(both), 1, good_tokens, bad_tokens)
        return StepResult(loss_sum, layout.global_batch,
                          sums={name: (sums[i], counts[i]) for i, name in enumerate(METRICS)})

    def eval_batch(self, engine, data: TokenizedData, units: np.ndarray, counted: bool
                   ) -> tuple[torch.Tensor, int, dict]:
        loss_fn = self.eval_loss_fn if data is not self.data and self.eval_loss_fn is not None else self.loss_fn
        batch = self.collate(data, units[:, 0])
        z = self.kl_estimates(engine, loss_fn, [batch], counted)[0]
        counted = counted and self.reports
        good, bad, good_tokens, bad_tokens = label_counts(data, units)
        both = 1.0 if good and bad and counted else 0.0
        weights = (1 / good if good else 0.0, 1 / bad if bad else 0.0, 1.0 / self.ranks, both)
        loss_sum, sums = loss_fn(engine, *to_device(batch, engine.device), kl=z, weights=weights)
        w = 1.0 if counted else 0.0
        counts = (good * w, bad * w, good * w, bad * w, both, w / self.ranks, good_tokens * w,
                  bad_tokens * w)  # eval_<name>: sum over count
        return loss_sum.double() * w, len(units) if counted else 0, {
            name: (sums[i] * w, counts[i]) for i, name in enumerate(METRICS)}


def label_counts(data: TokenizedData, units: np.ndarray) -> tuple[int, int, int, int]:
    """(desirable rows, undesirable rows, their completion tokens) of `units` (host arrays)."""
    rows = units[:, 0]
    good = np.asarray(data.row_labels[rows], dtype=bool)
    targets = np.asarray(data.row_targets[rows], dtype=np.int64)
    return int(good.sum()), int((~good).sum()), int(targets[good].sum()), int(targets[~good].sum())


def row_walk(data: TokenizedData, collate) -> Walk:
    """KTO's precomputed reference: rows in blocks, two values a row (its own, its KL row's)."""
    def values(engine, logps_fn, rows):
        b = collate(data, rows)
        own = logps_fn(engine, *to_device([b.input_ids, b.attention_mask, b.labels], engine.device), b.facts)
        kl = logps_fn(engine, *to_device([b.kl_input_ids, b.kl_attention_mask, b.kl_labels], engine.device),
                      b.kl_facts)
        return b.rows, torch.stack([own, kl], 1)
    return Walk(data.num_rows, 2, values, {"objective": "kto"})


def build(parts: ObjectiveParts) -> KTOObjective:
    """The KTO objective of a run, with the reference that fits (as DPO's `build`)."""
    cfg, k = parts.cfg, parts.cfg.kto
    logps_fn = sequence_logps_fn(lora.hf_model(parts.model), parts)  # joined over a sequence-parallel group

    def loss(reference, kl_reference) -> KTOLoss:
        return KTOLoss(logps_fn, reference, kl_reference, k.loss_type, k.beta, k.desirable_weight,
                       k.undesirable_weight)

    def objective(train_loss: KTOLoss, eval_loss: KTOLoss | None = None) -> KTOObjective:
        return KTOObjective(parts.data, parts.layout, train_loss, parts.pad_id, parts.group.dp_rank,
                            parts.group.dp_size, cfg.data.max_length, cfg.train.micro_batch_size, eval_loss,
                            pack_length(cfg), reports=parts.group.rank == 0)

    if cfg.model.lora is not None:
        off = AdaptersOff(logps_fn)
        return objective(loss(off, off))
    if k.reference == "model":
        frozen = frozen_base(parts)
        return objective(loss(frozen, frozen))
    shell = objective(None)  # its collate, for the pass

    def stored(data) -> KTOLoss:
        values = stored_reference(parts, logps_fn, data, lambda source: row_walk(source, shell.collate))
        return loss(Precomputed(values[:, 0]), Precomputed(values[:, 1]))
    own_eval = parts.eval_data is not None and parts.eval_data is not parts.data  # eval.path/sources: its own
    return objective(stored(parts.data), stored(parts.eval_data) if own_eval else None)
