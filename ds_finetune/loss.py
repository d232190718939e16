"""The summed token loss of a micro-batch, without ever holding the logits of every position (the
optimizer step that normalises it by the global batch's target tokens is `objectives.accumulate`).

The full path (`train.loss_chunk_tokens: 0`) takes the model's logits for every position, copies them to
fp32 and takes a log-softmax: ~10 bytes x tokens x vocabulary, which for a 150k vocabulary and 8k tokens is
more than a 0.5B model's weights and Adam state together. The chunked path asks the model for no logits
(`logits_to_keep` with no position), takes the final hidden states, keeps only the positions that have a
target, and runs the LM head and the cross-entropy over `loss_chunk_tokens` of them at a time
(`FusedLinearCrossEntropy`): each chunk's gradients are taken in the forward, while its logits exist, so at
most one chunk of logits exists at once and backward has nothing to recompute.

The head runs as a module call inside the model's forward (a forward hook on the base model calls it, its
own forward replaced by the fused loss for that one call), so under ZeRO-3 DeepSpeed's hooks gather its
weight (tied embeddings included) and release it as for any layer.

A change here that sums the token losses or their gradients in another order changes a run's weights at
float-noise level: give it a new `fingerprint.CHUNKED_LOSS_IMPLEMENTATION` (for the dtypes it changes), so
resuming across it is refused.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ds_finetune.data import IGNORE_INDEX, HostFacts
from ds_finetune.device_batch import facts_of, flash_varlen_kwargs, host_to_device
from ds_finetune.errors import UserError
from ds_finetune.fused_head import fused_linear_cross_entropy, fused_sequence_logps, fused_token_logps, segment_sums


def model_inputs(input_ids, attention_mask, position_ids=None, facts: HostFacts | None = None) -> dict:
    """The model's keyword arguments for a micro-batch. With `position_ids` (isolated packing) there is no
    2-D mask and no KV cache: only then does transformers read pack boundaries from the positions and build
    a block-diagonal mask (masking_utils._preprocess_mask_arguments); with a cache it would not. With the
    batch's `facts`, also flash attention's boundaries (`flash_varlen_kwargs`). A packed batch without
    position ids (packed pairs: no mask, `facts.segments`) gets them from its segments."""
    if position_ids is None and attention_mask is None and facts is not None and facts.segments is not None:
        position_ids = host_to_device(facts.positions(), input_ids.device)
    if position_ids is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    inputs = {"input_ids": input_ids, "attention_mask": None, "position_ids": position_ids, "use_cache": False}
    if facts is not None and facts.segments is not None:
        inputs.update(flash_varlen_kwargs(facts, input_ids.device))
    return inputs


def full_loss_sum(engine, input_ids, attention_mask, labels, position_ids=None, facts=None, grad_scale=1.0,
                  shifted=False, token_losses=None, correct=None) -> torch.Tensor:
    """The summed token loss. `shifted`: labels[:, t] is already the target of position t (a
    sequence-parallel slice, whose last position's target is the next slice's first token); else it is the
    token at t, the target of t - 1. `facts`: the batch's data.HostFacts (read back from the labels where
    None). With `token_losses` (a buffer of one float per target token, in row-major order) each target
    token's loss is written there too, apart from the sum (which stays as it was). `correct` (a 0-dim tensor)
    is added the number of targets whose logit is their row's largest."""
    logits = engine(**model_inputs(input_ids, attention_mask, position_ids, facts)).logits
    if not shifted:
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat, targets = logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1)
    if token_losses is not None:
        facts = facts_of(labels, shifted=True) if facts is None else facts
        where = host_to_device(facts.target_positions(labels.size(1)), flat.device)  # no boolean mask: no sync
        with torch.no_grad():
            token_losses.copy_(F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="none")[where])
    if correct is not None:
        with torch.no_grad():  # masked by multiplication: a boolean index would read its count back
            top = flat.gather(1, targets.clamp(min=0)[:, None])[:, 0] >= flat.amax(1)
            correct += (top & (targets != IGNORE_INDEX)).sum()
    return F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def full_token_logps(engine, input_ids, attention_mask, labels, facts=None, temperature: float = 1.0,
                     entropy: torch.Tensor | None = None, stats=None, position_ids=None,
                     shifted: bool = False) -> torch.Tensor:
    """log p(target) of every target token, row-major (as `ChunkedLoss.token_logps`), from the full logits
    (train.loss_chunk_tokens: 0), over `temperature`; each one's entropy into `entropy`, its mean logit and
    top-1 flag into `stats` where given. `position_ids`, `shifted`: as for `full_loss_sum`."""
    facts = facts_of(labels, shifted) if facts is None else facts
    logits = engine(**model_inputs(input_ids, attention_mask, position_ids, facts)).logits.float()
    where = host_to_device(facts.target_positions(), input_ids.device)
    logits = logits.reshape(-1, logits.size(-1))[where]
    targets = labels.reshape(-1)[where if shifted else where + 1]
    if temperature != 1.0:
        logits = logits / temperature
    if stats is not None:
        with torch.no_grad():
            stats[:, 0] = logits.mean(1)
            stats[:, 1] = (logits.gather(1, targets[:, None])[:, 0] >= logits.amax(1)).float()
    logps = torch.log_softmax(logits, -1)
    if entropy is not None:
        with torch.no_grad():
            entropy.copy_(-(logps.exp() * logps).sum(-1))
    return logps.gather(1, targets[:, None])[:, 0]


