"""Verifying and finding checkpoints: a checkpoint's status from its manifest (sizes, and sha256 unless
told not to), before anything in it is unpickled, then whether torch's safe unpickler accepts its pickled
files; every checkpoint of a run; the newest intact one for --resume."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ds_finetune.checkpoint.layout import read_manifest, step_of_tag, tag_dirs
from ds_finetune.checkpoint.stripes import stripe_bytes_of, stripe_digest
from ds_finetune.errors import UserError, first_line
from ds_finetune.faults import fault_point
from ds_finetune.files import sha256_file
from ds_finetune.hashing import share_of_files
from ds_finetune.rendezvous import Meter, Rendezvous


@dataclass
class CheckpointInfo:
    tag: str
    path: Path
    step: int
    status: str                      # complete | incomplete | corrupt | unsafe
    manifest: dict | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        if self.manifest:
            return sum(f["size"] for f in self.manifest["files"].values())
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def verify_files(tag_dir: Path, manifest: dict, hashes: bool = True, progress=None) -> list[str]:
    """What is wrong with the files the manifest lists (sizes, and sha256 unless `hashes` is false);
    `progress(n)` is called as n more bytes are hashed."""
    return [problem for name, meta in sorted(manifest["files"].items())
            for problem in file_problems(tag_dir, name, meta, hashes, progress)]


def file_problems(tag_dir: Path, name: str, meta: dict, hashes: bool = True, progress=None,
                  rank: int | None = None) -> list[str]:
    """What is wrong with one file the manifest lists; `rank`: of a striped file (`stripes.py`), hash only
    that rank's stripes (else every rank's)."""
    path = tag_dir / name
    if not path.is_file():
        return [f"missing file {name}"]
    size = path.stat().st_size
    if size != meta["size"]:
        return [f"{name}: size {size} != {meta['size']} in the manifest"]
    if hashes and not content_matches(path, meta, progress, rank):
        return [f"{name}: sha256 differs from the manifest (the file was changed or damaged)"]
    return []


def content_matches(path: Path, meta: dict, progress=None, rank: int | None = None) -> bool:
    """Whether the file's bytes hash as the manifest says: one sha256, or one a rank's stripes of a file
    that several ranks wrote (all ranks', or `rank`'s)."""
    if "stripes_sha256" not in meta:
        return sha256_file(path, progress=progress) == meta["sha256"]
    want = meta["stripes_sha256"]
    return all(stripe_digest(path, meta["stripe_bytes"], len(want), r, progress) == want[r]
               for r in (range(len(want)) if rank is None else [rank]))


def unsafe_files(tag_dir: Path) -> tuple[list[str], list[str]]:
    """(unsafe, unreadable): the pickled files (`*.pt`) that torch's safe unpickler refuses, or that cannot
    be read at all. Each is opened as it will be loaded, its tensors memory-mapped and never read: this
    costs the pickles, not the tensors."""
    from ds_finetune.checkpoint import safe_pickle  # torch: `ckpt list` and a status need not import it

    unsafe, unreadable = [], []
    for path in sorted(tag_dir.rglob("*.pt")):
        name = str(path.relative_to(tag_dir))
        try:
            safe_pickle.check(path)
        except safe_pickle.UnsafeCheckpointFile as e:
            unsafe.append(f"{name} is unsafe to load: {e.what}")
        except Exception as e:  # noqa: BLE001 - whatever a damaged file makes torch raise: not loadable
            unreadable.append(f"{name} is unreadable ({first_line(e)})")
    return unsafe, unreadable


def inspect_checkpoint(tag_dir: Path, hashes: bool = True, checked: dict | None = None,
                       progress=None) -> CheckpointInfo:
    """The checkpoint's status. `checked` ({tag folder: problems}) holds what the ranks of a resuming job
    already found by splitting the hashing among them; a folder in it is not checked again. `progress(n)`:
    n more bytes hashed."""
    step = step_of_tag(tag_dir.name)
    step = step if step is not None else -1
    try:
        manifest = read_manifest(tag_dir)
    except ValueError as e:
        return CheckpointInfo(tag_dir.name, tag_dir, step, "corrupt", None, [str(e)])
    if manifest is None:
        return CheckpointInfo(tag_dir.name, tag_dir, step, "incomplete", None,
                              ["no manifest: the save never committed"])
    known = (checked or {}).get(str(tag_dir))
    problems = known if known is not None else verify_files(tag_dir, manifest, hashes, progress)
    status = "corrupt" if problems else "complete"
    if not problems:  # intact: may it be loaded?
        unsafe, problems = unsafe_files(tag_dir)
        status = "unsafe" if unsafe else "corrupt" if problems else "complete"
        problems = unsafe + problems
    return CheckpointInfo(tag_dir.name, tag_dir, int(manifest.get("step", step)), status, manifest, problems)


def list_checkpoints(ckpt_dir: Path, hashes: bool = True, progress=None) -> list[CheckpointInfo]:
    return [inspect_checkpoint(p, hashes, progress=progress) for p in tag_dirs(ckpt_dir)]


def resume_pick(infos: list[CheckpointInfo]) -> CheckpointInfo | None:
    """What --resume picks from a run's listed checkpoints (oldest first): the newest complete one, unless
    an unsafe one is newer (then --resume refuses: None)."""
    c = next((c for c in reversed(infos) if c.status in ("complete", "unsafe")), None)
    return c if c is not None and c.status == "complete" else None


def manifest_bytes(tag_dir: Path) -> int:
    """The bytes the checkpoint's manifest lists (0 without a readable manifest): what hashing it reads."""
    try:
        manifest = read_manifest(tag_dir)
    except ValueError:
        return 0
    return sum(f["size"] for f in manifest["files"].values()) if manifest else 0


