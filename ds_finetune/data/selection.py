"""Which rows of a dataset, named the way `datasets` names them: `data.subset` (a config name),
`data.revision`, `data.data_files` and `data.split` with a slice (`train[:10%]`, `train[100:200]`).

A dataset that is not on disk is loaded by `datasets.load_dataset` with all of them. Local files are read
by sources.py (row by row, so a broken line is named by file:line); for them `data_files` picks files of
a local folder (patterns relative to it; {split: patterns} picks by the split's name) and a split's slice
is cut from their rows with `datasets`' own reading of the slice. `subset` and `revision` belong to a
dataset repository, so on a local path they are refused rather than ignored.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from ds_finetune.errors import UserError, first_line

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def load_dataset_kwargs(data_cfg) -> dict:
    """`datasets.load_dataset`'s arguments for data.path, only those set (its defaults otherwise)."""
    optional = {"name": data_cfg.subset, "revision": data_cfg.revision, "data_files": data_cfg.data_files}
    return {"path": data_cfg.path, "split": data_cfg.split, **{k: v for k, v in optional.items() if v is not None}}


def split_name(split: str) -> str:
    return split.split("[", 1)[0].strip()


# ------------------------------------------------------------------------------------------ local files

def select_local_files(data_cfg, files: list[Path] | None) -> list[Path] | None:
    """The files data.data_files picks of a local folder (all of them when unset); None (not local) as is."""
    if files is None:
        return None
    for key in ("subset", "revision"):
        if getattr(data_cfg, key) is not None:
            raise UserError(f"config error: data.{key} is for a dataset loaded by `datasets` (a Hub name), but "
                            f"data.path {data_cfg.path} is local; use data.data_files to pick its files")
    if data_cfg.data_files is None:
        return files
    root = Path(data_cfg.path)
    if not root.is_dir():
        raise UserError(f"config error: data.data_files picks files of a folder, but data.path {root} is a file; "
                        f"set data.path to the folder")
    patterns = _patterns_for_split(data_cfg.data_files, split_name(data_cfg.split))
    picked = sorted({f for p in patterns for f in root.glob(p) if f.is_file() and f.suffix in DATA_SUFFIXES})
    if not picked:
        raise UserError(f"data error: {root}: data.data_files {patterns} match no .jsonl/.json/.parquet file there")
    return picked


def _patterns_for_split(data_files, name: str) -> list[str]:
    if isinstance(data_files, dict):
        if name not in data_files:
            raise UserError(f"config error: data.split {name} is not a key of data.data_files "
                            f"({', '.join(data_files)}); set data.split to one of them")
        data_files = data_files[name]
    return [data_files] if isinstance(data_files, str) else list(data_files)


def slice_rows(split: str, rows, count_rows):
    """`rows` (an iterator) cut to the split's slice, if it has one; `count_rows()` counts them all (a
    percentage needs the total, as `datasets` computes it)."""
    if "[" not in split:
        return rows
    start, stop = slice_bounds(split, count_rows)
    return islice(rows, start, stop)


def slice_bounds(split: str, count_rows) -> tuple[int, int]:
    """(first row, row after the last) of `name[from:to]`, from `datasets`' own ReadInstruction."""
    from datasets import ReadInstruction

    name = split_name(split)
    try:
        instructions = ReadInstruction.from_spec(split).to_absolute({name: count_rows()})
    except (ValueError, AssertionError, KeyError) as e:
        raise UserError(f"config error: data.split {split!r} is not a split slice `datasets` reads "
                        f"({first_line(e)}); write e.g. train[:10%] or train[100:200]") from None
    if len(instructions) != 1:
        raise UserError(f"config error: data.split {split!r} joins several slices; use one (e.g. train[:10%])")
    return instructions[0].from_, instructions[0].to
