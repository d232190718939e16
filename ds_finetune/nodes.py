"""Multi-node checks that run inside every training process.

`check_shared_checkpoint_dir`: a checkpoint is written by every rank into one folder and read back by every
rank on resume, so all nodes must see the same checkpoint dir. A node-local `output_dir` (a relative path
resolved in another working directory, a /tmp or local-disk path, a mount missing on one node) trains
fine and only fails at the first resume with "missing shard" — or silently resumes rank 0's view. So at
every start each rank writes a probe file named with a per-run nonce and its rank, and rank 0 checks that
it sees them all. Cost: three small collectives and one file per rank (a few ms).

The nonce is fresh per start (drawn by rank 0, broadcast), so a leftover probe can never vouch for a
node, and on NFS the lookup of a never-seen name is not answered from a cached negative entry.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

from ds_finetune.dist import all_gather, decide
from ds_finetune.errors import UserError

PROBE_PREFIX = ".ds-finetune-probe-"
# Some network filesystems publish a new file to other clients with a delay; only a probe still
# missing after this long (rank 0 re-checks only while one is missing) counts as "not shared".
VISIBILITY_GRACE_S = 2.0
STALE_PROBE_AGE_S = 600  # leftovers of a start killed between writing and removing its probe


def probe_path(ckpt_dir: Path, nonce: str, rank: int) -> Path:
    return ckpt_dir / f"{PROBE_PREFIX}{nonce}-rank{rank}"


def probe_text(nonce: str, rank: int) -> str:
    return f"{nonce} {rank}\n"


def write_probe(ckpt_dir: Path, nonce: str, rank: int) -> str | None:
    """Write this rank's probe; None, or why it could not (as text, for rank 0's message)."""
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe_path(ckpt_dir, nonce, rank).write_text(probe_text(nonce, rank))
    except OSError as e:
        return e.strerror or str(e)
    return None


def _sees_probe(ckpt_dir: Path, nonce: str, rank: int) -> bool:
    try:
        return probe_path(ckpt_dir, nonce, rank).read_text() == probe_text(nonce, rank)
    except (OSError, UnicodeDecodeError):
        return False


def unseen_ranks(ckpt_dir: Path, nonce: str, world: int, grace_s: float = VISIBILITY_GRACE_S) -> list[int]:
    """Ranks whose probe rank 0 cannot read (after the grace period, if any is missing)."""
    missing = [r for r in range(world) if not _sees_probe(ckpt_dir, nonce, r)]
    deadline = time.monotonic() + grace_s
    while missing and time.monotonic() < deadline:
        time.sleep(0.1)
        missing = [r for r in missing if not _sees_probe(ckpt_dir, nonce, r)]
    return missing


def _ranks_text(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ",".join(map(str, ranks))


def describe_nodes(ranks: list[int], reports: list[dict]) -> str:
    """'node 1 (host-b: ranks 2-3), node 2 (host-c: rank 4)' — grouped by node, in rank order."""
    groups: dict[tuple, list[int]] = {}
    for r in ranks:
        groups.setdefault((reports[r]["node_rank"], reports[r]["host"]), []).append(r)
    parts = []
    for (node_rank, host), rs in groups.items():
        parts.append(f"node {node_rank} ({host}: {_ranks_text(rs)})" if node_rank is not None
                     else f"{host} ({_ranks_text(rs)})")
    return ", ".join(parts)


def shared_dir_verdict(ckpt_dir: Path, nonce: str, reports: list[dict],
                       grace_s: float = VISIBILITY_GRACE_S) -> str | None:
    """Rank 0's judgement from every rank's report ({host, node_rank, error}): None, or the one-line error."""
    unwritable = [r for r, rep in enumerate(reports) if rep["error"]]
    if unwritable:
        first = reports[unwritable[0]]["error"]
        return (f"checkpoint dir error: {describe_nodes(unwritable, reports)} cannot write into {ckpt_dir} ({first}); "
                f"make output_dir (or checkpoint.dir) a folder every node can write, at the same path on every node")
    unseen = unseen_ranks(ckpt_dir, nonce, len(reports), grace_s)
    if unseen:
        return (f"checkpoint dir error: {ckpt_dir} is not shared between the nodes: rank 0 on {reports[0]['host']} "
                f"cannot see the files that {describe_nodes(unseen, reports)} wrote there, so their checkpoint shards "
                f"would be missing on resume; put output_dir (or checkpoint.dir) on a filesystem every node mounts "
                f"at the same path (NFS, Lustre, ...) - a relative path is resolved in each node's working directory")
    return None


def remove_stale_probes(ckpt_dir: Path, nonce: str, now: float | None = None) -> None:
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(ckpt_dir))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(PROBE_PREFIX) and nonce not in entry.name:
            try:
                if now - entry.stat().st_mtime > STALE_PROBE_AGE_S:
                    os.unlink(entry.path)
            except OSError:
                pass


def check_shared_checkpoint_dir(ckpt_dir: Path, rank: int, world: int) -> None:
    """Every rank calls this at start, before a checkpoint is picked or written. Raises the same UserError
    on every rank when some node does not see rank 0's checkpoint dir (or cannot write it)."""
    nonce = decide(lambda: secrets.token_hex(8), runs_here=rank == 0)
    error = write_probe(ckpt_dir, nonce, rank)
    node_rank = os.environ.get("CROSS_RANK", os.environ.get("GROUP_RANK"))  # DeepSpeed's launch.py / torchrun
    # Also the barrier: every probe is written before rank 0 looks.
    reports = all_gather({"host": socket.gethostname(), "error": error,
                          "node_rank": int(node_rank) if node_rank is not None else None})

    def judge():
        verdict = shared_dir_verdict(ckpt_dir, nonce, reports)
        remove_stale_probes(ckpt_dir, nonce)
        if verdict is not None:
            raise UserError(verdict)

    try:
        decide(judge, runs_here=rank == 0)
    finally:
        if error is None:
            try:
                probe_path(ckpt_dir, nonce, rank).unlink()
            except OSError:
                pass
