"""Safetensors files written and read one tensor at a time, for the converted checkpoint copy and exports.

`safetensors.torch.save_file` needs every tensor of a file in memory at once, plus a bytes copy of each;
`write_safetensors` writes the header first (offsets follow from the shapes) and then each tensor as it is
produced, hashing the bytes as they go out: memory is one tensor, whatever the file's size. Reading goes
through `safe_open` per tensor, so the file's mapping (and its pages) is gone again after each read.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import torch

from ds_finetune.errors import UserError
from ds_finetune.files import HashingFile

DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def plan_shards(names: list[str], sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive names grouped into shards of at most `max_bytes` (a larger tensor gets a shard of its
    own), as `save_pretrained` does."""
    shards, current, used = [], [], 0
    for name in names:
        if current and used + sizes[name] > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += sizes[name]
    return shards + ([current] if current else [])


def write_safetensors(path: Path, names: list[str], shapes: dict, dtype: torch.dtype, produce,
                      metadata: dict | None = None) -> dict:
    """Write `names` (in order) to a safetensors file, each tensor obtained from `produce(name)` only when
    its turn comes and cast to `dtype`. Returns {"size", "sha256"} of the file, fsynced."""
    header, offset = {}, 0
    for name in names:
        size = nbytes(shapes[name], dtype)
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata or {"format": "pt"}  # transformers refuses files without a format
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
    f = HashingFile(str(path))  # hashed as the bytes go out, fsynced on close
    try:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = produce(name).to(dtype).contiguous()
            if tuple(t.shape) != tuple(shapes[name]):
                raise ValueError(f"{name}: produced shape {tuple(t.shape)}, planned {tuple(shapes[name])}")
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # its bytes, no copy
            del t
    except BaseException:
        f.abandon()
        raise
    return f.close()


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, as its own memory (the file is unmapped again on return)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def parse_size(text: str | int) -> int:
    """'5GB' (10^9), '500MB', '2GiB' (2^30) or a byte count -> bytes; what `save_pretrained` accepts."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"export error: --max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(float(m.group(1)) * scale)
