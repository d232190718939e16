"""Resume: choose the checkpoint, check that this run can continue it, and convert it when the ZeRO stage
or world size changed.

Two calls from setup: `plan` before the model exists (it decides the batch layout and converts),
`load_converted_weights` into the model before the engine is built; once the engine exists,
`Checkpointer.load(plan)` restores the engine, each rank's RNG and the trainer's progress.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ds_finetune.checkpoint import layout as ckpt, reshard, verify
from ds_finetune.checkpoint.convert import convert, needs_conversion
from ds_finetune.checkpoint.verify import CheckpointInfo, hash_together
from ds_finetune.config import RunConfig
from ds_finetune.data import DATA_FORMAT_VERSION
from ds_finetune.dist import barrier, decide
from ds_finetune.errors import UserError
from ds_finetune.files import fsync_dir, write_atomic
from ds_finetune.fingerprint import changed_exact_keys
from ds_finetune.messages import say
from ds_finetune.optim import check_convertible, check_same_optimizer
from ds_finetune.metrics import metrics_lines
from ds_finetune.rendezvous import scratch_folder
from ds_finetune.sampler import BatchLayout
from ds_finetune.state import TrainState


@dataclass(frozen=True)
class ResumePlan:
    """What this run continues (source None: a fresh start) and how."""
    source: CheckpointInfo | None
    layout: BatchLayout           # a resumed run keeps the checkpoint's global batch on any world size
    fingerprint: dict             # what this run is (config_fingerprint), checked against the source's
    converted: reshard.ConvertedCopy | None  # the source converted for another stage or world size


def plan(cfg: RunConfig, args, rank: int, world: int, fingerprint_of) -> ResumePlan:
    """Choose the checkpoint (--resume, --overwrite, --discard-newer), check that this run continues it
    (`fingerprint_of(global_batch)` is this run's fingerprint), and convert it if the ZeRO stage or world
    size changed. Every rank calls it and gets the same plan."""
    source = choose_checkpoint(cfg, args.resume, args.overwrite, args.discard_newer, rank, world)
    layout = resolve_layout(cfg, world, source, rank == 0)
    fingerprint = fingerprint_of(layout.global_batch)
    if source is not None:
        check_resumable(source, fingerprint, args.allow_config_change)
        if rank == 0:
            say_sequence_parallel_change(source, fingerprint)
        if args.discard_newer:
            discard_newer(source, cfg, rank)
    elif args.overwrite and rank == 0:
        ckpt.remove_checkpoints(cfg.checkpoint_dir)
    converted = None
    if needs_conversion(source, cfg.train.zero_stage, world):
        check_convertible(cfg.train.optimizer)
        converted = convert(source, cfg.train.zero_stage, world, rank, say)
    barrier()
    return ResumePlan(source, layout, fingerprint, converted)


def load_converted_weights(resume_plan: ResumePlan, model) -> None:
    """A converted checkpoint's weights into the model, before the engine is built (one tensor at a time)."""
    if resume_plan.converted is not None:
        reshard.load_weights(model, resume_plan.converted)


# ------------------------------------------------------------------------------------------------ choose

def choose_checkpoint(cfg: RunConfig, resume: str | None, overwrite: bool, discard_newer: bool,
                      rank: int, world: int) -> CheckpointInfo | None:
    """The checkpoint to continue (None: start fresh). `resume` is None, "auto" or a path. The hashing,
    which grows with the model, is split among the ranks and waited for on files; then rank 0 decides
    and the others receive its decision or its error."""
    checked = {}
    if resume is not None and cfg.checkpoint.verify_hashes:
        with scratch_folder(cfg.checkpoint_dir, rank) as scratch:  # a folder every node sees (checked before)
            checked = _hash_candidates(cfg, resume, scratch, rank, world)
    return decide(lambda: _choose_on_rank0(cfg, resume, overwrite, discard_newer, checked), runs_here=rank == 0)


def _hash_candidates(cfg: RunConfig, resume: str, scratch: Path, rank: int, world: int) -> dict[str, list[str]]:
    """Hash the checkpoints --resume looks at (newest first, up to the first intact one; or the one
    named), each rank a share of every one's files. {tag folder: problems}, the same on every rank."""
    candidates = [Path(resume)] if resume != "auto" else list(reversed(ckpt.tag_dirs(cfg.checkpoint_dir)))
    checked = {}
    for tag_dir in candidates:
        try:
            manifest = ckpt.read_manifest(tag_dir) if tag_dir.is_dir() else None
        except ValueError:
            manifest = None
        if manifest is None:
            continue  # nothing to hash; rank 0 reports it
        checked[str(tag_dir)] = hash_together(tag_dir, manifest, scratch / tag_dir.name, rank, world, say)
        if not checked[str(tag_dir)]:
            break
    return checked


def _choose_on_rank0(cfg: RunConfig, resume: str | None, overwrite: bool, discard_newer: bool,
                     checked: dict | None = None) -> CheckpointInfo | None:
    ckpt_dir, hashes = cfg.checkpoint_dir, cfg.checkpoint.verify_hashes
    if resume is None:
        if verify.has_checkpoints(ckpt_dir) and not overwrite:
            raise UserError(f"{ckpt_dir} already holds checkpoints; pass --resume to continue that run or "
                            f"--overwrite to delete them and start over")
        _say_metrics_replaced(cfg)
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"checkpoint error: {path}: no such checkpoint folder; see `ds-finetune ckpt list "
                            f"{cfg.output_dir}`")
        info = verify.inspect_checkpoint(path, hashes, checked)
        if info.status != "complete":
            raise UserError(f"checkpoint error: {path} is {info.status} ({'; '.join(info.problems)[:300]}); "
                            f"pick another with `ds-finetune ckpt list {path.parent}`")
        # A later --resume would pick a newer committed checkpoint of this run: the abandoned branch.
        newer = [p.name for p in ckpt.tag_dirs(ckpt_dir)
                 if ckpt.step_of_tag(p.name) > info.step and (p / ckpt.MANIFEST).exists()]
        if newer and not discard_newer:
            raise UserError(f"checkpoint error: {path} is older than {', '.join(newer)} in {ckpt_dir}; resuming "
                            f"from it starts another branch - pass --discard-newer to move the newer checkpoints "
                            f"(and their metrics lines) aside into {ckpt_dir}/discarded-*/, or --resume "
                            f"without a path to continue from the newest")
        return info
    info, skipped = verify.find_resumable_checkpoint(ckpt_dir, hashes, checked)
    for line in skipped:
        say(line)
    if info is None:
        corrupt = [line for line in skipped if line.startswith("skipping corrupt")]
        if corrupt:  # damage, not an unfinished first save: never throw the run away silently
            raise UserError(f"checkpoint error: no checkpoint in {ckpt_dir} verifies ("
                            + "; ".join(line.removeprefix("skipping ") for line in skipped)[:1500]
                            + "); nothing was changed - restore the damaged files, resume one with --resume PATH "
                              "after `ds-finetune ckpt verify`, or pass --overwrite to start over")
        say(f"no complete checkpoint in {ckpt_dir}: starting fresh"
            + (" (unfinished saves are removed at the first commit)" if skipped else ""))
        _say_metrics_replaced(cfg)
    return info