def full_sequence_logps(engine, input_ids, attention_mask, labels, facts=None, stats=None) -> torch.Tensor:
    """Per-sequence summed log-probs from the full logits (train.loss_chunk_tokens: 0); `facts` for `stats`
    (as `fused_head._token_logps`'s, in `facts.target_positions()`'s order) and for packed sequences."""
    logits = engine(**model_inputs(input_ids, attention_mask, facts=facts)).logits.float()
    packed = facts is not None and facts.sequences is not None
    if stats is not None or packed:
        facts = facts_of(labels) if facts is None else facts
        where = host_to_device(facts.target_positions(), input_ids.device)
        picked, targets = logits.reshape(-1, logits.size(-1))[where], labels.reshape(-1)[where + 1]
        if stats is not None:
            with torch.no_grad():
                stats[:, 0] = picked.mean(1)
                stats[:, 1] = (picked.gather(1, targets[:, None])[:, 0] >= picked.amax(1)).float()
        if packed:  # each sequence's target tokens summed
            return segment_sums(torch.log_softmax(picked, -1).gather(1, targets[:, None])[:, 0], facts.sequences)
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return (logps * keep).sum(1)


# ------------------------------------------------------------------------------------ in the model

@contextmanager
def _forward_replaced(module, forward):
    """Calls of `module` run `forward` instead of its own, with its hooks unchanged.

    ZeRO-3 gathers a module's parameters in a forward pre-hook, releases them in a forward hook and wraps
    the output so backward gathers them again: only inside the module's own call is `head.weight` the
    full tensor (outside, it is an empty partition). An instance attribute shadows the class's forward
    for the duration of one call, and parameter names stay those of the model (checkpoints unchanged)."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


class ChunkedLoss:
    """Installed once on the model: during a forward that asks for it, a hook on the base model computes
    the chunked loss from its last hidden state (inside the engine's forward) and keeps it here."""

    def __init__(self, model, chunk_tokens: int):
        if "logits_to_keep" not in inspect.signature(model.forward).parameters:
            raise UserError(f"config error: train.loss_chunk_tokens: {type(model).__name__} cannot skip its logits "
                            f"(no logits_to_keep argument); set train.loss_chunk_tokens=0")
        self.head, self.chunk_tokens = model.get_output_embeddings(), chunk_tokens
        if hasattr(self.head, "modules_to_save"):  # LoRA's modules_to_save: the trained copy is what runs
            self.head = self.head.modules_to_save[self.head.active_adapter]
        if not isinstance(self.head, torch.nn.Linear):
            raise UserError(f"config error: train.loss_chunk_tokens: the output head of {type(model).__name__} "
                            f"is a {type(self.head).__name__}, not a Linear; set train.loss_chunk_tokens=0")
        # The chunked loss takes the head's own logits: a model that transforms them before its loss
        # (Gemma 2's soft-capping, Cohere's and Granite's logit scales) would silently train on another loss.
        for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
            if getattr(model.config, key, None) not in (None, 1, 1.0):
                raise UserError(f"config error: train.loss_chunk_tokens: {type(model).__name__} transforms its "
                                f"logits ({key}), which the chunked loss does not; set train.loss_chunk_tokens=0")
        self.labels, self.result, self.grad_scale, self.shifted, self.token_losses = None, None, 1.0, False, None
        self.correct = None
        # logps: None (the summed token loss) | "sequences" (summed log-probs a row) | "tokens" (one a target)
        self.logps, self.where, self.counts, self.stats = None, None, None, None
        self.temperature, self.entropy = 1.0, None  # "tokens": GRPO's temperature and entropy buffer
        model.base_model.register_forward_hook(self._after_base_model)

    def _after_base_model(self, module, args, output):
        if self.labels is None:
            return
        hidden = output.last_hidden_state
        # Only target positions reach the head, picked by the host's indices (a boolean mask would read
        # its count back from the device). Position t's target is labels[t], or labels[t + 1] unshifted.
        hidden = hidden.reshape(-1, hidden.size(-1))[self.where]
        targets = self.labels.reshape(-1)[self.where if self.shifted else self.where + 1]
        head, chunk, grad_scale, token_losses = self.head, self.chunk_tokens, self.grad_scale, self.token_losses
        correct = self.correct
        logps, counts, stats, temperature, entropy = self.logps, self.counts, self.stats, self.temperature, self.entropy

        def loss_of(h):  # runs as the head's forward: its weight is gathered here under ZeRO-3
            if logps == "tokens":
                return fused_token_logps(h, head.weight, head.bias, targets, chunk, temperature, entropy, stats)
            if logps == "sequences":
                return fused_sequence_logps(h, head.weight, head.bias, targets, counts, chunk, stats)
            return fused_linear_cross_entropy(h, head.weight, head.bias, targets, chunk, grad_scale, token_losses,
                                              correct)

        with _forward_replaced(head, loss_of):
            self.result = head(hidden)

    def __call__(self, engine, input_ids, attention_mask, labels, position_ids=None, facts=None, grad_scale=1.0,
                 shifted=False, token_losses=None, correct=None) -> torch.Tensor:
        """`facts`, `shifted`, `token_losses`, `correct`: as for `full_loss_sum`."""
        facts = facts_of(labels, shifted) if facts is None else facts  # no segments: transformers finds them
        self.labels, self.grad_scale, self.shifted, self.token_losses = labels, grad_scale, shifted, token_losses
        self.correct = correct
        self.where = host_to_device(facts.target_positions(), input_ids.device)
        self.counts = facts.sequence_targets() if self.logps == "sequences" else None
        try:
            engine(**model_inputs(input_ids, attention_mask, position_ids, facts),
                   logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device))
            return self.result
        finally:
            self.labels, self.result, self.token_losses, self.where, self.counts = None, None, None, None, None
            self.correct = None

    def sequence_logps(self, engine, input_ids, attention_mask, labels, facts=None, stats=None) -> torch.Tensor:
        """Per-sequence summed log-probs of the targets (every sequence must have at least one); `stats`: a
        [targets, 2] buffer for each target's mean logit and top-1 flag (`fused_head._token_logps`)."""
        self.logps, self.stats = "sequences", stats
        try:
            return self(engine, input_ids, attention_mask, labels, facts=facts)
        finally:
            self.logps, self.stats = None, None

    def token_logps(self, engine, input_ids, attention_mask, labels, facts=None, temperature: float = 1.0,
                    entropy: torch.Tensor | None = None, stats=None, position_ids=None,
                    shifted: bool = False) -> torch.Tensor:
        """log p(target) of every target token, row-major (`facts.target_positions()`'s order), of the logits
        over `temperature`; each one's entropy into `entropy` (a buffer of one float a target) and its
        statistics into `stats` where given. `position_ids`, `shifted`: as for `full_loss_sum`."""
        self.logps, self.temperature, self.entropy, self.stats = "tokens", temperature, entropy, stats
        try:
            return self(engine, input_ids, attention_mask, labels, position_ids, facts, shifted=shifted)
        finally:
            self.logps, self.temperature, self.entropy, self.stats = None, 1.0, None, None


def make_sequence_logps_fn(model, chunk_tokens: int):
    """(engine, input_ids, attention_mask, labels, facts=None) -> summed target log-probs of each sequence."""
    return full_sequence_logps if chunk_tokens == 0 else ChunkedLoss(model, chunk_tokens).sequence_logps


def make_token_logps_fn(model, chunk_tokens: int):
    """(engine, input_ids, attention_mask, labels, facts=None) -> log p of every target token, row-major."""
    return full_token_logps if chunk_tokens == 0 else ChunkedLoss(model, chunk_tokens).token_logps


def make_loss_fn(model, chunk_tokens: int):
    """(engine, input_ids, attention_mask, labels, position_ids=None, facts=None, grad_scale=1.0, shifted=False,
    token_losses=None) -> summed token loss of the micro-batch; `facts`: the batch's HostFacts (read back from
    the labels where None); `grad_scale` is the gradient backward will
    bring to that sum (see `objectives.accumulate`); `shifted`: the labels are already aligned with the positions they
    are targets of; `token_losses`, a buffer of one float per target token, receives each one's loss; `correct`, a
    0-dim tensor, is added the number of targets predicted top-1."""
    return full_loss_sum if chunk_tokens == 0 else ChunkedLoss(model, chunk_tokens)
