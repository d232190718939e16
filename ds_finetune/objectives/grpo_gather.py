"""GRPO's cross-rank exchanges: every rank's rows of a tensor (the rewards, lengths and clipping flags of its
completions), its small objects (text, errors), and a vector summed over ranks. On the collective device
(dist.collective_device: the rank's GPU under NCCL, the CPU under gloo); a process without a process group
(the in-process tests) is the only rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ds_finetune.dist import all_gather, collective_device, sum_over_ranks


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather_rows(local: torch.Tensor, device) -> torch.Tensor:
    """Every rank's `local` rows (the same shape on every rank), stacked in rank order, on `device`."""
    if not _distributed():
        return local.to(device)
    here = local.to(collective_device())
    parts = [torch.empty_like(here) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, here)
    return torch.cat(parts).to(device)


def gather_objects(value) -> list:
    return all_gather(value) if _distributed() else [value]


def sum_vector(values: torch.Tensor) -> list[float]:
    """`values` (a vector on any device) summed over the ranks, as floats."""
    return sum_over_ranks(list(values.unbind())) if _distributed() else values.double().tolist()
