"""Datasets: loading (local JSONL/JSON/Parquet file or folder, or a cached `datasets` name), the formats
text / prompt_completion / chat, label masks, the tokenization cache, and packing.

Tokenized rows live in flat arrays (ids, target mask, row offsets, ...) in a cache folder keyed by the
data's content hash, the tokenizer and every setting that changes tokens (cache.py). The cache is built
once, before the ranks start (`ds-finetune data prepare`, which `ds-finetune train` runs), or by one
process while the others wait on a lock file; ranks memory-map it. Invariant: a row's first token is never
a target, so the number of targets of a row (and of a pack of rows) is just the sum of its mask — every
rank can compute the global batch's target count without talking to the others (docs/design.md, "Loss").

    sources.py   files, content hash, streaming rows      formats.py  rows -> ids and target masks
    parallel.py  worker processes, in order               cache.py    .npy cache folder, lock, mmap reads
    packing.py   units (rows or packs), collation, the order of one source (EpochOrder)
    blend.py     a mixture's order as arithmetic           mixture.py  a mixture's rows and order
    repeat.py    each global batch for several steps (GRPO's num_iterations)
    chat.py      chat replies located, chat masks          layouts.py  the row layouts users bring -> a format's
    completions.py  prompt + completion messages rendered  templates.py data.chat_template
"""

from __future__ import annotations

from pathlib import Path

from ds_finetune.data.cache import (DATA_FORMAT_VERSION, TokenizedData, build_cache, cache_path,
                                    ensure_cache, read_cache, read_meta, tokenizer_fingerprint)
from ds_finetune.data.mixture import MixedData, MixtureOrder, SourceLosses, mix_change_message
from ds_finetune.data.preference import UnpairedRows
from ds_finetune.data.packing import (IGNORE_INDEX, EpochOrder, HostFacts, PairBatch, StepBatch, collate,
                                      collate_pairs, collate_sequences, group_indices, group_units, pack_isolated,
                                      plan_units, unit_targets, unit_tokens)
from ds_finetune.data.repeat import RepeatedOrder
from ds_finetune.data.selection import select_local_files
from ds_finetune.data.sources import content_hash, resolve_data_files
from ds_finetune.data.templates import with_chat_template
from ds_finetune.errors import UserError
from ds_finetune.hashing import memo_dir

__all__ = ["DATA_FORMAT_VERSION", "EpochOrder", "HostFacts", "IGNORE_INDEX", "MixedData", "MixtureOrder", "PairBatch",
           "RepeatedOrder", "SourceLosses", "StepBatch", "TokenizedData", "build_cache", "cache_path", "collate",
           "collate_pairs", "collate_sequences", "content_hash", "ensure_prepared", "epoch_order", "group_indices",
           "group_units", "load_tokenizer", "mix_change_message", "pack_isolated", "plan_units", "prepare_data",
           "prepare_sources", "prepare_training_data", "read_cache", "read_meta", "resolve_data_files",
           "tokenizer_fingerprint", "unit_targets", "unit_tokens"]


def locate(data_cfg, tok) -> tuple[list[Path] | None, str, Path]:
    """(data files, content hash, cache folder) of a data config."""
    files = select_local_files(data_cfg, resolve_data_files(data_cfg.path))
    data_hash = content_hash(files, data_cfg.path, data_cfg.split, memo_dir=memo_dir())
    return files, data_hash, cache_path(data_cfg, data_hash, tok)


def ensure_prepared(data_cfg, tok, progress=None, say=None) -> tuple[Path, str, bool]:
    """Build the cache unless it is there (or wait for the process building it).
    Returns (cache folder, content hash, whether this process built it)."""
    tok = with_chat_template(tok, data_cfg.chat_template)  # in the key through the tokenizer's fingerprint too
    files, data_hash, path = locate(data_cfg, tok)
    built = ensure_cache(lambda heartbeat: build_cache(data_cfg, tok, files, data_hash, path, progress, heartbeat),
                         path, say)
    return path, data_hash, built


def prepare_data(data_cfg, tok, say=None) -> TokenizedData:
    """Every rank's view of the tokenized data. Usually prepared already (by the CLI before the launch);
    else the first rank to get the lock builds it while the others wait on the file, not on a collective."""
    path, data_hash, _ = ensure_prepared(data_cfg, tok, progress=periodic_progress(say) if say else None, say=say)
    data = read_cache(path, data_hash, rows_per_unit(data_cfg.format))
    return UnpairedRows(data) if data_cfg.format == "preference" and data_cfg.pairs_as_rows else data


def rows_per_unit(data_format: str) -> int:
    """How the format's rows group into units: a preference pair is two rows (chosen, then rejected)."""
    return 2 if data_format == "preference" else 1


def prepare_training_data(data_cfg, tok, say=None) -> TokenizedData | MixedData:
    """The rows of data.path, or of every source of data.sources as one view (each source prepared and
    cached on its own, so a changed source rebuilds only itself)."""
    if not data_cfg.is_mixture:
        return prepare_data(data_cfg, tok, say=say)
    return prepare_sources(data_cfg, data_cfg.sources, tok, say=say)


def prepare_sources(data_cfg, sources: list, tok, say=None) -> MixedData:
    """Named sources (of data.sources or eval.sources) as one view, each prepared and cached as the data
    section with its own path and format fields."""
    return MixedData([s.name for s in sources], [prepare_data(data_cfg.one_source(s), tok, say=say) for s in sources])


def epoch_order(cfg, data, train_rows=None) -> EpochOrder | MixtureOrder | RepeatedOrder:
    """The run's order of units: one source's epochs, or a mixture's stream; each global batch taken for
    grpo.num_iterations steps (RepeatedOrder) where that is above 1."""
    d = cfg.data
    # SFT's units are packs; a preference objective's stay one row or pair each and are packed when a
    # micro-batch is collated (data.packing isolated: pairs.py, kto.py).
    packs = d.packs and cfg.train.objective == "sft"
    if d.is_mixture:
        order = MixtureOrder(data, [s.weight for s in d.sources], cfg.train.seed, packs, d.max_length)
    else:
        order = EpochOrder(data, cfg.train.seed, packs, d.max_length, rows=train_rows, epochs=cfg.train.epochs,
                           label=d.path)
    repeats = cfg.grpo.num_iterations if cfg.train.objective == "grpo" else 1
    return RepeatedOrder(order, repeats) if repeats > 1 else order


def periodic_progress(say, every_s: float = 10.0):
    """A progress callback that says how far preparation got every `every_s` seconds (for logs)."""
    import time
    t0 = last = time.time()

    def report(rows: int, tokens: int) -> None:
        nonlocal last
        if time.time() - last >= every_s:
            last = time.time()
            say(f"preparing data: {rows:,} rows, {tokens:,} tokens, {rows / (last - t0):,.0f} rows/s")
    return report


def load_tokenizer(name_or_path: str, chat_template: str | None = None, **hub_options):
    """The run's tokenizer; with data.chat_template as its template (so an export ships it). `hub_options`:
    revision and trust_remote_code, as the model section sets them (ModelConfig.hub_options)."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **hub_options)
    except Exception as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"model error: tokenizer {name_or_path!r} needs the code it ships on the Hub; set "
                            f"model.trust_remote_code: true if you trust that code") from None
        raise UserError(f"model error: cannot load tokenizer {name_or_path!r} ({type(e).__name__}); "
                        f"check model.tokenizer (a local folder or a cached Hugging Face name)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return with_chat_template(tok, chat_template)
