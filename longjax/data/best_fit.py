"""Best-fit packing (Ding et al. 2024, "Fewer Truncations Improve Language Modeling").

A document is cut only when it is longer than a row: into full rows plus one remainder.
The pieces shorter than a row are placed, longest first, into the open row with the
least room that still holds them (best-fit decreasing); a new row opens when none does.
Compared with concat-and-chunk, a document shorter than a row is never truncated, at the
price of some padding.
"""

from __future__ import annotations

import bisect

import numpy as np

from longjax.data import tokenizer


def best_fit_rows(lengths: np.ndarray, row_length: int) -> list[list[tuple[int, int, int]]]:
    """Assigns document pieces to rows: per row a list of `(doc, start, stop)` token ranges.

    `lengths` `[num_docs]`; documents longer than `row_length` give `len // row_length`
    full rows and a remainder; every piece shorter than a row goes to the fullest row it
    fits (ties: the earliest opened), pieces taken longest first.
    """
    if row_length < 2:
        raise ValueError(f"row_length must be >= 2; got {row_length}")
    rows: list[list[tuple[int, int, int]]] = []
    pieces = []
    for doc, length in enumerate(int(n) for n in lengths):
        full, rest = divmod(length, row_length)
        rows.extend([(doc, i * row_length, (i + 1) * row_length)] for i in range(full))
        if rest:
            pieces.append((rest, doc, full * row_length))
    pieces.sort(key=lambda p: (-p[0], p[1]))
    # Open rows by free room: `rooms` is the sorted list of room sizes that some open row
    # has; `open_rows[room]` the rows with that room, earliest opened first.
    rooms: list[int] = []
    open_rows: dict[int, list[int]] = {}
    for size, doc, start in pieces:
        at = bisect.bisect_left(rooms, size)
        if at < len(rooms):
            room = rooms[at]
            row = open_rows[room].pop(0)
            if not open_rows[room]:
                del open_rows[room], rooms[at]
        else:
            room, row = row_length, len(rows)
            rows.append([])
        rows[row].append((doc, start, start + size))
        left = room - size
        if left:
            if left not in open_rows:
                bisect.insort(rooms, left)
                open_rows[left] = []
            bisect.insort(open_rows[left], row)
    return rows


def pack_best_fit(token_docs: list[np.ndarray], row_length: int) -> dict[str, np.ndarray]:
    """Best-fit packed rows: `tokens` (PAD in the free room), `segment_ids` (1, 2, ... per
    piece in a row; 0 = padding), `positions` (offset inside the document), each
    `[num_rows, row_length]` int32, in the order of `best_fit_rows`."""
    lengths = np.array([len(d) for d in token_docs], np.int64)
    layout = best_fit_rows(lengths, row_length)
    num_rows = max(1, len(layout))
    tokens = np.full((num_rows, row_length), tokenizer.PAD, np.int32)
    segment_ids = np.zeros((num_rows, row_length), np.int32)
    positions = np.zeros((num_rows, row_length), np.int32)
    for r, row in enumerate(layout):
        offset = 0
        for segment, (doc, start, stop) in enumerate(row, start=1):
            span = slice(offset, offset + stop - start)
            tokens[r, span] = token_docs[doc][start:stop]
            segment_ids[r, span] = segment
            positions[r, span] = np.arange(start, stop)
            offset += stop - start
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def packing_stats(lengths: np.ndarray, row_length: int, packing: str) -> dict[str, float]:
    """How a packing treats the documents of `lengths` in rows of `row_length` tokens.

    `truncated_documents`: the fraction of documents whose tokens land in more than one
    row; `truncated_short_documents`: the same among documents no longer than a row;
    `padding`: the fraction of row tokens that are padding. `packing` is `"concat"`
    (`longjax.data.packing.pack_documents`) or `"best_fit"`.
    """
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if packing == "concat":
        stops = np.cumsum(lengths)
        starts = stops - lengths
        cut = (lengths > 0) & (starts // row_length != (stops - 1) // row_length)
        num_rows = max(1, -(-total // row_length))
    elif packing == "best_fit":
        cut = lengths > row_length
        num_rows = max(1, len(best_fit_rows(lengths, row_length)))
    else:
        raise ValueError(f"packing={packing!r}; allowed: 'concat', 'best_fit'")
    short = lengths <= row_length
    return {
        "documents": float(len(lengths)),
        "rows": float(num_rows),
        "truncated_documents": float(cut.mean()) if len(lengths) else 0.0,
        "truncated_short_documents": float(cut[short].mean()) if short.any() else 0.0,
        "padding": 1.0 - total / (num_rows * row_length),
    }