def _say_metrics_replaced(cfg: RunConfig) -> None:
    """A fresh start rewrites metrics.jsonl: say so before it happens when an earlier attempt left lines."""
    path = Path(cfg.output_dir) / "metrics.jsonl"
    if path.exists() and path.stat().st_size > 0:
        with path.open(encoding="utf-8", errors="replace") as f:
            lines = sum(1 for _ in f)
        say(f"{path} holds {lines} lines of an earlier attempt; starting fresh replaces them")


def discard_newer(info: CheckpointInfo, cfg: RunConfig, rank: int) -> None:
    """--discard-newer: move every checkpoint of this run newer than `info` (newest first, so a crash
    leaves a consistent prefix of the run) and their metrics lines into `discarded-<time>/`; never deletes."""
    ckpt_dir, output_dir = cfg.checkpoint_dir, Path(cfg.output_dir)

    def move_aside():
        newer = [p for p in ckpt.tag_dirs(ckpt_dir) if ckpt.step_of_tag(p.name) > info.step]
        if not newer:
            return
        aside = ckpt_dir / f"discarded-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        aside.mkdir()
        metrics = output_dir / "metrics.jsonl"
        if metrics.exists():
            lines = [line for step, line in metrics_lines(metrics) if step > info.step]
            write_atomic(aside / "metrics.jsonl", "".join(line + "\n" for line in lines))
        for p in reversed(newer):
            os.replace(p, aside / p.name)
        fsync_dir(ckpt_dir)
        if info.path.parent == ckpt_dir:
            write_atomic(ckpt_dir / ckpt.LATEST, info.tag)
        say(f"moved {', '.join(p.name for p in newer)} aside into {aside}")

    decide(move_aside, runs_here=rank == 0)


def check_resumable(info: CheckpointInfo, fingerprint: dict, allow_change: bool) -> None:
    """Refuse, from the manifest alone (nothing unpickled yet), a checkpoint this run cannot continue."""
    saved = TrainState.from_manifest(info.manifest)
    if saved.data_format_version != DATA_FORMAT_VERSION:
        raise UserError(f"checkpoint error: {info.path} uses data format {saved.data_format_version}, this "
                        f"version uses {DATA_FORMAT_VERSION}; resume with the ds-finetune version that saved it")
    changed = changed_exact_keys(saved.fingerprint, fingerprint)
    check_same_optimizer(saved.fingerprint, fingerprint, info.path)  # even under --allow-config-change
    if changed and not allow_change:
        raise UserError(f"config error: resuming {info.path} with changed {', '.join(changed)} would not continue "
                        f"the same run; restore them, or pass --allow-config-change to continue anyway")
    if changed:
        say(f"warning: continuing with changed {', '.join(changed)} (--allow-config-change)")


def say_sequence_parallel_change(info: CheckpointInfo, fingerprint: dict) -> None:
    """SP is not part of the exact fingerprint (like the ZeRO stage: the same steps to float noise), but it
    is recorded, and a resume on another degree says so."""
    was = TrainState.from_manifest(info.manifest).fingerprint.get("harmless", {}).get("train.sequence_parallel", 1)
    now = fingerprint["harmless"]["train.sequence_parallel"]
    if was != now:
        say(f"sequence parallelism changed: {info.path.name} was saved at train.sequence_parallel={was}, this run "
            f"uses {now} (the same steps to float noise; ZeRO partitions over all ranks either way)")


def resolve_layout(cfg: RunConfig, world: int, resume_from: CheckpointInfo | None, is_main: bool) -> BatchLayout:
    """This run's batch layout; a resumed run keeps the checkpoint's global batch on any world size."""
    saved_global_batch = TrainState.from_manifest(resume_from.manifest).global_batch if resume_from else None
    micro, accum, global_batch = cfg.batch_layout(world, keep_global_batch=saved_global_batch)
    dp = cfg.data_parallel_size(world)  # under sequence parallelism, the groups that take different sequences
    if is_main and (micro, accum) != cfg.batch_layout(world)[:2]:
        groups = f"{world} ranks" if dp == world else f"{dp} data-parallel groups"
        say(f"keeping the checkpoint's global batch {global_batch} on {groups}: grad_accum={accum} "
            f"(micro_batch_size={micro})")
    return BatchLayout(micro, accum, dp)
