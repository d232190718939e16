"""GRPO's cross-rank exchanges besides `dist.gather_rows` (its rewards, lengths and clipping flags): small
objects (text, errors) and a vector summed over ranks, through dist.py (the collective device: the rank's
GPU under NCCL, the CPU under gloo); a process without a process group (the in-process tests) is the only
rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ds_finetune.dist import all_gather, sum_over_ranks


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather_objects(value) -> list:
    return all_gather(value) if _distributed() else [value]


def sum_vector(values: torch.Tensor) -> list[float]:
    """`values` (a vector on any device) summed over the ranks, as floats."""
    return sum_over_ranks(list(values.unbind())) if _distributed() else values.double().tolist()
