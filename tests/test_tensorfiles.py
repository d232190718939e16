"""Streamed safetensors files (read back by the safetensors library itself), shard plans, size parsing and
the contiguous, size-balanced split of the conversion work across ranks. In-process, no DeepSpeed launch."""
import hashlib

import pytest
import torch
from safetensors.torch import load_file

from ds_finetune.errors import UserError
from ds_finetune.checkpoint.reshard import share_of
from ds_finetune.checkpoint.tensorfiles import parse_size, plan_shards, read_tensor, write_safetensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_streamed_file_reads_back_with_the_safetensors_library(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=g), "a.bias": torch.randn(7, generator=g),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    produced = []

    def produce(name):
        produced.append(name)
        return tensors[name]
    path = tmp_path / "x.safetensors"
    meta = write_safetensors(path, list(tensors), {n: t.shape for n, t in tensors.items()}, dtype, produce)
    assert produced == list(tensors)  # each produced once, in order (nothing held ahead)
    assert meta == {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == dtype and torch.equal(back[name], t.to(dtype)), name
        assert torch.equal(read_tensor(path, name), t.to(dtype))


def test_a_tensor_of_another_shape_than_planned_is_refused(tmp_path):
    with pytest.raises(ValueError, match="planned"):
        write_safetensors(tmp_path / "x.safetensors", ["w"], {"w": (2, 2)}, torch.float32, lambda _: torch.ones(4))


def test_shards_hold_consecutive_tensors_up_to_the_cap():
    sizes = {"a": 40, "b": 40, "c": 30, "d": 100, "e": 10}
    assert plan_shards(list(sizes), sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_shards(list(sizes), sizes, 10**6) == [list(sizes)]


def test_sizes_parse_like_save_pretrained():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("123") == 123 and parse_size(77) == 77
    for bad in ("big", "0", "-1GB", "5 parsecs"):
        with pytest.raises(UserError, match="max-shard-size"):
            parse_size(bad)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_the_conversion_work_splits_into_contiguous_balanced_shares(world):
    names = [f"p{i}" for i in range(40)]
    shapes = {n: (1 + (i * 37) % 11, 64) for i, n in enumerate(names)}
    shares = [share_of(names, shapes, r, world) for r in range(world)]
    assert [n for share in shares for n in share] == names  # every parameter once, in order
    total = sum(torch.Size(s).numel() for s in shapes.values())
    largest = max(torch.Size(s).numel() for s in shapes.values())
    for share in shares:
        assert abs(sum(torch.Size(shapes[n]).numel() for n in share) - total / world) <= largest
