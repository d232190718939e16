"""Checkpoint throughput, in one torchrun job so all three writers see the same disk, cache and moment.

Builds the engine exactly as ds-finetune does (its model/engine builders and DeepSpeed config), takes one
optimizer step so the Adam moments exist, then repeats, rotating the order each round:

  disk     every rank writes its share of the checkpoint's byte count (bytes / world) as one sequential
           stream of 4 MiB random blocks and fsyncs it (what `dd bs=4M conv=fsync` does), all ranks at
           once: the disk's own speed for the same bytes written with the same parallelism as a save
           (each rank writes its own files);
  nohash   `engine.save_checkpoint` + fsync of every file and folder: DeepSpeed's serialisation, no hashing,
           no manifest (fsync is included because without it the figure is page-cache speed, not disk);
  ours     `ds_finetune.checkpoint.commit.save_checkpoint`: the same save plus sha256 of every file, fsync,
           manifest commit and `latest` - what a training run pays at every checkpoint.

Each timing runs from a barrier to a barrier. Rank 0 writes {"bytes", "rounds": [{kind: seconds}]} to --out.

    torchrun --nproc_per_node 2 bench/children/ckpt_throughput.py --config RUN.yaml --dir SCRATCH --rounds 3 \\
        --out r.json
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout (this is bench/children/)

BLOCK = 4 << 20


def disk_write(path: Path, nbytes: int, block: bytes) -> None:
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            n = min(len(block), nbytes - written)
            f.write(block[:n] if n < len(block) else block)
            written += n
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path.parent, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def fsync_tree(root: Path, rank: int) -> None:
    """Rank 0 fsyncs every file of the tag (the save has returned, so all are written)."""
    from ds_finetune.files import fsync_dir
    if rank != 0:
        return
    for p in sorted(root.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    fsync_dir(root)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--dir", required=True, help="scratch folder on the filesystem under test")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch
    import torch.distributed as dist

    from ds_finetune.checkpoint import commit as ckpt
    from ds_finetune.config import load_config
    from ds_finetune.dist import all_gather, capture_rng, init_distributed, seed_everything
    from ds_finetune.model import build_engine, build_model
    from ds_finetune.zero import zero_config_for_run

    rank, world, _ = init_distributed()
    cfg = load_config(args.config, [])
    ds_config = zero_config_for_run(cfg, world)
    seed_everything(cfg.train.seed)
    engine = build_engine(build_model(cfg, ds_config), cfg, ds_config, total_steps=100)
    params = sum(p.numel() for p in engine.module.parameters())

    # One short step: Adam's moments are created at the first step, and they are most of a checkpoint.
    ids = torch.randint(3, 500, (cfg.train.micro_batch_size, 16))
    for _ in range(cfg.train.grad_accum):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    scratch = Path(args.dir)
    if rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    dist.barrier()
    trainer_state = {"step": 1, "epoch": 0, "offset": 0}
    client_state = {"rng_states": all_gather(capture_rng())}
    block = os.urandom(BLOCK)  # incompressible, like float weights

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    def save_nohash(d: Path):
        engine.save_checkpoint(str(d), tag="step_00000001", client_state=client_state, save_latest=False)
        fsync_tree(d / "step_00000001", rank)

    def save_ours(d: Path):
        ckpt.save_checkpoint(ckpt.SaveSpec(engine, d, rank, world, keep_last=1), 1, client_state, trainer_state)

    # A first, untimed save gives the byte count the disk baseline writes (and warms DeepSpeed's code paths).
    probe = scratch / "probe"
    save_ours(probe)
    nbytes = tree_bytes(probe / "step_00000001") if rank == 0 else 0
    box = [nbytes]
    dist.broadcast_object_list(box, src=0)
    nbytes = box[0]
    if rank == 0:
        shutil.rmtree(probe)

    kinds = ["disk", "nohash", "ours"]
    rounds = []
    for r in range(args.rounds):
        times = {}
        for kind in kinds[r % 3:] + kinds[:r % 3]:  # rotate, so no writer always follows the same one
            d = scratch / f"{kind}-{r}"
            if rank == 0:
                d.mkdir(parents=True)
            dist.barrier()  # the folder exists before any rank writes into it
            if kind == "disk":
                share = nbytes // world + (nbytes % world if rank == 0 else 0)
                times[kind] = timed(lambda: disk_write(d / f"blob-{rank}", share, block))
            elif kind == "nohash":
                times[kind] = timed(lambda: save_nohash(d))
            else:
                times[kind] = timed(lambda: save_ours(d))
            dist.barrier()
            if rank == 0:
                shutil.rmtree(d, ignore_errors=True)  # dirty pages of a deleted file are dropped, not written
        rounds.append(times)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"bytes": nbytes, "params": params, "rounds": rounds}))
        shutil.rmtree(scratch, ignore_errors=True)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
