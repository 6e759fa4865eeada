"""Attention specs: element masks against a direct definition; the block planner against
brute force."""

import ast
import itertools
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from longjax.ops.attention import attention_mask
from longjax.ops.attention.planner import Tiling
from longjax.ops.attention.spec import AttentionSpec, segment_visible


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
    spec = AttentionSpec(causal=causal, window=window, num_sinks=num_sinks)
    got = np.asarray(spec.visible(np.arange(T)[:, None], np.arange(S)[None, :]))
    np.testing.assert_array_equal(got, _direct(T, S, causal, window, num_sinks))


def _tiles(mask, tiling, reduce):
    return reduce(mask.reshape(tiling.nq, tiling.bq, tiling.nk, tiling.bk), axis=(1, 3))


def _within(x, lo, hi, shape):
    return np.broadcast_to((x >= lo) & (x < hi), shape)


@pytest.mark.parametrize("causal, window, num_sinks", SPECS)
@pytest.mark.parametrize("segments", [False, True])
def test_planner_matches_brute_force(causal, window, num_sinks, segments):
    """`key_blocks` / `query_blocks` visit exactly the tiles holding a visible pair and
    leave unmasked exactly the band tiles where every pair that counts is visible; the
    NumPy and traced forms agree."""
    spec = AttentionSpec(causal=causal, window=window, num_sinks=num_sinks,
                         has_segments=segments)
    for T, S, bq, bk in itertools.product((1, 13, 32), (7, 40), (4, 8), (4, 16)):
        tiling = Tiling(T, S, bq, bk)
        i, j = np.arange(tiling.nq)[:, None], np.arange(tiling.nk)[None, :]
        padded = np.zeros((tiling.Tp, tiling.Sp), bool)  # padding sees nothing
        padded[:T, :S] = _direct(T, S, causal, window, num_sinks)
        visible = _tiles(padded, tiling, np.any)
        unmasked = ~np.asarray(segments) & (j * bk >= spec.sinks)  # segments, sinks: masked
        rows_pad = padded.copy()  # padded query rows are sliced off, so they may see anything
        rows_pad[T:, :S] = True
        kb = tiling.key_blocks(spec, i)
        shape = visible.shape
        np.testing.assert_array_equal(
            _within(j, 0, kb.sinks, shape) | _within(j, kb.lo, kb.hi, shape), visible)
        np.testing.assert_array_equal(_within(j, kb.full_lo, kb.full_hi, shape),
                                      _tiles(rows_pad, tiling, np.all) & unmasked)
        qb = tiling.query_blocks(spec, j)
        np.testing.assert_array_equal(_within(i, qb.lo, qb.hi, shape), visible)
        np.testing.assert_array_equal(_within(i, qb.full_lo, qb.full_hi, shape),
                                      _tiles(padded, tiling, np.all) & unmasked)
        if segments:  # segments only empty the full range, the same in both forms
            continue
        traced = (tiling.key_blocks(spec, jnp.asarray(i)),
                  tiling.query_blocks(spec, jnp.asarray(j)))
        for want, got in zip((kb, qb), traced, strict=True):
            np.testing.assert_array_equal(np.broadcast_arrays(*want), np.broadcast_arrays(*got))


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


@pytest.mark.parametrize("kwargs", [dict(window=-1), dict(num_sinks=-1), dict(window=2.5),
                                    dict(softcap=0.0), dict(scale="1")])
def test_bad_spec_raises(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AttentionSpec(**kwargs)


def test_spec_and_planner_are_the_only_longjax_imports_of_the_kernels():
    """Imports point one way: the Pallas kernels use only the spec / planner leaf of
    longjax, and the leaf imports nothing of longjax or of the kernels."""
    root = pathlib.Path(__file__).parents[1]
    leaf = {"longjax.ops.attention.spec", "longjax.ops.attention.planner"}

    def imports(path):
        tree = ast.parse(path.read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
            a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}

    for path in (root / "pallas_kernels").rglob("*.py"):
        assert {m for m in imports(path) if m.startswith("longjax")} <= leaf, path
    for name in leaf:
        path = root / (name.replace(".", "/") + ".py")
        assert not {m for m in imports(path) if m.split(".")[0] in ("longjax", "pallas_kernels")}
