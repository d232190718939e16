"""The checkpoint folder: `step_N` tags, the manifest (its presence is the commit; it carries the trainer
state, `ds_finetune.state`), crash-safe removal and retention (keep_last, keep_best)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from ds_finetune.faults import fault_point
from ds_finetune.state import TrainState

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


# ---------------------------------------------------------------------------------------------- removal

def remove_tree(path: Path, on_renamed=None) -> None:
    """Crash-safe delete: rename out of the tag namespace first, so a crash leaves trash, never a half
    deleted checkpoint that looks like one."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.time_ns()}")
    os.replace(path, trash)
    if on_renamed:
        on_renamed()
    shutil.rmtree(trash, ignore_errors=True)


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
