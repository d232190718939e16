"""Fault injection for the crash tests. Off unless DS_FINETUNE_FAULT is set.

    DS_FINETUNE_FAULT=phase[:rankR][@stepN]   (rank 0 and every step when omitted)

At the named phase on rank R (at step N) the whole job is SIGKILLed at once, like a node crash, or, for
the `enospc*` phases, the write fails with ENOSPC. `torn_shard` kills the job in the middle of a shard's
bytes (the file is left half written); `mid_shards` after a complete file; `async_write` and
`async_written` (checkpoint.async_save) in the background writer, after a file and after the last file,
while training goes on; `hang_convert` and `hang_verify` make the rank sleep for an hour after its
conversion share and before hashing its share of a checkpoint at resume; `in_reward` (GRPO) before each reward
function of a step's scoring.
"The job" is every process that inherited the same DS_FINETUNE_FAULT and DS_FINETUNE_FAULT_ID (the
ranks, the launcher and the CLI): launchers put ranks in other process groups (torchrun: other
sessions), so no group kill fits, and the id (set per launch by the tests) keeps two jobs with the same
spec on one machine apart. A process forked with its environment set after the fork (the tests' launch
server, whose launches are their own sessions) shows another process's environment in /proc: its job is
its process group, killed as well.

Every fault that fires prints one line, `[fault injection] ACTION at PHASE rank R step N` (ACTION: SIGKILL,
ENOSPC, sleeping S s, hanging), which the tests assert; a training process whose spec was aimed at its rank
and never fired ends with an error (`unfired_fault`), so a test with a wrong phase or step cannot pass
without its event.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import signal
import time

from ds_finetune.errors import UserError

PHASES = ("mid_accum", "after_step", "before_save", "torn_shard", "mid_shards", "after_shards", "after_manifest_tmp",
          "after_manifest_rename", "before_latest_rename", "after_latest_rename", "during_retention",
          "enospc", "enospc_manifest", "enospc_latest", "mid_convert", "hang_convert", "hang_verify", "slow_save",
          "async_write", "async_written", "mid_reference", "in_reward")


@functools.lru_cache(maxsize=8)
def parse_fault(raw: str) -> tuple[str, int, int | None] | None:
    if not raw:
        return None
    m = re.fullmatch(r"([a-z_]+)(?::rank(\d+))?(?:@step(\d+))?", raw)
    if not m or m.group(1) not in PHASES:
        raise UserError(f"DS_FINETUNE_FAULT={raw!r}: write phase[:rankR][@stepN] with a phase of "
                        f"{', '.join(PHASES)}; e.g. after_shards:rank1@step4")
    return m.group(1), int(m.group(2) or 0), int(m.group(3)) if m.group(3) else None


def _fires(phase: str, rank: int, step: int) -> bool:
    spec = parse_fault(os.environ.get("DS_FINETUNE_FAULT", "").strip())
    return spec is not None and spec[0] == phase and spec[1] == rank and spec[2] in (None, step)


_fired = False  # this process's spec fired


def fault_point(phase: str, rank: int, step: int) -> None:
    """Kill the job (or fail the write, for `enospc`) when DS_FINETUNE_FAULT names this phase, rank and step."""
    global _fired
    if not _fires(phase, rank, step):
        return
    _fired = True
    if phase == "slow_save":  # a save as long as a large model's (DS_FINETUNE_SLOW_SAVE_S seconds)
        seconds = float(os.environ.get("DS_FINETUNE_SLOW_SAVE_S", "35"))
        _announce(f"sleeping {seconds:g} s", phase, rank, step)
        time.sleep(seconds)
        return
    if phase.startswith("hang_"):  # a rank that hangs instead of crashing: it never reports anything
        _announce("hanging", phase, rank, step)
        time.sleep(3600)
        return
    if phase.startswith("enospc"):
        _announce("ENOSPC", phase, rank, step)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected by DS_FINETUNE_FAULT)")
    _announce("SIGKILL", phase, rank, step)
    kill_job()


def _announce(action: str, phase: str, rank: int, step: int) -> None:
    print(f"[fault injection] {action} at {phase} rank {rank} step {step}", flush=True)


def unfired_fault(rank: int) -> str | None:
    """The DS_FINETUNE_FAULT spec aimed at this rank if it never fired in this process, else None."""
    spec = parse_fault(os.environ.get("DS_FINETUNE_FAULT", "").strip())
    if spec is None or spec[1] != rank or _fired:
        return None
    return os.environ["DS_FINETUNE_FAULT"]


def _job_marker(environ) -> tuple:
    return environ.get("DS_FINETUNE_FAULT"), environ.get("DS_FINETUNE_FAULT_ID")


def kill_job() -> None:
    import psutil

    ours, survivors = _job_marker(os.environ), []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if _job_marker(p.environ()) != ours:
                continue
        except psutil.Error:  # another user's or an exited process: not one of ours
            continue
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
        except psutil.Error as e:
            survivors.append(f"{p.pid} ({e})")
    if survivors:
        print(f"[fault injection] could not kill {', '.join(survivors)}", flush=True)
    if _job_marker(psutil.Process().environ()) != ours:  # forked, its environment set after (see above)
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
