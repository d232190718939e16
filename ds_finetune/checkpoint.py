"""Checkpoints: save through DeepSpeed, commit with a manifest, verify before loading, pick one to resume,
retention, and fault injection for the crash tests.

Commit protocol (SPEC §6): every rank writes its DeepSpeed files into `DIR/step_N/`, fsyncs and hashes the
files it owns, and sends the list to rank 0; rank 0 writes `manifest.json` to a temp name, fsyncs it,
renames it into place and fsyncs the folder. **The manifest's presence is the commit.** Only then is
`DIR/latest` replaced (temp + fsync + rename; same format as DeepSpeed's so its tools still work) and
are old checkpoints purged. Resume never trusts `latest`: it scans manifests, newest first, and verifies
sizes and sha256 before DeepSpeed unpickles anything (DeepSpeed loads with `weights_only=False`).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from ds_finetune.errors import UserError

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


# ------------------------------------------------------------------------------------- fault injection

def _fault_spec() -> tuple[str, int, int | None] | None:
    """DS_FINETUNE_FAULT=phase[:rankR][@stepN] -> (phase, rank, step). Test-only; off unless set."""
    return _parse_fault(os.environ.get("DS_FINETUNE_FAULT", "").strip())


@functools.lru_cache(maxsize=8)
def _parse_fault(raw: str) -> tuple[str, int, int | None] | None:
    if not raw:
        return None
    m = re.fullmatch(r"([a-z_]+)(?::rank(\d+))?(?:@step(\d+))?", raw)
    if not m:
        raise UserError(f"DS_FINETUNE_FAULT={raw!r}: write phase[:rankR][@stepN], e.g. after_shards:rank1@step4")
    return m.group(1), int(m.group(2) or 0), int(m.group(3)) if m.group(3) else None


FAULT_PHASES = ("mid_accum", "after_step", "before_save", "mid_shards", "after_shards", "after_manifest_tmp", "after_manifest_rename",
                "before_latest_rename", "after_latest_rename", "during_retention", "enospc")


def fault_point(phase: str, rank: int, step: int) -> None:
    """Kill the whole job at once, like a node crash, when DS_FINETUNE_FAULT names this phase, rank and
    step. "The job" is every process that inherited our DS_FINETUNE_FAULT: the ranks, the launcher and
    the CLI; launchers put ranks in other process groups (torchrun: other sessions), so no group kill fits."""
    spec = _fault_spec()
    if spec is None or spec[0] != phase or spec[1] != rank or (spec[2] is not None and spec[2] != step):
        return
    if phase == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected by DS_FINETUNE_FAULT)")
    print(f"[fault injection] SIGKILL at {phase} rank {rank} step {step}", flush=True)
    import psutil
    marker = os.environ["DS_FINETUNE_FAULT"]
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("DS_FINETUNE_FAULT") == marker:
                p.kill()
        except psutil.Error:
            pass
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------- file helpers

def hash_and_sync(path: Path) -> dict:
    """Size and sha256 of a file just written, and fsync it (the read comes from the page cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str, before_rename=None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if before_rename:
        before_rename()
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_tree(path: Path, on_renamed=None) -> None:
    """Crash-safe delete: rename out of the tag namespace first, so a crash leaves trash, never a half
    deleted checkpoint that looks like one."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.time_ns()}")
    os.replace(path, trash)
    if on_renamed:
        on_renamed()
    shutil.rmtree(trash, ignore_errors=True)


class _HashingFile:
    """What DeepSpeed's shards are written through: sha256 and size are computed as the bytes stream out
    (no second read of a multi-GB file), and the file is fsynced before it counts as written."""

    def __init__(self, path: str):
        self.file = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"size": self.size, "sha256": self.sha.hexdigest()}


def record_shard_writes(engine, rank: int, step: int) -> dict[str, dict]:
    """Route this save's `checkpoint_engine.save` calls through _HashingFile; returns {path: size/sha256},
    filled as DeepSpeed writes. Also where the `mid_shards` and `enospc` faults fire."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    import torch

    ce = engine.checkpoint_engine
    written: dict[str, dict] = {}
    if type(ce) is not TorchCheckpointEngine:  # another engine writes its own way: hash after the fact
        return written

    def save(state_dict, path):
        fault_point("enospc", rank, step)
        f = _HashingFile(path)
        try:
            torch.save(state_dict, f)
        finally:
            written[str(path)] = f.close()
        fault_point("mid_shards", rank, step)

    ce.save = save  # an instance attribute, replaced at every save: never nested
    return written


def disk_error(ckpt_dir: Path, err: BaseException) -> UserError:
    try:
        free = shutil.disk_usage(ckpt_dir if ckpt_dir.exists() else ckpt_dir.parent).free / 2**20
        free_text = f"{free:,.0f} MiB free"
    except OSError:
        free_text = "free space unknown"
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return UserError(f"checkpoint error: saving into {ckpt_dir} failed ({first}; {free_text}); the previous "
                     f"complete checkpoint is intact - free space or set checkpoint.dir, then --resume", exit_code=3)


# ------------------------------------------------------------------------------------------------ save

def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, trainer_state: dict,
                    keep_last: int, rank: int, world_size: int, write_extra=None) -> Path:
    """Save and commit `step_N`. Returns the tag dir. Every rank calls this at the same step.
    `write_extra(tag_dir)` runs on rank 0 after DeepSpeed's files are written; its files are committed too."""
    import deepspeed
    import torch.distributed as dist

    tag = tag_for_step(step)
    tag_dir = ckpt_dir / tag
    try:
        fault_point("before_save", rank, step)
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a leftover of a crashed or abandoned attempt: never mix files into it
                remove_tree(tag_dir)
        dist.barrier()
        written = record_shard_writes(engine, rank, step)
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        if rank == 0 and write_extra is not None:
            write_extra(tag_dir)
        fault_point("after_shards", rank, step)
        own = {str(Path(path).relative_to(tag_dir)): meta for path, meta in written.items()}
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        raise disk_error(ckpt_dir, e) from e
    parts = [None] * world_size
    dist.all_gather_object(parts, own)
    if rank == 0:
        files = {name: meta for part in parts for name, meta in part.items()}
        try:  # files no rank streamed (write_extra's, or a non-torch checkpoint engine's): hash them now
            for p in sorted(tag_dir.rglob("*")):
                name = str(p.relative_to(tag_dir))
                if p.is_file() and name not in files and p.name != MANIFEST and not p.name.startswith("."):
                    files[name] = hash_and_sync(p)
        except OSError as e:
            raise disk_error(ckpt_dir, e) from e
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "tag": tag,
            "step": step,
            "time": time.time(),
            "zero_stage": engine.zero_optimization_stage(),
            "world_size": world_size,
            "ds_finetune_version": _version(),
            "deepspeed_version": deepspeed.__version__,
            "trainer_state": trainer_state,
            "files": files,
        }
        try:
            fsync_dir(tag_dir)
            write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1),
                         before_rename=lambda: fault_point("after_manifest_tmp", rank, step))
            fault_point("after_manifest_rename", rank, step)
            write_atomic(ckpt_dir / LATEST, tag, before_rename=lambda: fault_point("before_latest_rename", rank, step))
            fault_point("after_latest_rename", rank, step)
        except OSError as e:
            raise disk_error(ckpt_dir, e) from e
        apply_retention(ckpt_dir, keep_last, newest_committed=step, rank=rank)
    dist.barrier()
    return tag_dir


