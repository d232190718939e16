"""Saving one checkpoint and committing it: every rank writes its DeepSpeed files into `DIR/step_N/`, fsyncs
and hashes the files it owns (as they are written: `record_shard_writes`) and sends the list to rank 0,
which writes the manifest (temp name, fsync, rename, fsync of the folder: the commit), then `latest`, then
applies retention. The fault points of a save's phases are here."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import deepspeed
import torch
import torch.distributed as dist

from ds_finetune import __version__
from ds_finetune.checkpoint import ds_internals, stripes
from ds_finetune.checkpoint.layout import (LATEST, MANIFEST, MANIFEST_VERSION, apply_retention, remove_tree,
                                           tag_for_step)
from ds_finetune.dist import all_gather, decide
from ds_finetune.errors import UserError, first_line
from ds_finetune.faults import fault_point
from ds_finetune.files import HashingFile, fsync_dir, hash_and_sync, write_atomic


@dataclass(frozen=True)
class SaveSpec:
    """What every save of a run shares."""
    engine: object
    ckpt_dir: Path
    rank: int
    world: int
    keep_last: int = 0             # retention: the newest N committed checkpoints (0: all)
    keep_best: bool = False        # retention also keeps the lowest-eval-loss one
    trainable_only: bool = False   # LoRA: the frozen base is not saved (it is fingerprinted)
    write_extra: Callable | None = None  # rank 0: write_extra(tag_dir) adds files (committed too)


def save_checkpoint(spec: SaveSpec, step: int, client_state: dict, trainer_state: dict) -> Path:
    """Save and commit `step_N`. Returns the tag dir. Every rank calls this at the same step."""
    tag_dir, own = write_files(spec, step, client_state)
    commit_files(spec, tag_dir, step, own, trainer_state)
    return tag_dir


def write_files(spec: SaveSpec, step: int, client_state: dict, background=None) -> tuple[Path, dict]:
    """DeepSpeed's save of `step_N` on this rank: (tag dir, {file: size/sha256} of the files it wrote), or,
    with a `background` writer, the files collected for it to write (and {})."""
    engine, ckpt_dir, rank = spec.engine, spec.ckpt_dir, spec.rank
    tag_dir = ckpt_dir / tag_for_step(step)
    try:
        fault_point("before_save", rank, step)
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a leftover of a crashed or abandoned attempt: never mix files into it
                remove_tree(tag_dir)
        dist.barrier()
        stripe_ranks = striping_ranks(engine) if background is None else 1
        if background is None:
            written = record_shard_writes(engine, rank, step, stripe_ranks)
        else:
            written = {}
            ds_internals.route_checkpoint_writes(engine, background.collect)
        with ds_internals.model_states_written_by(engine, rank < stripe_ranks):
            engine.save_checkpoint(str(ckpt_dir), tag=tag_dir.name, client_state=client_state, save_latest=False,
                                   exclude_frozen_parameters=spec.trainable_only)
        if rank == 0 and spec.write_extra is not None:
            spec.write_extra(tag_dir)
        fault_point("after_shards", rank, step)
        return tag_dir, {str(Path(path).relative_to(tag_dir)): meta for path, meta in written.items()}
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        raise disk_error(ckpt_dir, e) from e


def commit_files(spec: SaveSpec, tag_dir: Path, step: int, own: dict | str, trainer_state: dict) -> None:
    """Every rank sends its files (or its write error, a string) to rank 0, which commits `step_N` and
    applies retention; every rank returns once committed, or raises the same error."""
    parts = all_gather(own)
    decide(lambda: _commit_on_rank0(spec, tag_dir, step, parts, trainer_state), runs_here=spec.rank == 0)


def _commit_on_rank0(spec: SaveSpec, tag_dir: Path, step: int, parts: list, trainer_state: dict) -> None:
    failed = [part for part in parts if isinstance(part, str)]
    if failed:
        raise disk_error(spec.ckpt_dir, OSError(failed[0]))
    files = stripes.merge_reports(parts)
    _commit(spec.engine, tag_dir, step, files, trainer_state, spec.rank, spec.world)
    apply_retention(spec.ckpt_dir, spec.keep_last, newest_committed=step, rank=spec.rank, keep_best=spec.keep_best)


def _commit(engine, tag_dir: Path, step: int, files: dict, trainer_state: dict, rank: int, world_size: int) -> None:
    """Rank 0: hash what no rank streamed, write the manifest (the commit), then point `latest` at it."""
    ckpt_dir = tag_dir.parent
    try:
        for p in sorted(tag_dir.rglob("*")):  # write_extra's files, or a non-torch checkpoint engine's
            name = str(p.relative_to(tag_dir))
            if p.is_file() and name not in files and p.name != MANIFEST and not p.name.startswith("."):
                files[name] = hash_and_sync(p)
        manifest = {"manifest_version": MANIFEST_VERSION, "tag": tag_dir.name, "step": step, "time": time.time(),
                    "zero_stage": engine.zero_optimization_stage(), "world_size": world_size,
                    "ds_finetune_version": __version__, "deepspeed_version": deepspeed.__version__,
                    "trainer_state": trainer_state, "files": files}
        fsync_dir(tag_dir)
        fault_point("slow_save", rank, step)
        fault_point("enospc_manifest", rank, step)
        write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1),
                     before_rename=lambda: fault_point("after_manifest_tmp", rank, step))
        fault_point("after_manifest_rename", rank, step)
        fault_point("enospc_latest", rank, step)
        write_atomic(ckpt_dir / LATEST, tag_dir.name,
                     before_rename=lambda: fault_point("before_latest_rename", rank, step))
        fault_point("after_latest_rename", rank, step)
    except OSError as e:
        raise disk_error(ckpt_dir, e) from e


def striping_ranks(engine) -> int:
    """How many ranks write the model states file together (`stripes.py`): the first node's, where every
    rank holds the same model states; else 1 (rank 0 alone, as DeepSpeed)."""
    if not ds_internals.model_states_replicated(engine):
        return 1
    return max(1, min(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), dist.get_world_size()))


def record_shard_writes(engine, rank: int, step: int, stripe_ranks: int = 1) -> dict[str, dict]:
    """Route this save's shard writes through `write_shard`; returns {path: size/sha256}, filled as
    DeepSpeed writes (empty if its checkpoint engine writes its own way: then files are hashed after).
    With `stripe_ranks` > 1, the ranks below it write their stripes of the model states file."""
    written: dict[str, dict] = {}

    def save(state_dict, path):
        striped = stripe_ranks > 1 and Path(path).name == ds_internals.MODEL_STATES
        written[str(path)] = write_shard(state_dict, path, rank, step, stripe_ranks=stripe_ranks if striped else 1)

    ds_internals.route_checkpoint_writes(engine, save)
    return written


def write_shard(state, path, rank: int, step: int, direct: bool = True, stripe_ranks: int = 1) -> dict:
    """One checkpoint file through the hashing writer (a save's or a background write's): its size and
    sha256 once durable (with `stripe_ranks` > 1: this rank's stripes of it, `stripes.StripedFile`). The
    shard-writing faults fire here."""
    fault_point("enospc", rank, step)
    tear = lambda: fault_point("torn_shard", rank, step)  # noqa: E731
    f = (stripes.StripedFile(path, rank, stripe_ranks, tear, direct) if stripe_ranks > 1
         else HashingFile(path, tear=tear, direct=direct))
    try:
        with no_zip_crc32():
            torch.save(state, f)
    finally:
        meta = f.close()
    fault_point("mid_shards", rank, step)
    return meta


_crc_lock = threading.Lock()
_crc_off = 0  # saves running without CRC32 (a background write and a synchronous save may overlap)
_crc_off_restore = [True]  # torch's setting before the first of them


@contextmanager
def no_zip_crc32():
    """torch.save without the CRC32 of every zip record (~a sixth of a save's time here): the manifest's
    sha256 covers every byte, and torch.load (DeepSpeed's and zero_to_fp32's loads too) does not check
    CRC32s. Only our own saves: torch's setting is restored when the last of them ends."""
    from torch.utils.serialization import config

    global _crc_off
    with _crc_lock:
        if _crc_off == 0:
            _crc_off_restore[0] = config.save.compute_crc32
            config.save.compute_crc32 = False
        _crc_off += 1
    try:
        yield
    finally:
        with _crc_lock:
            _crc_off -= 1
            if _crc_off == 0:
                config.save.compute_crc32 = _crc_off_restore[0]



def disk_error(ckpt_dir: Path, err: BaseException) -> UserError:
    try:
        free = shutil.disk_usage(ckpt_dir if ckpt_dir.exists() else ckpt_dir.parent).free / 2**20
        free_text = f"{free:,.0f} MiB free"
    except OSError:
        free_text = "free space unknown"
    return UserError(f"checkpoint error: saving into {ckpt_dir} failed ({first_line(err)}; {free_text}); the previous "
                     f"complete checkpoint is intact - free space or set checkpoint.dir, then --resume", exit_code=3)
