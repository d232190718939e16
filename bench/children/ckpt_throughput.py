"""Checkpoint throughput, in one torchrun job so all four writers see the same disk, cache and moment.

Builds the engine exactly as ds-finetune does (its model/engine builders and DeepSpeed config), takes one
optimizer step so the Adam moments exist, then repeats, rotating the order each round:

  disk     every rank writes its share of the checkpoint's byte count (bytes / world) as one sequential
           stream of 4 MiB random blocks and fsyncs it (what `dd bs=4M conv=fsync` does), all ranks at
           once: the disk's own speed for the same bytes written with the same parallelism as a save
           (each rank writes its own files);
  nohash   `engine.save_checkpoint` + fsync of every file and folder: DeepSpeed's serialisation, no hashing,
           no manifest (fsync is included because without it the figure is page-cache speed, not disk);
  ours     `ds_finetune.checkpoint.commit.save_checkpoint`: the same save plus sha256 of every file, fsync,
           manifest commit and `latest` - what a training run pays at every checkpoint;
  rank0    `ours` with the replicated model states written by rank 0 alone (checkpoint/stripes.py off), as
           DeepSpeed writes them: what striping them over the ranks gains;
  cold     after `disk`, its streams' pages dropped from the page cache (posix_fadvise DONTNEED: only
           these files' pages, so the rest of the machine keeps its cache), every rank reads its stream back
           in 4 MiB blocks: the disk's cold sequential read of the checkpoint's bytes;
  load     after `ours`, its files' pages dropped the same way, what a resume does with them: every rank
           verifies its share of the files against the manifest (`verify.verify_files`, the split
           `hash_together` uses) and `engine.load_checkpoint` reads them through the safe loader;
  copy     (--copy-floor) the host copy a background save takes of the save's state dicts, as its writer
           thread takes it (`async_save.DeviceCopy`, `snapshot`), every rank at once: the floor of a
           background save's stall; then the files written from it as the writer writes them, and the CPU
           seconds that took (`write_cpu`).

Each timing runs from a barrier to a barrier. Rank 0 writes {"bytes", "rounds": [{kind: seconds}]} to --out.

    torchrun --nproc_per_node 2 bench/children/ckpt_throughput.py --config RUN.yaml --dir SCRATCH --rounds 3 \\
        --out r.json [--copy-floor]
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


def drop_cached(path: Path) -> None:
    """Drop this file's clean pages from the page cache (it is fsynced): the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_read(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(READ_BUF):
            pass


