"""Best-fit packing: no document shorter than a row is cut, rows hold whole pieces."""

import numpy as np
import pytest

from longjax.data import best_fit, packing, tokenizer
from longjax.data.pipeline import make_train_stream


def _docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).astype(np.int32) for n in lengths]


def test_best_fit_decreasing_fills_rows_exactly():
    # Longest first: 7 opens row 0 (room 3), 5 opens row 1 (room 5), 3 fills row 0,
    # 3 goes to row 1 (room 2), 2 fills row 1. Concat-and-chunk cuts the 5 at token 10.
    layout = best_fit.best_fit_rows(np.array([7, 5, 3, 3, 2]), 10)
    assert layout == [[(0, 0, 7), (2, 0, 3)], [(1, 0, 5), (3, 0, 3), (4, 0, 2)]]
    assert best_fit.packing_stats([7, 5, 3, 3, 2], 10, "best_fit")["padding"] == 0.0
    concat = best_fit.packing_stats([7, 5, 3, 3, 2], 10, "concat")
    assert concat["truncated_short_documents"] == pytest.approx(1 / 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_rebuild_every_document_and_cut_only_long_ones(seed):
    rng = np.random.default_rng(seed)
    row = 33
    lengths = rng.integers(1, 3 * row, 60)
    docs = _docs(lengths, seed)
    rows = best_fit.pack_best_fit(docs, row)
    layout = best_fit.best_fit_rows(lengths, row)
    assert rows["tokens"].shape == (len(layout), row)
    pieces = {}
    for r, spec in enumerate(layout):
        seg = rows["segment_ids"][r]
        assert sum(stop - start for _, start, stop in spec) <= row
        for segment, (doc, start, stop) in enumerate(spec, start=1):
            where = np.flatnonzero(seg == segment)
            assert len(where) == stop - start and np.all(np.diff(where) == 1)
            np.testing.assert_array_equal(rows["tokens"][r, where], docs[doc][start:stop])
            np.testing.assert_array_equal(rows["positions"][r, where], np.arange(start, stop))
            pieces.setdefault(doc, []).append((start, stop))
        assert np.all(rows["tokens"][r, seg == 0] == tokenizer.PAD)
    for doc, n in enumerate(lengths):
        spans = sorted(pieces[doc])
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        if n <= row:  # shorter than a row: one piece, never truncated
            assert spans == [(0, n)]
        else:  # cut only into full rows and one remainder
            assert all(stop - start == row for start, stop in spans[:-1])
    stats = best_fit.packing_stats(lengths, row, "best_fit")
    assert stats["truncated_short_documents"] == 0.0
    assert stats["truncated_documents"] == pytest.approx(np.mean(lengths > row))
    assert stats["padding"] == pytest.approx(1 - lengths.sum() / rows["tokens"].size)


def test_concat_stats_match_pack_documents():
    lengths = np.array([5, 12, 3, 9, 1, 20])
    rows = packing.pack_documents(_docs(lengths), 8)
    stats = best_fit.packing_stats(lengths, 8, "concat")
    assert stats["rows"] == len(rows["tokens"])
    assert stats["padding"] == pytest.approx(np.mean(rows["tokens"] == tokenizer.PAD))
    # documents whose tokens land in more than one row, read off the packed rows
    starts = np.cumsum(lengths) - lengths
    cut = [len({s // 8, (s + n - 1) // 8}) > 1 for s, n in zip(starts, lengths, strict=True)]
    assert stats["truncated_documents"] == pytest.approx(np.mean(cut))


def test_best_fit_train_stream_from_config(tiny_config):
    config = tiny_config(data__packing="best_fit")
    stream = make_train_stream(config)
    assert stream.stats["truncated_short_documents"] == 0.0
    assert 0 <= stream.stats["padding"] < 0.5
    batch = stream.next()
    assert batch["tokens"].shape == (8, 32)
    # weights only inside a piece: the next token belongs to the same segment
    seg_next = np.concatenate([batch["segment_ids"][:, 1:], np.zeros((8, 1), np.int32)], 1)
    assert np.all(batch["weights"][:, :-1] <= (batch["segment_ids"][:, :-1] == seg_next[:, :-1]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="row_length must be >= 2"):
        best_fit.best_fit_rows(np.array([3]), 1)
    with pytest.raises(ValueError, match="packing='zip'; allowed"):
        best_fit.packing_stats([3], 8, "zip")
