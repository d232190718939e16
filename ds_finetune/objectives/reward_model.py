"""A Bradley-Terry reward model (train.objective: reward): TRL 1.16's RewardTrainer on preference pairs.

The model is a sequence classifier with one label (`model.auto_class`: transformers'
AutoModelForSequenceClassification, its `score` head drawn by transformers' init from the seed), which
scores a sequence at its last token that is not padding (transformers reads `pad_token_id` from the
model's config: the tokenizer's, set here, and saved with every checkpoint). A pair's two rows are the
prompt with each completion, whole (the preference format's rows; their target masks are not read).
Packed (data.packing isolated: the sequences of a micro-batch in rows of at most max_length, each attending
only to itself) and under sequence parallelism (the ranks of a group score their slices and add up the
score of the one holding each row's last token, `sequence.JoinedScores`), the scores of every position are
taken from the classifier's head (`PositionScores`) and read at each sequence's last token.

Per pair, with c and r the rewards of the chosen and rejected sequences and m the pair's margin
(data.margin_field; 0 without one):
  loss = -logsigmoid(c - r - m)  [+ reward.center_rewards_coefficient x (c + r)^2]
and the step's loss is its mean over the global batch's pairs (TRL's mean over its per-device batch).

Metrics, TRL's names: accuracy (the share of pairs whose chosen reward is higher), margin (the mean of
c - r), mean_reward (the mean reward of every sequence). Not min_reward and max_reward (a sum over ranks
cannot make them) nor num_tokens.

An export is a folder AutoModelForSequenceClassification.from_pretrained loads (its config names the
sequence-classification architecture, one label and the pad token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ds_finetune import lora
from ds_finetune.data import HostFacts, TokenizedData, collate_pairs
from ds_finetune.device_batch import host_to_device
from ds_finetune.errors import UserError
from ds_finetune.loss import model_inputs
from ds_finetune.objectives import ObjectiveParts
from ds_finetune.objectives.pairs import PairObjective, pack_length
from ds_finetune.sequence import JoinedScores

METRICS = ("accuracy", "margin", "mean_reward")


class RewardBatch(NamedTuple):
    """A micro-batch of B pairs as 2B sequences, chosen first; `margin`: each pair's (None without them).
    Packed: `ends`, the row-major index where each sequence is scored (`scored_positions`), and `facts` (the
    packs' segments); else None."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    margin: torch.Tensor | None
    ends: np.ndarray | None = None
    facts: HostFacts | None = None


def collate_rewards(data: TokenizedData, units: np.ndarray, pad_id: int, pack_length: int | None = None
                    ) -> RewardBatch:
    batch = collate_pairs(data, units, pad_id, pack_length)
    margin = (None if data.row_margins is None else
              torch.from_numpy(np.asarray(data.row_margins[units[:, 0]], dtype=np.float32)))
    if pack_length is None:
        return RewardBatch(batch.input_ids, batch.attention_mask, margin)
    ends = scored_positions(batch.input_ids.numpy(), batch.facts.segments, pad_id)
    return RewardBatch(batch.input_ids, None, margin, ends, batch.facts)


def scored_positions(input_ids: np.ndarray, segments, pad_id: int) -> np.ndarray:
    """The row-major index in the packed rows where each sequence is scored: its last token that is not
    `pad_id`, transformers' rule for a padded row (where eos is the pad token, the token before it). A row's
    segments are its sequences, then its padding (all `pad_id`), which holds none."""
    ends, width = [], input_ids.shape[1]
    for j, row in enumerate(segments):
        start = 0
        for n in row:
            real = np.flatnonzero(input_ids[j, start:start + n] != pad_id)
            if len(real):
                ends.append(j * width + start + int(real[-1]))
            start += n
    return np.asarray(ends, dtype=np.int64)


def reward_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None,
                  center_coefficient: float | None) -> torch.Tensor:
    """Each pair's loss (TRL's RewardTrainer.compute_loss, per pair)."""
    difference = chosen - rejected if margin is None else chosen - rejected - margin.to(chosen.dtype)
    losses = -F.logsigmoid(difference)
    if center_coefficient is not None:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


def classifier_scores(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's reward: transformers' classifier scores it at its last token that is not padding."""
    return engine(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0]


class PositionScores:
    """(engine, **model inputs) -> the classifier's score of every position, [rows, width] in fp32: its head's
    output, kept by a forward hook (the head runs inside the engine's forward, where ZeRO-3 gathers it)."""

    def __init__(self, model):
        self.kept = None
        score_head(model).register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.kept = output

    def __call__(self, engine, **inputs) -> torch.Tensor:
        try:
            engine(**inputs)  # its own pooling (one score a row) is not what a pack or a slice needs
            return self.kept[..., 0].float()
        finally:
            self.kept = None


@dataclass(frozen=True)
class RewardLoss:
    """A micro-batch's summed pair losses and metric sums (accumulate's loss_fn contract); `scores`:
    (engine, input_ids, attention_mask) -> each row's reward; `positions`: a PositionScores where batches are
    packed (`pack_length`)."""
    center_coefficient: float | None
    scores: object = classifier_scores
    positions: PositionScores | None = None
    pack_length: int | None = None

    def collate(self, data: TokenizedData, units: np.ndarray, pad_id: int) -> RewardBatch:
        return collate_rewards(data, units, pad_id, self.pack_length)

    def nll_tokens(self, data: TokenizedData, units: np.ndarray) -> None:
        return None

    def __call__(self, engine, input_ids, attention_mask, margin, ends=None, facts=None, grad_scale=1.0,
                 nll_scale=None):
        if ends is None:
            rewards = self.scores(engine, input_ids, attention_mask).float()
        else:
            scores = self.positions(engine, **model_inputs(input_ids, None, facts=facts))
            rewards = scores.reshape(-1)[host_to_device(ends, scores.device)]
        chosen, rejected = rewards.chunk(2)
        loss_sum = reward_losses(chosen, rejected, margin, self.center_coefficient).sum()
        with torch.no_grad():
            sums = torch.stack([(chosen > rejected).float().sum(), (chosen - rejected).sum(),
                                (chosen + rejected).sum() / 2]).double()
        return loss_sum, sums


def build(parts: ObjectiveParts) -> PairObjective:
    model = lora.hf_model(parts.model)
    # Transformers' classifier scores the last token that is not padding: the padding is the tokenizer's.
    model.config.get_text_config().pad_token_id = parts.pad_id
    # What save_pretrained writes: the checkpoint's config (and an export's) names the classifier, not the
    # causal LM it was loaded from (or nothing, for an inline model.config).
    model.config.architectures = [type(model).__name__]
    pack = pack_length(parts.cfg)
    positions = PositionScores(model) if pack or parts.group.size > 1 else None
    scores = (JoinedScores(positions, parts.group, parts.ulysses, parts.pad_id) if parts.group.size > 1
              else classifier_scores)
    loss = RewardLoss(parts.cfg.reward.center_rewards_coefficient, scores, positions, pack)
    return PairObjective(METRICS, parts.data, parts.layout, loss, parts.pad_id, parts.group.dp_rank,
                         reports=parts.group.rank == 0)


def score_head(model) -> torch.nn.Module:
    """The classifier's head (`score` in transformers' decoder classifiers), or a one-line UserError."""
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise UserError(f"config error: data.packing or train.sequence_parallel > 1 with train.objective reward "
                        f"needs the classifier's head as `score`, which {type(model).__name__} lacks; set "
                        f"data.packing=false and train.sequence_parallel=1")
    return head
