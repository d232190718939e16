"""Launching real training processes for the multi-process tests.

Bulk runs use torchrun (≈8 s a 2-rank start here, against ≈12 s for the `deepspeed` launcher, which the
signal and CLI tests use); both run the same `launch/train.py`. Every run starts in a new session so a
fault-injected SIGKILL of "our process group" kills exactly that job, never pytest.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(sys.executable).parent
TINY = ROOT / "configs" / "tiny.yaml"

# The configuration every exactness/fault test shares, so reference runs can be shared too:
# dropout on (RNG restore matters), grad_accum 2, a checkpoint every step.
BASE = [
    "train.max_steps=10", "train.micro_batch_size=2", "train.grad_accum=2", "train.warmup_steps=2",
    "model.config.attention_dropout=0.1", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
    "logging.progress_bar=false", "logging.tensorboard=false", "logging.sample_ids=true",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("DS_FINETUNE_CACHE", str(ROOT / "build" / "test-cache"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.pop("DS_FINETUNE_FAULT", None)
    env.update(extra or {})
    return env


def train_argv(out_dir: Path, overrides=(), nproc: int = 2, resume: str | None = None, flags=()) -> list[str]:
    if nproc == 1:
        argv = [PY, str(ROOT / "launch" / "train.py")]
    else:
        argv = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
                str(ROOT / "launch" / "train.py")]
    argv += ["--config", str(TINY)]
    if resume is not None:
        argv += ["--resume"] + ([] if resume == "auto" else [resume])
    argv += list(flags)
    return argv + [*BASE, *overrides, f"output_dir={out_dir}"]


def start(argv: list[str], env_extra: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen(argv, cwd=ROOT, env=child_env(env_extra), stdout=out, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def run(argv: list[str], env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, env=child_env(env_extra), capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


def train(out_dir: Path, overrides=(), nproc: int = 2, resume: str | None = None, flags=(),
          fault: str | None = None, expect_ok: bool = True) -> subprocess.CompletedProcess:
    proc = run(train_argv(out_dir, overrides, nproc, resume, flags),
               {"DS_FINETUNE_FAULT": fault} if fault else None)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def loss_reprs(rows: list[dict]) -> dict[int, str]:
    """step -> the loss exactly as written in the JSON (bitwise comparison)."""
    return {r["step"]: repr(r["loss"]) for r in rows}


def wait_for(predicate, timeout: float = 120, interval: float = 0.02) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def committed_steps(ckpt_dir: Path) -> list[int]:
    from ds_finetune.checkpoint import MANIFEST, step_of_tag
    if not ckpt_dir.is_dir():
        return []
    return sorted(step_of_tag(p.name) for p in ckpt_dir.iterdir()
                  if step_of_tag(p.name) is not None and (p / MANIFEST).exists())
