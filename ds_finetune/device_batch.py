"""A micro-batch on its way to the device, without the host ever waiting for the device.

On CUDA the host queues kernels ahead of the device; anything that reads a device value back (`.item()`,
`.tolist()`, `.cpu()`, a boolean mask's count, a copy from pageable memory) waits until every kernel queued
before it has run, and the queue runs dry. What the training step needs to know about a batch (where its
targets are, how many a row has, where packed rows start) is known on the host when `data.collate` builds
it (`HostFacts`); here its tensors are copied over without a wait, and those facts become the arguments
of the kernels that need them.
"""

from __future__ import annotations

import torch

from ds_finetune.data import IGNORE_INDEX, HostFacts


def to_device(batch, device) -> list:
    """A batch's tensors on `device`; its host values (HostFacts, row numbers) stay as they are."""
    return [host_to_device(t, device) if isinstance(t, torch.Tensor) else t for t in batch]


def host_to_device(values, device) -> torch.Tensor:
    """Host values (a CPU tensor or an array) as a tensor on `device`, without waiting for the device: on
    CUDA from pinned memory and non-blocking. A copy from pageable memory waits for every kernel queued
    before it; the pinned buffer is not reused before the copy is done (torch's host allocator records it)."""
    host = torch.as_tensor(values)
    if torch.device(device).type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def flash_varlen_kwargs(facts: HostFacts, device) -> dict:
    """cu_seq_lens_q/k and max_length_q/k of the sequences attention sees, from the host's segments.
    Given them, transformers' flash attention runs its varlen kernel at once; without them it reads the
    boundaries back from the position ids in every layer (`_is_packed_sequence`,
    `prepare_fa_kwargs_from_position_ids`: a host sync each). Every other attention implementation takes
    them in its **kwargs and ignores them."""
    boundaries, longest = host_to_device(facts.cu_seq_lens(), device), facts.longest_segment()
    return {"cu_seq_lens_q": boundaries, "cu_seq_lens_k": boundaries, "max_length_q": longest,
            "max_length_k": longest}


def facts_of(labels, shifted: bool = False, position_ids=None) -> HostFacts:
    """The facts of `labels` (and the segments of `position_ids`, where given) read back from the tensors,
    for a caller that built none (tests, tools). On an accelerator this waits for the device; training and
    evaluation never call it (collate builds them)."""
    host = labels.cpu().numpy()
    segments = None if position_ids is None else HostFacts.segments_of(position_ids.cpu().numpy())
    return HostFacts(host != IGNORE_INDEX, segments) if shifted else HostFacts.of_labels(host, segments)
