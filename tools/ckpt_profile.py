"""Where one rank's checkpoint save spends its time, in one process: the split docs/design.md quotes.

Builds the files rank 0 of a 2-rank ZeRO-2 save of the checkpoint bench's model writes (a 40M-param Llama:
`mp_rank_00_model_states.pt` with the fp32 module, and the rank's optimizer partition: fp32 masters and
Adam moments as flat tensors; ~400 MB), then times, median of --reps:

  save      the whole write of both files as a synchronous save does it (`commit.write_shard`: torch.save
            into the hashing file, fsync)
  direct    the same with `direct=True` (O_DIRECT where the file system allows it)
  buffered  the same with `direct=False` (through the page cache)
  pickle    torch.save of the same state with every tensor empty: the pickle and the zip container's
            headers
  records   torch.save into a file object that drops the bytes, CRC32 off, minus `pickle`: handing the
            tensor bytes to the file object
  crc32     the same with torch's CRC32 on, minus without: the zip records' checksums
  sha256    hashlib over the bytes the files hold
  page      os.write of those bytes into fresh files (the copy into the page cache), no fsync
  fsync     fsync of those files

    PYTHONPATH=CHECKOUT python tools/ckpt_profile.py [--dir SCRATCH] [--reps 5] [--scale 1.0]

(PYTHONPATH picks the checkout whose writer is profiled.)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import statistics
import time
from pathlib import Path

import torch


def llama_state(hidden=640, layers=8, inter=1728, vocab=512, world=2, scale=1.0) -> dict[str, dict]:
    """{file name: state} of rank 0 of a ZeRO-2 save, shaped like DeepSpeed's files (random fp32)."""
    hidden = int(hidden * scale ** 0.5) // 64 * 64
    inter = int(inter * scale ** 0.5) // 64 * 64
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
                       p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    module = {name: torch.randn(shape) for name, shape in shapes.items()}
    numel = sum(t.numel() for t in module.values())
    part = -(-numel // world)
    optim = {"optimizer_state_dict": {
        "zero_stage": 2, "loss_scaler": None, "partition_count": [world],
        "single_partition_of_fp32_groups": [torch.randn(part)],
        "base_optimizer_state": {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.randn(part),
                                               "exp_avg_sq": torch.rand(part)}},
                                 "param_groups": [{"lr": 3e-4, "params": [0]}]}},
        "ds_config": {}, "ds_version": "0.19.8"}
    model_states = {"module": module, "buffer_names": [], "optimizer": None, "param_shapes": [
        {n: torch.Size(s) for n, s in shapes.items()}], "global_steps": 1, "global_samples": 2,
        "rng_states": [[list(range(625))] * 2] * world, "ds_version": "0.19.8"}
    return {"mp_rank_00_model_states.pt": model_states, "zero_pp_rank_0_mp_rank_00_optim_states.pt": optim}


class Sink(io.RawIOBase):
    """A file object that keeps nothing (or the bytes, with `keep`)."""

    def __init__(self, keep: bool = False):
        self.parts = [] if keep else None

    def writable(self):
        return True

    def write(self, data):
        if self.parts is not None:
            self.parts.append(bytes(data))
        return memoryview(data).nbytes


def emptied(obj):
    """The same state with every tensor empty: what torch.save costs without the tensor bytes."""
    if isinstance(obj, torch.Tensor):
        return torch.empty(0, dtype=obj.dtype)
    if isinstance(obj, dict):
        return type(obj)((k, emptied(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(emptied(v) for v in obj)
    return obj


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def save_into(state, f, crc: bool = True) -> None:
    from torch.utils.serialization import config
    old = config.save.compute_crc32
    config.save.compute_crc32 = crc
    try:
        torch.save(state, f)
    finally:
        config.save.compute_crc32 = old


def one_rep(states: dict, scratch: Path, write_shard) -> dict[str, float]:
    blobs = {}
    for name, state in states.items():
        sink = Sink(keep=True)
        torch.save(state, sink)
        blobs[name] = b"".join(sink.parts)
    t = {}
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    cpu0 = time.process_time()
    t["save"] = sum(timed(lambda: write_shard(s, scratch / n, 0, 1)) for n, s in states.items())
    t["cpu"] = time.process_time() - cpu0  # this process's CPU (its threads'); the kernel's write-back is not in it
    shutil.rmtree(scratch)
    scratch.mkdir()
    for kind, direct in (("direct", True), ("buffered", False)):
        t[kind] = sum(timed(lambda: write_shard(s, scratch / n, 0, 1, direct=direct)) for n, s in states.items())
        shutil.rmtree(scratch)
        scratch.mkdir()

    t["pickle"] = sum(timed(lambda: torch.save(s, Sink())) for s in map(emptied, states.values()))
    no_crc = sum(timed(lambda: save_into(s, Sink(), crc=False)) for s in states.values())
    with_crc = sum(timed(lambda: save_into(s, Sink(), crc=True)) for s in states.values())
    t["records"] = max(0.0, no_crc - t["pickle"])
    t["crc32"] = max(0.0, with_crc - no_crc)
    t["sha256"] = sum(timed(lambda: hashlib.sha256(b).hexdigest()) for b in blobs.values())
    fds = {n: os.open(scratch / n, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for n in blobs}

    def page(n, b):
        view = memoryview(b)
        while len(view):
            view = view[os.write(fds[n], view):]

    t["page"] = sum(timed(lambda: page(n, b)) for n, b in blobs.items())
    t["fsync"] = sum(timed(lambda: os.fsync(fd)) for fd in fds.values())
    for fd in fds.values():
        os.close(fd)
    shutil.rmtree(scratch)
    t["bytes"] = sum(len(b) for b in blobs.values())
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="build/ckpt-profile")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--scale", type=float, default=1.0, help="model size factor (parameters)")
    args = p.parse_args()
    from ds_finetune.checkpoint.commit import write_shard

    torch.manual_seed(0)
    states = llama_state(scale=args.scale)
    reps = [one_rep(states, Path(args.dir), write_shard) for _ in range(args.reps)]
    mb = reps[0]["bytes"] / 1e6
    save = statistics.median(r["save"] for r in reps)
    print(f"{mb:.0f} MB a rank (rank 0 of a 2-rank ZeRO-2 save), median of {args.reps}; "
          f"torch {torch.__version__}, {os.cpu_count()} cores")
    print(f"{'part':8} {'s':>7} {'MB/s':>7} {'of save':>8}   (CPU {statistics.median(r['cpu'] for r in reps):.2f} s "
          f"a save)")
    for key in ("save", "direct", "buffered", "pickle", "records", "crc32", "sha256", "page", "fsync"):
        s = statistics.median(r[key] for r in reps)
        print(f"{key:8} {s:7.3f} {mb / s if s else float('inf'):7.0f} {s / save:8.2f}")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
