"""Packing documents into fixed-length rows with `segment_ids` and positions.

Positions in a training row (`config.data.positions`):
- `"row"` (the default): every row is a fresh sequence, positions 0, 1, ... from the
  row's start and again from each document start inside it. This is the train-short
  setting of Press et al. 2022: a model trained at L has seen positions < L only, so an
  evaluation at longer lengths measures extrapolation.
- `"document"`: a document cut at a row border continues its positions (the offset
  inside the document), so rows late in long documents hold positions far past L. Use
  it only on purpose (e.g. to study training on long-document positions); with absolute
  schemes it trains the positions that a "train short, test long" evaluation tests.

PoSE (Zhu et al. 2023, "Positional Skip-wise Training"): `pose_positions` spreads a
row's positions over a longer target length by skips between chunks.
"""

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


POSITIONS = ("row", "document")


def row_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Positions `[N, T]` int32 that start at 0 at each row's start and at each change of
    segment id inside a row."""
    columns = np.arange(segment_ids.shape[1])
    starts = np.ones(segment_ids.shape, bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = np.maximum.accumulate(np.where(starts, columns, 0), axis=1)
    return (columns - first).astype(np.int32)


def pose_positions(positions: np.ndarray, target_length: int, rng: np.random.Generator, *,
                   num_chunks: int = 2) -> np.ndarray:
    """PoSE's positions (Zhu et al. 2023, Sec. 3.2): each row of `positions` `[N, T]`
    (row positions, < T) is cut into `num_chunks` contiguous chunks of random lengths
    (each >= 1); chunk i is shifted by a skip u_i, u_0 = 0 and u_i drawn uniformly from
    u_{i-1} .. target_length - T, so positions stay below `target_length` and relative
    distances up to it appear within a row of T tokens."""
    N, T = positions.shape
    if not (isinstance(target_length, int) and target_length >= T and 1 <= num_chunks <= T):
        raise ValueError(f"PoSE needs a target length >= the row length {T} (config.data."
                         f"pose_length; got {target_length!r}) and 1 <= chunks <= {T}")
    cuts = np.sort(np.stack([rng.choice(np.arange(1, T), num_chunks - 1, replace=False)
                             for _ in range(N)]), axis=1)  # chunk i starts at cuts[i - 1]
    skips = np.zeros((N, num_chunks), np.int64)
    for i in range(1, num_chunks):
        skips[:, i] = rng.integers(skips[:, i - 1], target_length - T + 1)
    chunk = (np.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1)  # [N, T]
    return (positions + np.take_along_axis(skips, chunk, axis=1)).astype(np.int32)


def rows_to_batch(rows: dict[str, np.ndarray], *, positions: str = "row"
                  ) -> dict[str, np.ndarray]:
    """Rows of T+1 tokens -> a training batch of T inputs and their next-token targets,
    with `positions` `"row"` (restarted at each row and document start) or `"document"`
    (the rows' own).

    `weights` is 1 where the target is the next token of the same document.
    """
    if positions not in POSITIONS:
        raise ValueError(f"config.data.positions={positions!r}; allowed: {list(POSITIONS)}")
    seg = rows["segment_ids"]
    pos = row_positions(seg) if positions == "row" else rows["positions"]
    return {
        "tokens": rows["tokens"][:, :-1],
        "targets": rows["tokens"][:, 1:],
        "segment_ids": seg[:, :-1],
        "positions": pos[:, :-1],
        "weights": ((seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)).astype(np.float32),
    }