def has_checkpoints(ckpt_dir: Path) -> bool:
    return bool(tag_dirs(ckpt_dir))


def find_resumable_checkpoint(ckpt_dir: Path, hashes: bool = True, checked: dict | None = None
                              ) -> tuple[CheckpointInfo | None, list[str]]:
    """Newest complete, intact checkpoint, verifying newest first and stopping at the first good one.
    Returns it (or None) and one report line per newer checkpoint that was skipped. An intact checkpoint
    that is unsafe to load is not skipped but refused: it was made to look committed."""
    skipped = []
    for p in reversed(tag_dirs(ckpt_dir)):
        info = inspect_checkpoint(p, hashes, checked)
        if info.status == "unsafe":
            raise UserError(f"checkpoint error: {p}/{info.problems[0]}; nothing was loaded or changed - resume "
                            f"another checkpoint with --resume PATH")
        if info.status == "complete":
            return info, skipped
        skipped.append(f"skipping {info.status} checkpoint {p}: {'; '.join(info.problems)}")
    return None, skipped


def hash_together(folder: Path, manifest: dict, board_dir: Path, rank: int, world: int, say) -> list[str]:
    """Every problem with the manifest's files in `folder`; each rank hashes a share (`hashing.share_of_files`)
    and all wait on files in `board_dir`, not in a collective. Rank 0's progress goes to `say`."""
    board = Rendezvous(board_dir, rank, world, f"verifying {folder}")
    files = manifest["files"]
    parts = hash_parts(files)
    mine = share_of_files(parts, rank, world)
    meter = Meter(say if rank == 0 else None, f"verifying {folder.name} (rank 0's share)",
                  sum(parts[p]["size"] for p in mine))

    def hashed(n: int) -> None:
        board.beat()
        meter.add(n)

    def my_share() -> list[str]:
        fault_point("hang_verify", rank, int(manifest.get("step", -1)))
        return verify_parts(folder, files, mine, progress=hashed)

    return list(dict.fromkeys(problem for part in board.gather(my_share) for problem in part))


def hash_parts(files: dict) -> dict:
    """What the ranks of a resume share out to hash ({part: {"size"}}, for `share_of_files`): a file whole
    ("name", -1), or a striped file's stripes of each rank that wrote it ("name", r), so that a replicated
    file every rank loads is not hashed by one rank alone."""
    parts = {}
    for name, meta in files.items():
        want = meta.get("stripes_sha256")
        for r in range(len(want)) if want else [-1]:
            size = meta["size"] if r < 0 else stripe_bytes_of(meta["size"], meta["stripe_bytes"], len(want), r)
            parts[(name, r)] = {"size": size}
    return parts


def verify_parts(tag_dir: Path, files: dict, parts: list, progress=None) -> list[str]:
    """`verify_files` for some `hash_parts` parts: whole files, or one rank's stripes of a striped file."""
    return [problem for name, r in parts
            for problem in file_problems(tag_dir, name, files[name], progress=progress, rank=None if r < 0 else r)]
