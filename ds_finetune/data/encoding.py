"""Batched tokenization of a chunk's texts, shared by every format (formats.py, preference.py)."""

from __future__ import annotations


def encode(tok, texts: list[str], offsets: bool = False):
    """Batched tokenization without special tokens. The Rust tokenizer directly where the wrapper would
    only add Python overhead (no truncation or padding configured); the same ids either way."""
    backend = getattr(tok, "backend_tokenizer", None)
    if not texts:
        return {"input_ids": [], "encodings": []}
    if backend is None or backend.truncation or backend.padding:
        out = tok(texts, add_special_tokens=False)
        return {"input_ids": out["input_ids"], "encodings": out.encodings}
    if not offsets:
        return {"input_ids": [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]}
    # The Encoding objects, not their offsets: a Python tuple per token costs more than the tokenizing.
    encs = backend.encode_batch(texts, add_special_tokens=False)
    return {"input_ids": [e.ids for e in encs], "encodings": encs}
