"""Host syncs seen on the CPU: the operations that, on a CUDA tensor, make the host wait for the device.

A TorchDispatchMode sees every aten op below autograd, so it also sees the ones a backward runs. On CUDA
these wait for the device: reading a value (`.item()`, `float()`, `bool()`: `_local_scalar_dense`), an output
whose size depends on values (`nonzero`, boolean-mask indexing, `masked_select`, `unique`,
`repeat_interleave` with a tensor of repeats and no `output_size`). `.tolist()`, `.cpu()` and `.numpy()` of a
CPU tensor never reach the dispatcher, so they are counted by wrapping the methods. Each sync is recorded
with the innermost frame of the package or library that asked for it (torch's own frames skipped), so a
test can tell ours from transformers'.
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
VALUE_SIZED = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
               aten.unique_consecutive.default}
OWNERS = ("/ds_finetune/", "/transformers/", "/deepspeed/", "/peft/")
ROOT = str(Path(__file__).resolve().parents[1]) + "/"  # the checkout: ds_finetune/... is named from here


def _where() -> str:
    """file:line of the innermost frame that belongs to the package or a library that calls torch."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if any(owner in frame.filename for owner in OWNERS) and not frame.filename.endswith("host_syncs.py"):
            return f"{frame.filename.split('/site-packages/')[-1].removeprefix(ROOT)}:{frame.lineno}"
    return "elsewhere"


def _is_sync(func, args, kwargs) -> bool:
    if func is aten._local_scalar_dense.default or func in VALUE_SIZED:
        return True
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default):
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if func is aten.repeat_interleave.Tensor or func is aten.repeat_interleave.self_Tensor:
        return (kwargs or {}).get("output_size") is None
    return False


class HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str]] = []  # (what, where)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_sync(func, args, kwargs):
            self.found.append((str(func), _where()))
        return func(*args, **(kwargs or {}))

    def by(self, owner: str) -> list[tuple[str, str]]:
        """The syncs whose innermost frame is under `owner` (e.g. 'ds_finetune/')."""
        return [f for f in self.found if f[1].startswith(owner)]


@contextmanager
def recording_host_syncs():
    """Yields a HostSyncs that records, inside the block, every host sync of any tensor, also those in
    backward and `.tolist()` / `.cpu()` / `.numpy()`."""
    syncs = HostSyncs()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}

    def counted(name):
        def method(self, *args, **kwargs):
            syncs.found.append((f"Tensor.{name}", _where()))
            return originals[name](self, *args, **kwargs)
        return method

    for name in originals:
        setattr(torch.Tensor, name, counted(name))
    try:
        with syncs:
            yield syncs
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
