"""Converting a checkpoint for another ZeRO stage or world size into its stage-independent copy
(`step_N/resharded/`, reshard.py's format), by the ranks of the resuming job or by one process.

Every rank writes a share of the parameters into a temp folder and reports it; rank 0 waits for every
report and commits (renames the folder into place); the others wait for the commit, watching rank 0. The
ranks wait for each other on files (`rendezvous`), not in a collective: a conversion may take longer than
DeepSpeed's process-group timeout. A copy an earlier resume committed is reused once its files verify.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from ds_finetune.checkpoint import reshard
from ds_finetune.checkpoint.layout import MANIFEST
from ds_finetune.checkpoint.verify import CheckpointInfo, hash_together
from ds_finetune.dist import decide
from ds_finetune.faults import fault_point
from ds_finetune.rendezvous import Meter, Rendezvous, scratch_folder


def needs_conversion(info: CheckpointInfo | None, stage: int, world: int) -> bool:
    return info is not None and (info.manifest["zero_stage"], info.manifest["world_size"]) != (stage, world)


def convert(info: CheckpointInfo, stage: int, world: int, rank: int, say) -> reshard.ConvertedCopy:
    """The stage-independent copy of `info` for a job of `world` ranks at ZeRO `stage`: converted now
    (every rank calls this), or the copy an earlier resume committed. Rank 0 reports through `say`."""
    m = info.manifest

    def plan():  # rank 0: reuse, or a fresh temp folder (leftovers of a crashed conversion go first)
        cached = reshard.has_resharded(info)
        say(f"converting {info.path} (ZeRO {m['zero_stage']}, {m['world_size']} ranks) for ZeRO {stage} on "
            f"{world} ranks" + (" (reusing the converted copy)" if cached else
                                     f" ({world} ranks share the work)" if world > 1 else ""))
        if cached:
            return None
        for old in info.path.glob(reshard.TMP_PREFIX + "*"):  # a crashed conversion's leftovers
            shutil.rmtree(old, ignore_errors=True)
        return _new_temp_folder(info).name

    tmp_name = decide(plan, runs_here=rank == 0)
    if tmp_name is None:
        target = reshard.resharded_dir(info)
        with scratch_folder(info.path, rank) as scratch:
            problems = hash_together(target, _manifest_of(info), scratch, rank, world, say)
        return reshard.open_resharded(target, lambda _: problems)
    _convert_share(info, info.path / tmp_name, rank, world, say)
    return reshard.open_resharded(reshard.resharded_dir(info))


def convert_here(info: CheckpointInfo, shard_bytes: int = reshard.SHARD_BYTES, say=lambda text: None) -> Path:
    """Convert in this one process (tools and tests): the same driver as a job's, with one rank."""
    _convert_share(info, _new_temp_folder(info), 0, 1, say, shard_bytes)
    return reshard.resharded_dir(info)


def _new_temp_folder(info: CheckpointInfo) -> Path:
    tmp = info.path / f"{reshard.TMP_PREFIX}{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def _manifest_of(info: CheckpointInfo) -> dict:
    return json.loads((reshard.resharded_dir(info) / MANIFEST).read_text())


def _convert_share(info: CheckpointInfo, tmp: Path, rank: int, world: int, say,
                   shard_bytes: int = reshard.SHARD_BYTES) -> None:
    """Write this rank's share into `tmp` and report it (`rendezvous`); rank 0 waits for every report,
    then commits; the others wait for the commit, watching rank 0."""
    board = Rendezvous(tmp, rank, world, f"converting {info.path}")
    try:
        src = reshard.open_source(info)
        share = reshard.share_of(src.names, src.shapes, rank, world)
        meter = Meter(say if rank == 0 else None, "converting (rank 0's share)", reshard.share_bytes(src, share))

        def converted(n: int) -> None:
            board.beat()
            meter.add(n)

        board.beat()
        part = reshard.write_share(src, share, tmp, rank, shard_bytes, progress=converted)
        fault_point("mid_convert", rank, info.step)
        fault_point("hang_convert", rank, info.step)
        board.report(part)
        if rank == 0:
            parts = board.reports()
            board.clear_markers()
            reshard.commit(reshard.resharded_dir(info), tmp, parts, reshard.source_meta(info, src))
    except Exception as e:  # every rank must learn of it, or they would wait for the commit forever
        board.fail(e)
        raise
    if rank != 0:  # reported, so no more beats (rank 0 is about to move the folder); rank 0 is watched
        board.wait_until(lambda: reshard.has_resharded(info) or board.check_alive([0]))
