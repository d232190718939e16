"""Checkpoints: the trainer state, a `Checkpointer` that saves through DeepSpeed and commits with a
manifest, verification before anything is loaded, discovery for --resume, and retention.

Commit protocol: every rank writes its DeepSpeed files into `DIR/step_N/`, fsyncs and hashes the files
it owns, and sends the list to rank 0; rank 0 writes `manifest.json` to a temp name, fsyncs it, renames it
into place and fsyncs the folder. **The manifest's presence is the commit.** Only then is `DIR/latest`
replaced (temp + fsync + rename; same format as DeepSpeed's so its tools still work) and are old
checkpoints purged. Resume never trusts `latest`: it scans manifests, newest first, and verifies sizes
and sha256 before anything is unpickled; every load, DeepSpeed's included, goes through torch's safe
unpickler (`ds_internals.load_checkpoint_file`), so a crafted file cannot run code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ds_finetune.errors import UserError, first_line
from ds_finetune.faults import fault_point
from ds_finetune.files import HashingFile, fsync_dir, hash_and_sync, write_atomic

TAG_RE = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
LATEST = "latest"
TRASH_PREFIX = ".trash-"
MANIFEST_VERSION = 1


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def step_of_tag(name: str) -> int | None:
    m = TAG_RE.match(name)
    return int(m.group(1)) if m else None


def tag_dirs(ckpt_dir: Path) -> list[Path]:
    """Every `step_N` folder of a checkpoint dir, oldest first (the one scan every caller shares)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and step_of_tag(p.name) is not None),
                  key=lambda p: step_of_tag(p.name))


# ------------------------------------------------------------------------------------------ trainer state

@dataclass
class TrainState:
    """Progress that must survive a restart (with the engine's own state and every rank's RNG), and what
    the run is (checked on resume). Stored in the manifest: `to_manifest`/`from_manifest` are its only
    writer and reader."""
    step: int = 0               # optimizer steps done
    epoch: int = 0
    offset: int = 0             # units of this epoch's order already consumed
    consumed_samples: int = 0
    tokens: int = 0
    seed: int = 0
    global_batch: int = 0
    data_format_version: int = 0
    fingerprint: dict = field(default_factory=dict)
    eval_loss: float | None = None  # the latest evaluation, and the step it was run at
    eval_step: int = 0
    wandb_run_id: str | None = None  # one W&B run across resumes
    mix: dict = field(default_factory=dict)  # a mixture's position (data.MixtureOrder.position)

    def advance(self, position: dict, samples: int, tokens: int) -> None:
        """Past one optimizer step: the order's position after it (data.StepBatch.position), the samples
        and tokens it took."""
        for key, value in position.items():
            setattr(self, key, value)
        self.step += 1
        self.consumed_samples += samples
        self.tokens += tokens

    def to_manifest(self) -> dict:
        return asdict(self)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "TrainState":
        saved = manifest.get("trainer_state", {})
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


# ---------------------------------------------------------------------------------------- file helpers

