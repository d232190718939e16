"""Loading checkpoint files as data: torch's safe unpickler (`weights_only=True`) with an explicit allowlist,
and a check of a file that needs neither DeepSpeed nor the file's tensors (for `ckpt verify`/`list` and
before a resume or an export changes anything). Why and what: docs/design.md, "Loading: checkpoints are data".

`CHECKPOINT_GLOBALS` is what a checkpoint file may hold besides what torch's safe unpickler allows by itself
(tensors, dtypes, devices, OrderedDict, torch.Size, plain values): the classes DeepSpeed 0.19 pickles into
its files, found by saving every variant (ZeRO 0-3, fp32/bf16/fp16, LoRA, offload, background saves;
`tools/checkpoint_globals.py` lists them). Our own state is plain values (client_state, manifest.json). The
safe unpickler rebuilds an allowed class with `cls.__new__` and a `__dict__` update (or calls it, for an enum
value); none of these defines `__new__`, `__setstate__` or an `__init__` that does more than assign
attributes, so a file can make them hold odd values but never run code. The classes themselves are
resolved in `ds_internals.checkpoint_globals` (importing DeepSpeed); the check here stands a placeholder
in for each name, so the same unpickler decides without importing DeepSpeed.
"""

from __future__ import annotations

import pickle
import re

import torch

from ds_finetune.errors import UserError

CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",         # ZeRO 1-3 optimizer state: the (unit) loss scale
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # the same under fp16
    "deepspeed.runtime.zero.config.ZeroStageEnum",           # ZeRO 1-3 optimizer state: zero_stage
    "deepspeed.utils.tensor_fragment.fragment_address",      # ZeRO 1/2 optimizer state: param_slice_mappings
)


class UnsafeCheckpointFile(UserError):
    def __init__(self, path, what: str):
        self.path, self.what = path, what
        super().__init__(f"checkpoint error: {path} is unsafe to load: {what}; nothing in it was run or loaded "
                         f"(a checkpoint holds tensors and plain values only)")


def load(path, allowed: list, map_location="cpu", mmap: bool = False):
    """torch.load through torch's safe unpickler with `allowed` ([(class, its CHECKPOINT_GLOBALS name)])
    besides torch's own; a file that needs any other global is refused (UnsafeCheckpointFile) before any
    of it runs."""
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointFile(path, refused(e)) from None


class _Placeholder:
    """Stands in for an allowed class during `check`: accepts whatever the real one would be given."""

    def __init__(self, *args, **kwargs):
        pass


def check(path) -> None:
    """Raise UnsafeCheckpointFile if loading `path` would be refused; any other exception: unreadable. The
    file's tensors are memory-mapped and never read (a legacy-format file is loaded whole)."""
    allowed = [(_Placeholder, name) for name in CHECKPOINT_GLOBALS]
    try:
        load(path, allowed, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        load(path, allowed)


def refused(err: pickle.UnpicklingError) -> str:
    """What torch's safe unpickler refused, in a few words, from its long message."""
    text = str(err)
    m = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", text)
    if m:
        return f"it needs {m.group(1)}, which a checkpoint may not hold"
    m = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return (m.group(1) if m else text.strip().splitlines()[0] if text.strip() else "refused")[:200]
