"""The summed token loss of a micro-batch, without ever holding the logits of every position, and one
optimizer step over a rank's micro-batches normalised by the global batch's target tokens (`train_step`).

The full path (`train.loss_chunk_tokens: 0`) takes the model's logits for every position, copies them to
fp32 and takes a log-softmax: ~10 bytes x tokens x vocabulary, which for a 150k vocabulary and 8k tokens is
more than a 0.5B model's weights and Adam state together. The chunked path asks the model for no logits
(`logits_to_keep` with no position), takes the final hidden states, keeps only the positions that have a
target, and runs the LM head and the cross-entropy over `loss_chunk_tokens` of them at a time, each chunk
checkpointed (its logits are recomputed in backward), so at most one chunk of logits exists at once.

The head runs as a module call inside the model's forward (a forward hook on the base model), so under
ZeRO-3 DeepSpeed's hooks gather its weight (tied embeddings included) and release it as for any layer.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ds_finetune.data import IGNORE_INDEX
from ds_finetune.errors import UserError


def model_inputs(input_ids, attention_mask, position_ids=None) -> dict:
    """The model's keyword arguments for a micro-batch. With `position_ids` (isolated packing) there is no
    2-D mask and no KV cache: only then does transformers read pack boundaries from the positions and build
    a block-diagonal mask (masking_utils._preprocess_mask_arguments); with a cache it would not."""
    if position_ids is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    return {"input_ids": input_ids, "attention_mask": None, "position_ids": position_ids, "use_cache": False}


def full_loss_sum(engine, input_ids, attention_mask, labels, position_ids=None) -> torch.Tensor:
    logits = engine(**model_inputs(input_ids, attention_mask, position_ids)).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _chunk_loss_sum(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head, chunk_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of the target positions, `chunk_tokens` positions through the head at a time."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][keep], targets[keep]  # non-target positions never reach the head
    if 0 < targets.numel() <= chunk_tokens:  # one chunk: it is the only logits anyway, no need to recompute
        return _chunk_loss_sum(head, hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss_sum, head, hidden[part], targets[part], use_reentrant=False)
    return total


class ChunkedLoss:
    """Installed once on the model: during a forward that asks for it, a hook on the base model computes
    the chunked loss from its last hidden state (inside the engine's forward) and keeps it here."""

    def __init__(self, model, chunk_tokens: int):
        if "logits_to_keep" not in inspect.signature(model.forward).parameters:
            raise UserError(f"config error: train.loss_chunk_tokens: {type(model).__name__} cannot skip its logits "
                            f"(no logits_to_keep argument); set train.loss_chunk_tokens=0")
        self.head, self.chunk_tokens = model.get_output_embeddings(), chunk_tokens
        self.labels, self.result = None, None
        model.base_model.register_forward_hook(self._after_base_model)

    def _after_base_model(self, module, args, output):
        if self.labels is not None:
            self.result = chunked_loss_sum(output.last_hidden_state, self.labels, self.head, self.chunk_tokens)

    def __call__(self, engine, input_ids, attention_mask, labels, position_ids=None) -> torch.Tensor:
        self.labels = labels
        try:
            engine(**model_inputs(input_ids, attention_mask, position_ids),
                   logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device))
            return self.result
        finally:
            self.labels, self.result = None, None


def make_loss_fn(model, chunk_tokens: int):
    """(engine, input_ids, attention_mask, labels, position_ids=None) -> summed token loss of the micro-batch."""
    return full_loss_sum if chunk_tokens == 0 else ChunkedLoss(model, chunk_tokens)


def to_device(tensors, device) -> list:
    return [None if t is None else t.to(device) for t in tensors]


def train_step(engine, loss_fn, micro_batches: list, global_targets: int, grad_accum: int, world_size: int,
               after_micro_step=None) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns this rank's summed token loss.

    The step's loss is (sum of token losses over the global batch) / (targets in the global batch).
    DeepSpeed divides each micro-step's loss by grad_accum and averages gradients over ranks, so each
    micro-step's sum is scaled by grad_accum * world_size / global_targets to cancel both."""
    scale = grad_accum * world_size / global_targets
    local_sum = torch.zeros((), dtype=torch.float64)
    for batch in micro_batches:  # data.Batch: input_ids, attention_mask, labels, position_ids
        loss_sum = loss_fn(engine, *to_device(batch, engine.device))
        engine.backward(loss_sum * scale)
        engine.step()
        local_sum += loss_sum.detach().double().cpu()
        if after_micro_step is not None:
            after_micro_step()
    return local_sum
