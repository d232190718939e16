"""A Bradley-Terry reward model (train.objective: reward): TRL 1.16's RewardTrainer on preference pairs.

The model is a sequence classifier with one label (`model.auto_class`: transformers'
AutoModelForSequenceClassification, its `score` head drawn by transformers' init from the seed), which
scores a sequence at its last token that is not padding (transformers reads `pad_token_id` from the
model's config: the tokenizer's, set here, and saved with every checkpoint). A pair's two rows are the
prompt with each completion, whole (the preference format's rows; their target masks are not read).

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
from ds_finetune.data import TokenizedData, collate_pairs
from ds_finetune.objectives import ObjectiveParts
from ds_finetune.objectives.pairs import PairObjective

METRICS = ("accuracy", "margin", "mean_reward")


class RewardBatch(NamedTuple):
    """A micro-batch of B pairs as 2B sequences, chosen first; `margin`: each pair's (None without them)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    margin: torch.Tensor | None


def collate_rewards(data: TokenizedData, units: np.ndarray, pad_id: int) -> RewardBatch:
    batch = collate_pairs(data, units, pad_id)
    margin = (None if data.row_margins is None else
              torch.from_numpy(np.asarray(data.row_margins[units[:, 0]], dtype=np.float32)))
    return RewardBatch(batch.input_ids, batch.attention_mask, margin)


def reward_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None,
                  center_coefficient: float | None) -> torch.Tensor:
    """Each pair's loss (TRL's RewardTrainer.compute_loss, per pair)."""
    difference = chosen - rejected if margin is None else chosen - rejected - margin.to(chosen.dtype)
    losses = -F.logsigmoid(difference)
    if center_coefficient is not None:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


@dataclass(frozen=True)
class RewardLoss:
    """A micro-batch's summed pair losses and metric sums (accumulate's loss_fn contract)."""
    center_coefficient: float | None
    collate = staticmethod(collate_rewards)

    def nll_tokens(self, data: TokenizedData, units: np.ndarray) -> None:
        return None

    def __call__(self, engine, input_ids, attention_mask, margin, grad_scale=1.0, nll_scale=None):
        rewards = engine(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()
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
    loss = RewardLoss(parts.cfg.reward.center_rewards_coefficient)
    return PairObjective(METRICS, parts.data, parts.layout, loss, parts.pad_id, parts.group.dp_rank)