def _version() -> str:
    from ds_finetune import __version__
    return __version__


def apply_retention(ckpt_dir: Path, keep_last: int, newest_committed: int, rank: int = 0) -> list[str]:
    """After `newest_committed` is committed: drop leftovers of crashed saves and trash, then keep only the
    newest `keep_last` complete checkpoints (0 keeps all). Never touches anything newer than the commit
    except unfinished leftovers, and never the commit itself."""
    removed = []
    for p in sorted(ckpt_dir.iterdir()):
        if p.name.startswith(TRASH_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
    complete = []
    for p in sorted(ckpt_dir.iterdir()):
        step = step_of_tag(p.name)
        if step is None or not p.is_dir():
            continue
        if not (p / MANIFEST).exists():
            if step != newest_committed:
                remove_tree(p, on_renamed=lambda: fault_point("during_retention", rank, newest_committed))
                removed.append(p.name)
        elif step <= newest_committed:
            complete.append((step, p))
    if keep_last > 0:
        for step, p in sorted(complete)[:-keep_last]:
            remove_tree(p, on_renamed=lambda: fault_point("during_retention", rank, newest_committed))
            removed.append(p.name)
    return removed


# ------------------------------------------------------------------------------------ verify / discover

@dataclass
class CheckpointInfo:
    tag: str
    path: Path
    step: int
    status: str                      # complete | incomplete | corrupt
    manifest: dict | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.manifest["files"].values()) if self.manifest else _du(self.path)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


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


