"""Packing documents into fixed-length rows with `segment_ids` and in-document positions."""

from __future__ import annotations

import numpy as np

from longjax.data import tokenizer


def pack_documents(token_docs: list[np.ndarray], row_length: int) -> dict[str, np.ndarray]:
    """Concatenates token documents and cuts them into rows of `row_length` tokens.

    Returns `tokens` (PAD in the tail), `segment_ids` (1, 2, ... per document inside a
    row; 0 = padding) and `positions` (offset inside the document, so a document cut at
    a row border continues its positions), each `[num_rows, row_length]` int32.
    """
    if row_length < 2:
        raise ValueError(f"row_length must be >= 2; got {row_length}")
    lengths = np.array([len(d) for d in token_docs], np.int64)
    total = int(lengths.sum())
    num_rows = max(1, -(-total // row_length))
    size = num_rows * row_length
    tokens = np.full(size, tokenizer.PAD, np.int32)
    doc_ids = np.full(size, -1, np.int64)
    positions = np.zeros(size, np.int32)
    if total:
        tokens[:total] = np.concatenate(token_docs)
        doc_ids[:total] = np.repeat(np.arange(len(token_docs)), lengths)
        starts = np.cumsum(lengths) - lengths
        positions[:total] = np.arange(total) - np.repeat(starts, lengths)
    doc_ids = doc_ids.reshape(num_rows, row_length)
    first = doc_ids[:, :1]
    segment_ids = np.where(doc_ids >= 0, doc_ids - first + 1, 0).astype(np.int32)
    return {
        "tokens": tokens.reshape(num_rows, row_length),
        "segment_ids": segment_ids,
        "positions": positions.reshape(num_rows, row_length),
    }


def rows_to_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of T+1 tokens -> a training batch of T inputs and their next-token targets.

    `weights` is 1 where the target is the next token of the same document.
    """
    seg = rows["segment_ids"]
    return {
        "tokens": rows["tokens"][:, :-1],
        "targets": rows["tokens"][:, 1:],
        "segment_ids": seg[:, :-1],
        "positions": rows["positions"][:, :-1],
        "weights": ((seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)).astype(np.float32),
    }
