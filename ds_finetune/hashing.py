"""File hashes that ranks share and runs remember: one home for both.

A file's sha256 is remembered in one folder, `memo_dir()` (`$DS_FINETUNE_CACHE` or ~/.cache/ds-finetune,
then `file-hashes/`), keyed by the file's resolved path and valid while its size, mtime and inode are
unchanged. Training (the data files, a LoRA base's weights) and `ckpt export --merge` (the base again) all
use it, so a restart or an export reads a large file again only when it changed. The ranks of a job split
a set of files by size (`share_of_files`) and gather what each hashed (`hash_shared`); resume verifies a
checkpoint's files with the same split.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ds_finetune.files import replace_file, sha256_file


def default_cache_dir() -> Path:
    """Where the tokenized-data cache (unless data.cache_dir says otherwise) and the hash memo live."""
    return Path(os.environ.get("DS_FINETUNE_CACHE", Path.home() / ".cache" / "ds-finetune"))


def memo_dir() -> Path:
    return default_cache_dir() / "file-hashes"


def remembered_sha256(path: Path, memo: Path | None) -> str:
    """The file's sha256, from the memo folder `memo` when the file is unchanged since it was hashed."""
    if memo is None:
        return sha256_file(path)
    st = path.stat()
    version = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    entry = memo / (hashlib.sha256(version["path"].encode()).hexdigest()[:32] + ".json")
    try:
        saved = json.loads(entry.read_text())
        if {k: saved.get(k) for k in version} == version:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass  # no memo yet, or a torn/foreign one: hash again
    digest = sha256_file(path)
    try:
        memo.mkdir(parents=True, exist_ok=True)
        # Several ranks may write the same memo at once (replace_file's temp names are unique). No fsync:
        # a memo lost in a crash only costs a re-hash.
        replace_file(entry, lambda f: f.write(json.dumps({**version, "sha256": digest}).encode()), durable=False)
    except OSError:
        pass  # a read-only cache dir only costs the next start a re-hash
    return digest


def share_of_files(files: dict, rank: int, world: int) -> list[str]:
    """This rank's share of `files` ({name: {"size": ...}}, e.g. a manifest's) for hashing, balanced by
    size (largest first, each to the least loaded rank), the same on every rank."""
    loads, mine = [0] * world, []
    for name in sorted(files, key=lambda n: (-files[n]["size"], n)):
        r = loads.index(min(loads))
        loads[r] += files[name]["size"]
        if r == rank:
            mine.append(name)
    return mine


def hash_shared(paths: dict[str, Path], board=None) -> dict[str, str]:
    """{name: sha256} of `paths` (remembered). With a `rendezvous.Rendezvous`, each rank hashes its share
    and every rank gets all, waiting on files rather than in a collective (a 70B base is ~140 GB)."""
    if board is None:
        return {name: remembered_sha256(path, memo_dir()) for name, path in paths.items()}
    mine = share_of_files({name: {"size": path.stat().st_size} for name, path in paths.items()},
                          board.rank, board.world)

    def hashed(name: str) -> str:
        board.beat()
        return remembered_sha256(paths[name], memo_dir())

    return dict(sorted(kv for part in board.gather(lambda: {n: hashed(n) for n in mine}) for kv in part.items()))
