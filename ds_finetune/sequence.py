"""Sequence parallelism (`train.sequence_parallel: N`, DeepSpeed Ulysses): N ranks share each sequence.

The world is DP x SP: ranks r = dp_rank * SP + sp_rank, so the ranks of one sequence-parallel group are
consecutive (DeepSpeed's `parallel_state_sp` builds its groups so). The data order, the global batch and
the loss do not know about SP: a global batch is still `micro_batch_size x grad_accum x DP` sequences, and
each group takes the micro-batches a rank of a DP-only run of DP ranks would take.

What changes is below the objective seam, in `ShardedLoss`: it takes the micro-batch a group shares,
shifts the labels by one position (so the target of a shard's last position, the first token of the next
shard, is not lost at the border), pads the width to a multiple of SP, gives every token its global
position, and hands the model this rank's slice of the length. Ulysses' attention all-to-alls the slices
into whole sequences of 1/SP of the heads (the model's attention implementation runs on those, causal by
the positions) and back. The fused chunked loss then runs on the slice's targets, so each token's loss is
computed on exactly one rank; the sum over every rank is the global batch's summed loss. DeepSpeed sums
gradients over the SP group and averages them over DP, except ZeRO-3 (it divides by DP x SP), and
`objectives.accumulate` cancels whichever division it makes (`ds_internals.gradient_averaging_ranks`). So a
step at SP=2 computes the loss and the gradient of SP=1 (to float noise).

A pair loss (DPO, ORPO, SimPO, CPO) needs whole sequences' log-probs: `JoinedLogps` joins the slices'
per-target log-probs over the group, every rank computes the same loss from them, and the join's backward
gives each rank its own targets' gradient, so the group's summed gradients are again the whole loss's.
A reward model's score is at each row's last real token, which one slice holds: `JoinedScores` adds up
the slices' scores there the same way.

ZeRO partitions over all ranks (DeepSpeed's sequence-data-parallel group), so a checkpoint's files do not
depend on SP: a run resumes on another SP degree on the same world size without conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ds_finetune.data import IGNORE_INDEX, HostFacts
from ds_finetune.data.packing import Batch
from ds_finetune.device_batch import facts_of, host_to_device
from ds_finetune.dist import gather_in_group
from ds_finetune.errors import UserError
from ds_finetune.fused_head import segment_sums
from ds_finetune.loss import make_sequence_logps_fn, make_token_logps_fn
from ds_finetune.lora import hf_model

# The attention implementations Ulysses wraps (it refuses eager: that needs a 4-D mask, which it drops).
SUPPORTED_ATTENTION = ("sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class SequenceGroup:
    """Where this rank sits in the DP x SP layout."""
    size: int        # SP: ranks sharing a sequence
    rank: int        # this rank's slice of each sequence (0 .. size-1)
    dp_size: int     # groups taking different sequences
    dp_rank: int

    @classmethod
    def of(cls, cfg, world: int, rank: int) -> "SequenceGroup":
        """This rank's place for the run config; a world size SP does not divide is a one-line UserError."""
        sp = cfg.train.sequence_parallel
        return cls(sp, rank % sp, cfg.data_parallel_size(world), rank // sp)


def layout_line(sp: int, world: int, max_length: int) -> str:
    """What --dry-run prints about the DP x SP layout."""
    per_rank = -(-max_length // sp)
    return (f"# layout: data_parallel={world // sp} × sequence_parallel={sp}; up to {per_rank} tokens of a sequence "
            f"per rank (data.max_length {max_length})")


# -------------------------------------------------------------------------------------------- sharding

def shard(batch: Batch, rank: int, size: int, pad_id: int) -> Batch:
    """This rank's slice of the length of every sequence of `batch` (a collated micro-batch).

    Returns (input_ids, None, labels, position_ids, facts), each tensor [rows, width / size], where `labels`
    are already shifted: labels[:, t] is the target of position t (the token at t + 1, or IGNORE_INDEX). The
    width is padded to a multiple of `size` with pad tokens that are no target. Positions are global: 0..
    per row, or the batch's own (isolated packing restarts them at every packed row). No attention mask:
    rows are right-padded, so under causal attention no real token sees a pad. `facts` (HostFacts.shard):
    the slice's target positions and the gathered rows' segments, from the batch's own or read back from
    its labels where it has none."""
    input_ids, _, labels, position_ids, facts = batch
    facts = (facts_of(labels, position_ids=position_ids) if facts is None else facts).shard(rank, size)
    rows, width = input_ids.shape
    padded = -(-width // size) * size
    if position_ids is None:
        position_ids = torch.arange(padded, device=input_ids.device).expand(rows, padded)
    elif padded > width:  # the pad tail continues the last segment's positions
        tail = position_ids[:, -1:] + torch.arange(1, padded - width + 1, device=input_ids.device)
        position_ids = torch.cat([position_ids, tail], dim=1)
    if padded > width:
        input_ids = torch.nn.functional.pad(input_ids, (0, padded - width), value=pad_id)
        labels = torch.nn.functional.pad(labels, (0, padded - width), value=IGNORE_INDEX)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    n = padded // size
    part = slice(rank * n, (rank + 1) * n)
    return Batch(input_ids[:, part].contiguous(), None, shifted[:, part].contiguous(),
                 position_ids[:, part].contiguous(), facts)


def sharded(loss_fn, group: SequenceGroup, ulysses, pad_id: int):
    """The loss function a rank of `group` trains with: `loss_fn` itself without sequence parallelism."""
    return loss_fn if group.size == 1 else ShardedLoss(loss_fn, group, ulysses, pad_id)


class ShardedLoss:
    """A loss function (`loss.make_loss_fn`) that takes the micro-batch the SP group shares and returns the
    summed token loss of this rank's slice of it. The same call signature, so the objective and the
    evaluator run unchanged."""

    def __init__(self, inner, group: SequenceGroup, ulysses, pad_id: int):
        self.inner, self.group, self.ulysses, self.pad_id = inner, group, ulysses, pad_id

    def __call__(self, engine, input_ids, attention_mask, labels, position_ids=None, facts=None, grad_scale=1.0,
                 correct=None):
        part = shard(Batch(input_ids, attention_mask, labels, position_ids, facts), self.group.rank,
                     self.group.size, self.pad_id)
        from ds_finetune.ds_internals import set_ulysses_batch_size  # DeepSpeed: see `attach`
        set_ulysses_batch_size(self.ulysses, input_ids.shape[0])  # an eval batch may hold fewer rows
        return self.inner(engine, part.input_ids, None, part.labels, part.position_ids, part.facts,
                          grad_scale=grad_scale, shifted=True, correct=correct)


# ---------------------------------------------------------------------------- log-probs of whole sequences

def sequence_logps_fn(model, parts):
    """(engine, input_ids, attention_mask, labels, facts=None, stats=None) -> each sequence's summed target
    log-probs (`loss.make_sequence_logps_fn`) by `model`, whole on every rank of a sequence-parallel group;
    `parts`: the run's objectives.ObjectiveParts."""
    if parts.group.size == 1:
        return make_sequence_logps_fn(model, parts.cfg.train.loss_chunk_tokens)
    return _joined(model, parts).sequence_logps


def token_logps_fn(model, parts):
    """(engine, input_ids, attention_mask, labels, facts=None, stats=None) -> log p of every target token by
    `model`, row-major (`loss.make_token_logps_fn`), all of them on every rank of a sequence-parallel group."""
    if parts.group.size == 1:
        return make_token_logps_fn(model, parts.cfg.train.loss_chunk_tokens)
    return _joined(model, parts).token_logps


def _joined(model, parts) -> "JoinedLogps":
    return JoinedLogps(make_token_logps_fn(model, parts.cfg.train.loss_chunk_tokens), parts.group, parts.ulysses,
                       parts.pad_id)


def joined_order(facts: HostFacts, size: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """How the targets of `size` slices (`shard`), joined in rank order, map to the batch's row-major target
    order: (each slice's target count, `joined`: the batch's index of each joined target, `order`: the joined
    index of each of the batch's targets, its inverse)."""
    n = -(-facts.targets.shape[1] // size)
    rows, columns = np.nonzero(facts.targets)  # row-major: the batch's order
    slices = columns // n
    joined = np.lexsort((columns, rows, slices))  # by slice, then row-major within it
    order = np.empty_like(joined)
    order[joined] = np.arange(len(joined))
    return [int(k) for k in np.bincount(slices, minlength=size)], joined, order


class _JoinedTargets(torch.autograd.Function):
    """A value a target of this rank's slice -> the value of every target of the micro-batch, in its order,
    the same on every rank of the group, from which each computes the same loss. Backward hands a rank the
    gradient of its own targets only: the group's parameter gradients, which DeepSpeed sums over the group,
    then add up to the whole loss's (as the slices' token losses do for `ShardedLoss`)."""

    @staticmethod
    def forward(ctx, local, sizes, order, mine, group):
        ctx.save_for_backward(mine)
        return gather_in_group(local, sizes, group)[order]

    @staticmethod
    def backward(ctx, grad):
        mine, = ctx.saved_tensors
        return grad[mine], None, None, None, None


class JoinedLogps:
    """The per-target log-probs of a micro-batch the SP group shares: each rank runs the model on its slice
    of every sequence (`shard`) and the group joins the slices' values (and `stats`, the head's per-target
    statistics) in the batch's target order. A pair loss then runs on them unchanged."""

    def __init__(self, inner, group: SequenceGroup, ulysses, pad_id: int):
        self.inner, self.group, self.ulysses, self.pad_id = inner, group, ulysses, pad_id

    def token_logps(self, engine, input_ids, attention_mask, labels, facts=None, stats=None) -> torch.Tensor:
        facts = facts_of(labels) if facts is None else facts
        device, rank = input_ids.device, self.group.rank
        positions = None if facts.segments is None else host_to_device(facts.positions(), device)  # packed pairs
        part = shard(Batch(input_ids, attention_mask, labels, positions, facts), rank, self.group.size, self.pad_id)
        sizes, joined, order = joined_order(facts, self.group.size)
        start = sum(sizes[:rank])
        from ds_finetune.ds_internals import set_ulysses_batch_size  # DeepSpeed: see `attach`
        set_ulysses_batch_size(self.ulysses, input_ids.shape[0])
        local_stats = None if stats is None else stats.new_empty((sizes[rank], 2))
        local = self.inner(engine, part.input_ids, None, part.labels, part.facts, stats=local_stats,
                           position_ids=part.position_ids, shifted=True)
        order = host_to_device(order, device)
        group = self.ulysses.process_group
        if stats is not None:
            stats.copy_(gather_in_group(local_stats, sizes, group)[order])
        return _JoinedTargets.apply(local, sizes, order, host_to_device(joined[start:start + sizes[rank]], device),
                                    group)

    def sequence_logps(self, engine, input_ids, attention_mask, labels, facts=None, stats=None) -> torch.Tensor:
        facts = facts_of(labels) if facts is None else facts
        return segment_sums(self.token_logps(engine, input_ids, attention_mask, labels, facts, stats),
                            facts.sequence_targets())


# ------------------------------------------------------------------------------ a classifier's last-token score

def last_real_token(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Each row's last position that is not padding: transformers' own rule for where a sequence classifier
    scores (`*ForSequenceClassification`), computed on the device (no read back)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


class _SummedOverGroup(torch.autograd.Function):
    """Every rank's [rows] values added up, on every rank of the group (`size` ranks). Each rank computes the same
    loss from the sum and hands backward's gradient to its own values only, so the group's gradients add up to
    the loss's."""

    @staticmethod
    def forward(ctx, local, size, group):
        rows = local.shape[0]
        return gather_in_group(local, [rows] * size, group).reshape(size, rows).sum(0)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class JoinedScores:
    """A sequence classifier's score of each row (a reward model's reward) under sequence parallelism: each rank
    runs the model on its slice of every row (`position_scores`: (engine, **model inputs) -> the score of each
    position, [rows, width]), takes the score at the rows' last real tokens that fall in its slice, and the
    group adds the slices' values up. Rows are right-padded and attention causal, so that position sees exactly
    what it sees at SP=1."""

    def __init__(self, position_scores, group: SequenceGroup, ulysses, pad_id: int):
        self.position_scores, self.group, self.ulysses, self.pad_id = position_scores, group, ulysses, pad_id

    def __call__(self, engine, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """Each row's score, the same on every rank of the group (no mask needed: rows are right-padded)."""
        rows, width = input_ids.shape
        n = -(-width // self.group.size)
        padded = torch.nn.functional.pad(input_ids, (0, n * self.group.size - width), value=self.pad_id)
        start = self.group.rank * n
        positions = torch.arange(start, start + n, device=input_ids.device).expand(rows, n)
        from ds_finetune.ds_internals import set_ulysses_batch_size  # DeepSpeed: see `attach`
        set_ulysses_batch_size(self.ulysses, rows)
        scores = self.position_scores(engine, input_ids=padded[:, start:start + n].contiguous(), attention_mask=None,
                                      position_ids=positions, use_cache=False)
        at = last_real_token(input_ids, self.pad_id) - start
        mine = (at >= 0) & (at < n)
        local = torch.where(mine, scores.gather(1, at.clamp(0, n - 1)[:, None])[:, 0], torch.zeros_like(scores[:, 0]))
        return _SummedOverGroup.apply(local, self.group.size, self.ulysses.process_group)


# ---------------------------------------------------------------------------------------------- engine

def check_config(cfg) -> None:
    """What the run config alone says about its sequence-parallel layout (for --dry-run, before any model
    exists): the heads of an inline model.config, and isolated packing with attention that is not flash."""
    sp = cfg.train.sequence_parallel
    if sp == 1:
        return
    if getattr(cfg.data, "sources", None):  # per-source losses need each token's loss, which slices split
        raise UserError("config error: data.sources (a mixture) with train.sequence_parallel > 1 is not supported "
                        "yet; train the mixture with train.sequence_parallel=1")
    inline = cfg.model.config or {}
    impl = cfg.model.attention or "sdpa"
    if "num_attention_heads" in inline:
        heads = inline["num_attention_heads"]
        check_heads(sp, heads, inline.get("num_key_value_heads") or heads)
    check_attention(sp, impl, cfg.data.isolates)


def check_model(model, sp: int, isolate: bool) -> str:
    """The model's attention implementation, or a one-line UserError if Ulysses cannot split it over `sp`
    ranks."""
    impl = str(getattr(model.config, "_attn_implementation", None) or "eager")
    heads, kv, _ = attention_heads(model)
    check_heads(sp, heads, kv)
    check_attention(sp, impl, isolate)
    return impl


def attention_heads(model) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of the model's attention: what Ulysses splits and reshapes."""
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    return heads, kv, getattr(text, "head_dim", None) or text.hidden_size // heads


def check_heads(sp: int, heads: int, kv: int) -> None:
    """The query heads must divide by SP, the KV heads divide by SP or SP by them (DeepSpeed then
    replicates them)."""
    if heads % sp:
        fits = [d for d in range(2, heads + 1) if heads % d == 0 and (kv % d == 0 or d % kv == 0)]
        raise UserError(f"config error: train.sequence_parallel={sp} does not divide the model's {heads} attention "
                        f"heads; use train.sequence_parallel in {[1, *fits][:12]}")
    if not (kv % sp == 0 or sp % kv == 0):
        raise UserError(f"config error: train.sequence_parallel={sp} and the model's {kv} key/value heads: one must "
                        f"divide the other (DeepSpeed Ulysses)")


def check_attention(sp: int, impl: str, isolate: bool) -> None:
    """Ulysses wraps sdpa, flex and flash attention (eager needs the 4-D mask it drops). Isolated packing
    needs attention that reads row boundaries from the gathered positions: flash (varlen); with sdpa or
    flex Ulysses attends causally over the whole pack."""
    if impl not in SUPPORTED_ATTENTION:
        raise UserError(f"config error: train.sequence_parallel={sp} needs sdpa, flex or flash attention; the model "
                        f"uses {impl} (set model.attn_implementation: sdpa)")
    if isolate and "flash" not in impl:
        raise UserError(f"config error: data.packing: isolated with train.sequence_parallel={sp} and {impl} attention "
                        f"would let packed rows attend to each other; set data.packing: shared or none, or use "
                        f"flash attention")


# (sp, impl) -> (head geometry, mpu, ulysses): Ulysses replaces transformers' attention function once a
# process, shaped for the first model's heads.
_registered: dict = {}


def attach(model, sp: int, micro_batch_size: int, isolate: bool = False):
    """Register Ulysses for the model's attention (every call of that implementation in this process is
    sequence-parallel from now on) and return (mpu for deepspeed.initialize, the Ulysses module); (None, None)
    without sequence parallelism (sp 1)."""
    if sp == 1:
        return None, None
    # DeepSpeed is imported here, not at the top: `ds-finetune train --dry-run` checks the layout with this
    # module without paying DeepSpeed's import (seconds, and its accelerator line on stdout).
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    from ds_finetune.ds_internals import registered_ulysses

    model = hf_model(model)
    impl = check_model(model, sp, isolate)
    geometry = head_geometry(model)
    if (sp, impl) not in _registered:
        mpu = UlyssesSPAttentionHF.register_with_transformers(model, impl, sp, micro_batch_size,
                                                              seq_length_is_variable=True)
        _registered[sp, impl] = geometry, mpu, registered_ulysses(impl)
    registered, mpu, ulysses = _registered[sp, impl]
    # Registering again would wrap the wrapper (two all-to-alls a call); reusing it for other heads fails
    # later inside Ulysses with a shape assertion. A training process builds one architecture (the DPO
    # reference is the policy's), so a second geometry is a bug of the caller: say so here.
    if geometry != registered:
        raise RuntimeError(f"Ulysses is registered in this process for {registered}; a model with {geometry} "
                           f"cannot share it (one attention geometry a process)")
    return mpu, ulysses


def head_geometry(model) -> str:
    """What Ulysses' reshapes are built for, in words (the registration's key and its error message)."""
    heads, kv, size = attention_heads(model)
    return f"{heads} heads, {kv} key/value heads of size {size}"