def verify_files(tag_dir: Path, manifest: dict, hashes: bool = True) -> list[str]:
    problems = []
    for name, meta in sorted(manifest["files"].items()):
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"missing file {name}")
            continue
        size = path.stat().st_size
        if size != meta["size"]:
            problems.append(f"{name}: size {size} != {meta['size']} in the manifest")
        elif hashes:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            if h.hexdigest() != meta["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest (the file was changed or damaged)")
    return problems


def inspect_checkpoint(tag_dir: Path, hashes: bool = True) -> CheckpointInfo:
    step = step_of_tag(tag_dir.name)
    try:
        manifest = read_manifest(tag_dir)
    except ValueError as e:
        return CheckpointInfo(tag_dir.name, tag_dir, step if step is not None else -1, "corrupt", None, [str(e)])
    if manifest is None:
        return CheckpointInfo(tag_dir.name, tag_dir, step if step is not None else -1, "incomplete", None,
                              ["no manifest: the save never committed"])
    problems = verify_files(tag_dir, manifest, hashes)
    return CheckpointInfo(tag_dir.name, tag_dir, int(manifest.get("step", step or -1)),
                          "corrupt" if problems else "complete", manifest, problems)


def list_checkpoints(ckpt_dir: Path, hashes: bool = True) -> list[CheckpointInfo]:
    if not ckpt_dir.is_dir():
        return []
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and step_of_tag(p.name) is not None]
    return sorted((inspect_checkpoint(p, hashes) for p in tags), key=lambda c: c.step)


def has_checkpoints(ckpt_dir: Path) -> bool:
    return ckpt_dir.is_dir() and any(step_of_tag(p.name) is not None for p in ckpt_dir.iterdir())


def find_resumable_checkpoint(ckpt_dir: Path, hashes: bool = True) -> tuple[CheckpointInfo | None, list[str]]:
    """Newest complete, intact checkpoint, verifying newest first and stopping at the first good one.
    Returns it (or None) and one report line per newer checkpoint that was skipped."""
    if not ckpt_dir.is_dir():
        return None, []
    tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and step_of_tag(p.name) is not None),
                  key=lambda p: step_of_tag(p.name), reverse=True)
    skipped = []
    for p in tags:
        info = inspect_checkpoint(p, hashes)
        if info.status == "complete":
            return info, skipped
        skipped.append(f"skipping {info.status} checkpoint {p}: {'; '.join(info.problems)}")
    return None, skipped


# ----------------------------------------------------------------------------------------------- load

def load_checkpoint(engine, info: CheckpointInfo) -> dict:
    """Load a verified checkpoint into the engine (weights, optimizer, LR scheduler); returns client_state."""
    load_path, client_state = engine.load_checkpoint(str(info.path.parent), tag=info.tag, load_module_strict=True,
                                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"checkpoint error: DeepSpeed could not load {info.path}; run "
                        f"`ds-finetune ckpt verify {info.path}`")
    return client_state