def remove_tree(path: Path, on_renamed=None) -> None:
    """Crash-safe delete: rename out of the tag namespace first, so a crash leaves trash, never a half
    deleted checkpoint that looks like one."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.time_ns()}")
    os.replace(path, trash)
    if on_renamed:
        on_renamed()
    shutil.rmtree(trash, ignore_errors=True)


def record_shard_writes(engine, rank: int, step: int) -> dict[str, dict]:
    """Route this save's shard writes through HashingFile; returns {path: size/sha256}, filled as
    DeepSpeed writes (empty if its checkpoint engine writes its own way: then files are hashed after).
    Also where the `mid_shards` and `enospc` faults fire."""
    import torch

    from ds_finetune import ds_internals

    written: dict[str, dict] = {}

    def save(state_dict, path):
        fault_point("enospc", rank, step)
        f = HashingFile(path, tear=lambda: fault_point("torn_shard", rank, step))
        try:
            torch.save(state_dict, f)
        finally:
            written[str(path)] = f.close()
        fault_point("mid_shards", rank, step)

    ds_internals.route_checkpoint_writes(engine, save)
    return written


def disk_error(ckpt_dir: Path, err: BaseException) -> UserError:
    try:
        free = shutil.disk_usage(ckpt_dir if ckpt_dir.exists() else ckpt_dir.parent).free / 2**20
        free_text = f"{free:,.0f} MiB free"
    except OSError:
        free_text = "free space unknown"
    return UserError(f"checkpoint error: saving into {ckpt_dir} failed ({first_line(err)}; {free_text}); the previous "
                     f"complete checkpoint is intact - free space or set checkpoint.dir, then --resume", exit_code=3)


# ------------------------------------------------------------------------------------------ Checkpointer

class Checkpointer:
    """Built once per run, one on every rank: owns saving. The loop calls `after_step` after every
    optimizer step, `stop` when the ranks agreed to stop on a signal, and `close` at the end; the
    Checkpointer decides what is due, saves (now or in the background), commits, reports through `say`,
    and runs the final save and export. It also restores a native checkpoint."""

    def __init__(self, engine, ckpt_cfg, ckpt_dir: Path, rank: int, world: int, saved_step: int,
                 extra_client_state: dict, write_extra=None, trainable_only: bool = False,
                 export_to: Path | None = None, export_dtype: str = "fp32"):
        self.engine, self.cfg, self.dir, self.rank, self.world = engine, ckpt_cfg, ckpt_dir, rank, world
        self.export_to, self.export_dtype = export_to, export_dtype  # checkpoint.export_final
        self.trainable_only = trainable_only  # LoRA: the frozen base is not saved (it is fingerprinted)
        self.in_flight = None  # async_save: (BackgroundWrite, tag dir, trainer state) of the uncommitted save
        self.extra_client_state = extra_client_state  # constant for the run (e.g. param group names)
        self.write_extra = write_extra                # rank 0 writes more files into the tag dir
        self.saved_step, self.last_save_time = saved_step, time.time()

    # -- the loop's three calls (every rank, at the same step)

    def after_step(self, state: TrainState, writing_anywhere: bool, time_to_save: bool, say) -> None:
        """After optimizer step `state.step`: commit a background save once no rank is still writing it
        (the ranks agreed on both flags in the step's all-reduce), then save if one is due."""
        if self.in_flight is not None and not writing_anywhere:
            self._commit_in_flight(say)
        reason = self.due(state.step, time_to_save)
        if reason:
            self._save(state, reason, say)

    def stop(self, state: TrainState, say) -> None:
        """The ranks agreed to stop after this step (SIGTERM/SIGINT): save unless disabled, and commit."""
        path = self._save(state, "stop requested", say) if self.cfg.save_on_signal else None
        self._commit_in_flight(say)  # this save, or one still in flight: committed before the exit
        if path is not None:
            say(f"[ds-finetune] stopped by signal at step {state.step}; resume with --resume (checkpoint {path})")
        else:
            say(f"[ds-finetune] stopped by signal at step {state.step} without saving "
                f"(checkpoint.save_on_signal=false)")

    def close(self, state: TrainState, say) -> None:
        """The run is done: the final save if one is due, every save committed, the final export."""
        if self.needs_final_save(state.step):
            self._save(state, "final", say)
        self._commit_in_flight(say)
        if self.export_to is not None and self.rank == 0:
            # Rank 0 alone, and no rank waits for it: an export longer than the process-group timeout would
            # otherwise end in the NCCL watchdog's abort. The other ranks exit; the launcher waits for all.
            from ds_finetune.export import export_checkpoint  # export imports this module
            out = export_checkpoint(self.dir / tag_for_step(state.step), self.export_to, self.export_dtype)
            say(f"[ds-finetune] exported a Hugging Face model to {out}")

    def _save(self, state: TrainState, reason: str, say) -> Path:
        self._commit_in_flight(say)  # at most one save in flight
        path = self.save(state)
        written = "writing it in the background" if self.in_flight else "saved"
        say(f"[ds-finetune] {written} {path} ({reason})")
        return path

    def _commit_in_flight(self, say) -> None:
        path = self.finish()
        if path is not None:
            say(f"[ds-finetune] saved {path} (written in the background)")

    # -- the pieces

    def time_due(self) -> bool:
        """Rank 0's clock says `every_minutes` have passed (the ranks agree on it through the step's reduce)."""
        return (self.rank == 0 and self.cfg.every_minutes > 0
                and time.time() - self.last_save_time >= 60 * self.cfg.every_minutes)

    def due(self, step: int, time_due: bool) -> str | None:
        """Why a save is due after `step`, or None."""
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            return "every_steps"
        return "every_minutes" if time_due else None

    def needs_final_save(self, step: int) -> bool:
        return (self.cfg.save_final or self.cfg.export_final) and self.saved_step != step

    def save(self, state: TrainState) -> Path:
        """Save `state.step`: written and committed now, or with `async_save` handed to a background writer
        (committed later by `finish`). A save still in flight is committed first: at most one at a time."""
        from ds_finetune.async_save import BackgroundWrite
        from ds_finetune.dist import all_gather, capture_rng

        self.finish()
        client_state = {"rng_states": all_gather(capture_rng()), **self.extra_client_state}
        if self.cfg.async_save:
            background = BackgroundWrite(self.rank, state.step)
            path, _ = write_files(self.engine, self.dir, state.step, client_state, self.rank, self.write_extra,
                                  self.trainable_only, background)
            background.start()
            self.in_flight = (background, path, state.to_manifest())
        else:
            path = save_checkpoint(self.engine, self.dir, state.step, client_state, state.to_manifest(),
                                   self.cfg.keep_last, self.rank, self.world, self.write_extra, self.cfg.keep_best,
                                   self.trainable_only)
        self.saved_step, self.last_save_time = state.step, time.time()
        return path

    def before_update(self) -> None:
        """The optimizer is about to change the weights: a background save must have its snapshot by now."""
        if self.in_flight is not None:
            self.in_flight[0].wait_until_copied()

    def writing(self) -> bool:
        """This rank's background write is still running (the ranks agree on it in the step's reduce)."""
        return self.in_flight is not None and not self.in_flight[0].done()

    def finish(self) -> Path | None:
        """Commit the save in flight once this rank's files are durable (waiting for them); every rank calls
        it at the same step. Returns the committed tag dir, or None when no save was in flight."""
        if self.in_flight is None:
            return None
        background, tag_dir, trainer_state = self.in_flight
        self.in_flight = None
        try:
            own = background.relative(tag_dir)
        except (OSError, RuntimeError) as e:  # sent to every rank through the commit
            own = first_line(e)
        commit_files(self.engine, tag_dir, background.step, own, trainer_state, self.cfg.keep_last, self.rank,
                     self.world, self.cfg.keep_best)
        return tag_dir

    def restore(self, info) -> list:
        """Load a verified native checkpoint into the engine (weights, optimizer, LR schedule); returns
        every saved rank's RNG state."""
        from ds_finetune import ds_internals

        ds_internals.route_checkpoint_reads(self.engine)  # DeepSpeed's loads through the safe unpickler
        load_path, client_state = self.engine.load_checkpoint(
            str(info.path.parent), tag=info.tag, load_module_strict=not self.trainable_only,
            load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise UserError(f"checkpoint error: DeepSpeed could not load {info.path}; run "
                            f"`ds-finetune ckpt verify {info.path}`")
        return client_state["rng_states"]


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, trainer_state: dict,
                    keep_last: int, rank: int, world_size: int, write_extra=None, keep_best: bool = False,
                    trainable_only: bool = False) -> Path:
    """Save and commit `step_N`. Returns the tag dir. Every rank calls this at the same step.
    `write_extra(tag_dir)` runs on rank 0 after DeepSpeed's files are written; its files are committed too."""
    tag_dir, own = write_files(engine, ckpt_dir, step, client_state, rank, write_extra, trainable_only)
    commit_files(engine, tag_dir, step, own, trainer_state, keep_last, rank, world_size, keep_best)
    return tag_dir


def write_files(engine, ckpt_dir: Path, step: int, client_state: dict, rank: int, write_extra=None,
                trainable_only: bool = False, background=None) -> tuple[Path, dict]:
    """DeepSpeed's save of `step_N` on this rank: (tag dir, {file: size/sha256} of the files it wrote), or,
    with a `background` writer, the files collected for it to write (and {})."""
    import torch.distributed as dist

    from ds_finetune import ds_internals

    tag_dir = ckpt_dir / tag_for_step(step)
    try:
        fault_point("before_save", rank, step)
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a leftover of a crashed or abandoned attempt: never mix files into it
                remove_tree(tag_dir)
        dist.barrier()
        if background is None:
            written = record_shard_writes(engine, rank, step)
        else:
            written = {}
            ds_internals.route_checkpoint_writes(engine, background.collect)
        engine.save_checkpoint(str(ckpt_dir), tag=tag_dir.name, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=trainable_only)
        if rank == 0 and write_extra is not None:
            write_extra(tag_dir)
        fault_point("after_shards", rank, step)
        return tag_dir, {str(Path(path).relative_to(tag_dir)): meta for path, meta in written.items()}
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        raise disk_error(ckpt_dir, e) from e


def commit_files(engine, tag_dir: Path, step: int, own: dict | str, trainer_state: dict, keep_last: int,
                 rank: int, world_size: int, keep_best: bool = False) -> None:
    """Every rank sends its files (or its write error, a string) to rank 0, which commits `step_N` and
    applies retention; every rank returns once committed, or raises the same error."""
    from ds_finetune.dist import all_gather, decide

    parts = all_gather(own)
    ckpt_dir = tag_dir.parent

    def commit():
        failed = [part for part in parts if isinstance(part, str)]
        if failed:
            raise disk_error(ckpt_dir, OSError(failed[0]))
        files = {name: meta for part in parts for name, meta in part.items()}
        _commit(engine, tag_dir, step, files, trainer_state, rank, world_size)
        apply_retention(ckpt_dir, keep_last, newest_committed=step, rank=rank, keep_best=keep_best)

    decide(commit, runs_here=rank == 0)


def _commit(engine, tag_dir: Path, step: int, files: dict, trainer_state: dict, rank: int, world_size: int) -> None:
    """Rank 0: hash what no rank streamed, write the manifest (the commit), then point `latest` at it."""
    import deepspeed

    from ds_finetune import __version__

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


def remove_checkpoints(ckpt_dir: Path) -> None:
    """--overwrite: every checkpoint of the run goes (each crash-safely)."""
    for p in tag_dirs(ckpt_dir):
        remove_tree(p)


def best_checkpoint(ckpt_dir: Path) -> Path | None:
    """The committed checkpoint with the lowest eval loss measured at its own step (manifests only)."""
    scored = []
    for p in tag_dirs(ckpt_dir):
        try:
            manifest = read_manifest(p)
        except ValueError:
            continue
        state = TrainState.from_manifest(manifest) if manifest else None
        if state is not None and state.eval_loss is not None and state.eval_step == state.step:
            scored.append((state.eval_loss, state.step, p))
    return min(scored)[2] if scored else None


def apply_retention(ckpt_dir: Path, keep_last: int, newest_committed: int, rank: int = 0,
                    keep_best: bool = False) -> list[str]:
    """After `newest_committed` is committed: drop leftovers of crashed saves and trash, then keep only the
    newest `keep_last` complete checkpoints (0 keeps all) and, with `keep_best`, the best by eval loss.
    Never touches anything newer than the commit except unfinished leftovers, and never the commit itself."""
    for p in sorted(ckpt_dir.iterdir()):
        if p.name.startswith(TRASH_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
    removed, complete = [], []
    for p in tag_dirs(ckpt_dir):
        step = step_of_tag(p.name)
        if not (p / MANIFEST).exists():
            if step != newest_committed:
                remove_tree(p, on_renamed=lambda: fault_point("during_retention", rank, newest_committed))
                removed.append(p.name)
        elif step <= newest_committed:
            complete.append(p)
    if keep_last > 0:
        best = best_checkpoint(ckpt_dir) if keep_best else None
        for p in complete[:-keep_last]:
            if p == best:
                continue
            remove_tree(p, on_renamed=lambda: fault_point("during_retention", rank, newest_committed))
            removed.append(p.name)
    return removed


# ---------------------------------------------------------------------------------------------- manifest

def read_manifest(tag_dir: Path) -> dict | None:
    """The manifest, None when absent (an uncommitted save); a damaged one raises ValueError."""
    path = tag_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no file list")
        return manifest
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{MANIFEST} is unreadable ({e})")