READ_BUF = bytearray(BLOCK)


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
    p.add_argument("--copy-floor", action="store_true", help="time only the background save's host copy")
    args = p.parse_args()

    import torch
    import torch.distributed as dist

    from ds_finetune.checkpoint import commit as ckpt, ds_internals
    from ds_finetune.checkpoint.async_save import BackgroundWrite, DeviceCopy, snapshot, storage_sizes
    from ds_finetune.checkpoint.commit import write_shard
    from ds_finetune.checkpoint.layout import read_manifest
    from ds_finetune.checkpoint.verify import hash_parts, verify_parts
    from ds_finetune.hashing import share_of_files
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
        # DeepSpeed's own writer: our saves replace `checkpoint_engine.save` by an instance attribute
        # (checkpoint/ds_internals.route_checkpoint_writes), which would otherwise still be in place.
        vars(engine.checkpoint_engine).pop("save", None)
        engine.save_checkpoint(str(d), tag="step_00000001", client_state=client_state, save_latest=False)
        fsync_tree(d / "step_00000001", rank)

    def save_ours(d: Path):
        ckpt.save_checkpoint(ckpt.SaveSpec(engine, d, rank, world, keep_last=1), 1, client_state, trainer_state)

    def save_rank0(d: Path):
        """Ours with the model states written by rank 0 alone, as DeepSpeed writes them (`stripes.py` off)."""
        striping = ckpt.striping_ranks
        ckpt.striping_ranks = lambda engine: 1
        try:
            save_ours(d)
        finally:
            ckpt.striping_ranks = striping

    def copy_floor(d: Path) -> dict:
        """The background save's state dicts collected (nothing written), their host copy timed; then the
        files written from the copy as the writer thread writes them, and the CPU seconds that took this
        process (pickling, sha256, the write's system calls): what a background save takes from training
        where no core is free for it."""
        background = BackgroundWrite(rank, 1)
        ckpt.write_files(ckpt.SaveSpec(engine, d, rank, world), 1, client_state, background)
        memo: dict = {}  # one copy of a storage that several files share, as the writer thread does
        states = [state for _, state in background.files]
        copies: list = []
        seconds = timed(lambda: copies.extend(DeviceCopy().run(
            lambda host_buffer: [snapshot(s, memo, host_buffer) for s in states], storage_sizes(states))))
        cpu = time.process_time()
        for (path, _), state in zip(background.files, copies):
            write_shard(state, path, rank, 1, direct=True)
        write_cpu = time.process_time() - cpu
        dist.barrier()
        if rank == 0:
            shutil.rmtree(d)
        return {"copy": seconds, "write_cpu": write_cpu}

    def load(d: Path):
        tag_dir = d / "step_00000001"
        manifest = read_manifest(tag_dir)
        files = manifest["files"]
        problems = verify_parts(tag_dir, files, share_of_files(hash_parts(files), rank, world))
        assert not problems, problems
        ds_internals.route_checkpoint_reads(engine)
        load_path, _ = engine.load_checkpoint(str(d), tag=tag_dir.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        assert load_path is not None

    def drop_tree(root: Path):
        dist.barrier()
        if rank == 0:
            for f in sorted(root.rglob("*")):
                if f.is_file():
                    drop_cached(f)
        dist.barrier()

    def measure_round(r: int) -> dict:
        kinds = ["disk", "nohash", "ours", "rank0"]
        times = {}
        for kind in kinds[r % 4:] + kinds[:r % 4]:  # rotate, so no writer always follows the same one
            d = scratch / f"{kind}-{r}"
            if rank == 0:
                d.mkdir(parents=True)
            dist.barrier()  # the folder exists before any rank writes into it
            if kind == "disk":
                share = nbytes // world + (nbytes % world if rank == 0 else 0)
                times[kind] = timed(lambda: disk_write(d / f"blob-{rank}", share, block))
                drop_cached(d / f"blob-{rank}")
                times["cold"] = timed(lambda: disk_read(d / f"blob-{rank}"))
            elif kind == "nohash":
                times[kind] = timed(lambda: save_nohash(d))
            elif kind == "rank0":
                times[kind] = timed(lambda: save_rank0(d))
            else:
                times[kind] = timed(lambda: save_ours(d))
                drop_tree(d / "step_00000001")
                times["load"] = timed(lambda: load(d))
            dist.barrier()
            if rank == 0:
                shutil.rmtree(d, ignore_errors=True)  # dirty pages of a deleted file are dropped, not written
        return times

    if args.copy_floor:
        rounds = [copy_floor(scratch / f"copy-{r}") for r in range(args.rounds)]
        nbytes = 0
    else:
        # A first, untimed save gives the byte count the disk baseline writes (and warms DeepSpeed's code paths).
        probe = scratch / "probe"
        save_ours(probe)
        nbytes = tree_bytes(probe / "step_00000001") if rank == 0 else 0
        box = [nbytes]
        dist.broadcast_object_list(box, src=0)
        nbytes = box[0]
        if rank == 0:
            shutil.rmtree(probe)
        rounds = [measure_round(r) for r in range(args.rounds)]
    if rank == 0:
        Path(args.out).write_text(json.dumps({"bytes": nbytes, "params": params, "rounds": rounds}))
        shutil.rmtree(scratch, ignore_errors=True)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
