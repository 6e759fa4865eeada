"""Mask specs: element masks against a direct definition, tile maps against brute force."""

import itertools

import numpy as np
import pytest

from longjax.ops.attention import attention_mask
from longjax.ops.masks import EMPTY, FULL, PARTIAL, MaskSpec, segment_visible


def _direct(T, S, causal, window, num_sinks):
    """The definitions, one (t, s) pair at a time."""
    m = np.zeros((T, S), bool)
    for t, s in itertools.product(range(T), range(S)):
        ok = s <= t if causal else True
        if window is not None:
            near = (0 <= t - s < window) if causal else abs(t - s) < window
            ok = ok and (near or s < num_sinks)
        m[t, s] = ok
    return m


SPECS = [(c, w, n) for c in (False, True) for w in (None, 0, 1, 3, 9) for n in (0, 2, 5)
         if w is not None or n == 0]


@pytest.mark.parametrize("causal, window, num_sinks", SPECS)
def test_visible_matches_definition(causal, window, num_sinks):
    T, S = 13, 17
    spec = MaskSpec(causal=causal, window=window, num_sinks=num_sinks)
    got = np.asarray(spec.visible(np.arange(T)[:, None], np.arange(S)[None, :]))
    np.testing.assert_array_equal(got, _direct(T, S, causal, window, num_sinks))


@pytest.mark.parametrize("causal, window, num_sinks", SPECS)
def test_tile_map_matches_brute_force(causal, window, num_sinks):
    spec = MaskSpec(causal=causal, window=window, num_sinks=num_sinks)
    for T, S, bq, bk in itertools.product((1, 13, 32), (7, 40), (4, 8), (4, 16)):
        m = _direct(T, S, causal, window, num_sinks)
        nq, nk = -(-T // bq), -(-S // bk)
        padded = np.zeros((nq * bq, nk * bk), bool)
        padded[:T, :S] = m
        valid = np.zeros_like(padded)
        valid[:T, :S] = True
        tiles = padded.reshape(nq, bq, nk, bk)
        any_ = tiles.any((1, 3))
        all_ = tiles.all((1, 3)) & valid.reshape(nq, bq, nk, bk).all((1, 3))
        want = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY))
        np.testing.assert_array_equal(spec.tile_map(T, S, bq, bk), want)
        segmented = spec.tile_map(T, S, bq, bk, has_segments=True)
        np.testing.assert_array_equal(segmented, np.where(any_, PARTIAL, EMPTY))


def test_segments_and_padding():
    q = np.array([[1, 1, 2, 0]])
    kv = np.array([[1, 2, 2, 0, 1]])
    got = np.asarray(segment_visible(q, kv))[0]
    want = np.array([[a == b and a != 0 for b in kv[0]] for a in q[0]])
    np.testing.assert_array_equal(got, want)
    assert not got[3].any() and not got[:, 3].any()  # padding sees and is seen by nothing


def test_attention_mask_uses_positions():
    """A KV cache: 2 queries at slots 5, 6 over 8 slots, window 3, one sink."""
    mask = attention_mask(2, 8, causal=True, window=3, num_sinks=1,
                          q_positions=np.array([[5, 6]]), kv_positions=np.arange(8)[None])
    want = [[1, 0, 0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 1, 1, 1, 0]]
    np.testing.assert_array_equal(np.asarray(mask)[0, 0], np.array(want, bool))


@pytest.mark.parametrize("kwargs", [dict(window=-1), dict(num_sinks=-1), dict(window=2.5)])
def test_bad_spec_raises(kwargs):
    with pytest.raises(ValueError, match="window|num_sinks"):
        MaskSpec(**kwargs)
