"""Tokenizing chunks in worker processes, in order, with a bounded number of chunks in flight, so the
preparing process holds a few chunks whatever the size of the dataset."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor

from ds_finetune.data.formats import init_worker, tokenize_chunk, tokenize_chunk_in_worker
from ds_finetune.data.sources import iter_chunks

CHUNK_ROWS = 1000
# Starting workers costs a second or two (a fresh interpreter each): below this much data one process is faster.
SMALL_DATA_BYTES = 8 << 20


def worker_count(data_cfg, files) -> int:
    wanted = data_cfg.num_proc or os.cpu_count() or 1
    if files is not None and sum(f.stat().st_size for f in files) < SMALL_DATA_BYTES:
        return 1
    return wanted


def tokenized_chunks(data_cfg, tok, files):
    """ChunkArrays of the dataset in row order."""
    chunks = iter_chunks(data_cfg, files, CHUNK_ROWS)
    workers = worker_count(data_cfg, files)
    if workers <= 1:
        for chunk in chunks:
            yield tokenize_chunk(tok, data_cfg, chunk)
        return
    # spawn, not fork: the caller may be a rank with DeepSpeed's threads, or hold the tokenizer's thread pool.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker, initargs=(tok, data_cfg))
    try:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.submit(tokenize_chunk_in_worker, chunk))
            if len(pending) >= 2 * workers:  # bounded: reading never runs far ahead of tokenizing
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
