"""DPO's reference log-probs stored before training (`dpo.reference: precomputed`, without LoRA).

With LoRA the reference is the model with its adapters disabled (`dpo.AdaptersOff`). Without LoRA it is
the base model before any step: every pair's summed target log-probs are computed in one pass over the
data before training, while the engine still holds the base's weights, and stored beside the token cache,
in `<cache_dir>/reference/<key>/logps.npy` (float32, one value per cache row, memory-mapped by every
rank). The key is the token cache's folder (the data and its tokenization), the model (its config or
folder, with the size and mtime of its files), the dtype and the loss path: a later run or resume of the
same data and base finds it and computes nothing.

The pass is sharded: blocks of `train.micro_batch_size` pairs, block b on data-parallel rank b mod DP (the
ranks of a sequence-parallel group compute a block together, the first of them writes it); each rank runs
the same number of forwards (ZeRO-3 gathers parameters in every one). A rank writes each block to
`<key>.partial/block-N.npy` (atomic rename) as it finishes it, so a pass killed midway continues where it
was: the next start skips the rounds whose blocks are all on disk. A block's values depend only on its
pairs, not on the world size or which rank computed it. Rank 0 then joins the blocks into `logps.npy`
and commits the folder by renaming it.

KTO's precomputed reference (`kto.py`) is the same pass over rows instead of pairs, two values a row (its
own log-probs and those of its KL row): `reference_logps`'s `walk`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ds_finetune.data import MixedData, collate_pairs, group_units
from ds_finetune.device_batch import to_device
from ds_finetune.dist import barrier, decide, frozen_eval
from ds_finetune.errors import UserError
from ds_finetune.faults import fault_point
from ds_finetune.files import new_folder, replace_file
from ds_finetune.objectives import ObjectiveParts

REFERENCE_VERSION = 1  # bump when the stored values would change


@dataclass(frozen=True)
class Walk:
    """How the pass goes over the data: `units` of it in order (pairs; KTO's rows), blocks of `block` units,
    `values(engine, logps_fn, unit_ids)` -> (cache rows [n], their values [n, columns]); `key`: what else
    the stored values depend on (nothing for DPO's, so its folders keep their names)."""
    units: int
    columns: int
    values: Callable
    key: dict


def pair_walk(data, pad_id: int) -> Walk:
    """DPO's: pairs, one value a row (its summed completion log-probs)."""
    def values(engine, logps_fn, pairs):
        batch = collate_pairs(data, group_units(pairs, 2), pad_id)
        return batch.rows, logps_fn(engine, *to_device(batch[:3], engine.device), batch.facts)[:, None]
    return Walk(data.num_rows // 2, 1, values, {})


def stored_reference(parts: ObjectiveParts, logps_fn, data, walk_of: Callable | None = None) -> np.ndarray:
    """`reference_logps` of `data`; of a mixture, each source's (stored beside its own cache, so a changed
    source recomputes only its own) joined in the mixture's row order: 4 bytes a row in memory (8 for
    KTO's two columns). `walk_of(source data)`: the walk, DPO's pairs where None."""
    if isinstance(data, MixedData):
        return np.concatenate([stored_reference(parts, logps_fn, p, walk_of) for p in data.parts])
    return reference_logps(parts, logps_fn, data, walk_of(data) if walk_of else None)


def reference_key(cfg, data, block: int, extra: dict | None = None) -> str:
    model = cfg.model.model_dump(mode="json")
    folder = Path(cfg.model.name_or_path) if cfg.model.name_or_path else None
    if folder is not None and folder.is_dir():  # a changed weight file is another base
        model["files"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    if cfg.model.name_or_path is None:
        model["seed"] = cfg.train.seed  # a randomly initialised base is drawn from the seed
    key = {"v": REFERENCE_VERSION, "data": data.path.name, "model": model, "block": block,
           "loss_chunk_tokens": cfg.train.loss_chunk_tokens, **(extra or {})}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def reference_logps(parts: ObjectiveParts, logps_fn, data, walk: Walk | None = None) -> np.ndarray:
    """The stored reference log-probs of `data` (one per row; [rows, columns] for a walk of several), computed
    first if they are not there (by `logps_fn` on the engine, which must then hold the base's weights), in
    blocks of micro_batch_size units (DPO's pairs unless `walk` says otherwise)."""
    cfg, engine, rank = parts.cfg, parts.engine, parts.rank
    walk = walk or pair_walk(data, parts.pad_id)
    block = cfg.train.micro_batch_size
    folder = data.path.parent.parent / "reference" / reference_key(cfg, data, block, walk.key)
    partial = folder.with_name(folder.name + ".partial")
    if not decide(folder.is_dir, runs_here=rank == 0):
        if not parts.weights_are_base:
            raise UserError(f"data error: the reference log-probs of this run ({folder}) are gone and the model now "
                            f"holds a checkpoint converted from another ZeRO stage or world size; resume on the "
                            f"checkpoint's own stage and world size once (it recomputes them), or restore the folder")
        _compute(engine, logps_fn, walk, block, parts.group, rank, partial, parts.say)
        if rank == 0:
            _commit(partial, folder, data.num_rows, block, walk.columns)
        barrier()
    return np.load(folder / "logps.npy", mmap_mode="r")


def _compute(engine, logps_fn, walk: Walk, block: int, group, rank: int, partial: Path, say) -> None:
    """`group`: this rank's sequence.SequenceGroup."""
    n_units, world = walk.units, group.dp_size
    n_blocks = math.ceil(n_units / block)
    rounds = math.ceil(n_blocks / world)

    def done_rounds():
        partial.mkdir(parents=True, exist_ok=True)
        have = {p.name for p in partial.glob("block-*.npy")}
        return [r for r in range(rounds)
                if all(f"block-{b:08d}.npy" in have for b in range(r * world, min(n_blocks, (r + 1) * world)))]
    done = set(decide(done_rounds, runs_here=rank == 0))  # one view of the disk for every rank
    todo = [r for r in range(rounds) if r not in done]
    if rank == 0:
        what = "pairs" if walk.columns == 1 else "rows"
        say(f"computing the reference log-probs of {n_units} {what} ({len(done)} of {rounds} rounds done before)")
    with frozen_eval(engine.module):
        for r in todo:
            b = r * world + group.dp_rank
            units = np.arange(b * block, min(n_units, (b + 1) * block)) if b < n_blocks else np.arange(1)
            rows, values = walk.values(engine, logps_fn, units)
            values = values.float().cpu().numpy()
            if b < n_blocks and group.rank == 0:  # else a forward only to keep ZeRO-3's gathers in step
                _write_block(partial / f"block-{b:08d}.npy", rows, values)
            fault_point("mid_reference", rank, r + 1)
    barrier()


def _write_block(path: Path, rows: np.ndarray, values: np.ndarray) -> None:
    """[1 + columns, n]: the rows, then each column of their values (DPO's: [2, n], as it always was)."""
    table = np.concatenate([rows.astype(np.float64)[None], values.astype(np.float64).T])
    replace_file(path, lambda f: np.save(f, table))


def _commit(partial: Path, folder: Path, num_rows: int, block: int, columns: int = 1) -> None:
    logps = np.full((num_rows, columns), np.nan, dtype=np.float32)
    for path in sorted(partial.glob("block-*.npy")):
        table = np.load(path)
        logps[table[0].astype(np.int64)] = table[1:].T.astype(np.float32)
    logps = logps[:, 0] if columns == 1 else logps
    if np.isnan(logps).any():
        raise UserError(f"data error: reference log-probs missing for {int(np.isnan(logps).sum())} rows in {partial}; "
                        f"remove that folder and start again")
    with new_folder(folder) as tmp:
        np.save(tmp / "logps.npy", logps)
        (tmp / "meta.json").write_text(json.dumps({"rows": num_rows, "block_pairs": block, "version": REFERENCE_VERSION}))
    shutil.rmtree(partial, ignore_errors=True)
