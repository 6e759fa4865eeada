"""The block planner: which key blocks a range of queries sees, derived in one place.

`key_blocks` gives, for the queries at positions `q_first .. q_last`, the key blocks to
skip, to visit with a mask (partial) and to visit without one (full). It is elementwise
in its position arguments and works on NumPy values (whole tables at trace time: the
`xla` path) and on traced values (one query block: the Pallas kernels; a tile of global
positions: ring attention). `query_blocks` is its transpose for key-major loops (the
dk / dv kernels); both take the band of `t - s` from the `AttentionSpec` and intersect
it with the real (unpadded) columns in `_band_blocks`.

Blocks hold `block_q` queries or `block_k` keys (the last block of an axis may be
padded). A tile is full when every pair in it is visible and it needs no mask for
padding or sinks: it holds no padded key, no sink key and (for `query_blocks`) no padded
query; `key_blocks` lets padded query rows through, since the kernels slice them off.
Segment ids are checked per element, so with segments no tile is full; with traced
positions (`spec.has_positions`) a `Tiling` plans every tile as partial.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class KeyBlocks(NamedTuple):
    """Key blocks of a query range: the sink blocks `[0, sinks)` (always masked), then the
    band `[lo, hi)`, inside which `[full_lo, full_hi)` needs no mask. Others are skipped."""

    sinks: int
    lo: int
    full_lo: int
    full_hi: int
    hi: int


class QueryBlocks(NamedTuple):
    """Query blocks that see a key range: `[lo, hi)`, `[full_lo, full_hi)` unmasked."""

    lo: int
    full_lo: int
    full_hi: int
    hi: int


def _xp(*values):
    return jnp if any(isinstance(x, jax.Array) for x in values) else np


def _band_blocks(xp, d_lo, d_hi, first, last, start, length, block):
    """Blocks of `block` columns seen from the rows `first .. last` through the band
    `d_lo <= row - col <= d_hi` (None: unbounded), among the columns `start .. length - 1`:
    `(lo, full_lo, full_hi, hi)`; full blocks are whole (no padding) and seen by every row."""
    a = start if d_hi is None else xp.maximum(start, first - d_hi)  # seen by some row
    b = length - 1 if d_lo is None else xp.minimum(length - 1, last - d_lo)
    lo = a // block
    hi = lo if d_lo is not None and d_hi is not None and d_lo > d_hi else xp.where(
        a > b, lo, b // block + 1)
    a_all = start if d_hi is None else xp.maximum(start, last - d_hi)  # seen by every row
    b_all = length - 1 if d_lo is None else xp.minimum(length - 1, first - d_lo)
    full_lo = xp.clip(-(-a_all // block), lo, xp.maximum(lo, hi))
    full_hi = xp.clip((b_all + 1) // block, full_lo, xp.maximum(full_lo, hi))
    return lo, full_lo, full_hi, hi


def key_blocks(spec, q_first, q_last, *, block_k, kv_len):
    """`KeyBlocks` of `block_k` keys (of `kv_len`) for the queries `q_first .. q_last`."""
    xp = _xp(q_first, q_last)
    sink_blocks = min(-(-spec.sinks // block_k), -(-kv_len // block_k))
    sinks = sink_blocks
    if spec.causal and sink_blocks:  # a sink block is seen once a query reaches its start
        sinks = xp.clip(q_last // block_k + 1, 0, sink_blocks)
    d_lo, d_hi = spec.band
    lo, full_lo, full_hi, hi = _band_blocks(xp, d_lo, d_hi, q_first, q_last,
                                            sink_blocks * block_k, kv_len, block_k)
    if spec.has_segments:  # every tile needs the per-element segment check
        full_lo = full_hi = hi
    return KeyBlocks(sinks, lo, full_lo, full_hi, hi)


def query_blocks(spec, k_first, k_last, *, block_q, q_len):
    """`QueryBlocks` of `block_q` queries (of `q_len`) that see the keys `k_first .. k_last`."""
    xp = _xp(k_first, k_last)
    d_lo, d_hi = spec.band  # t - s in [d_lo, d_hi]  <=>  s - t in [-d_hi, -d_lo]
    lo, full_lo, full_hi, hi = _band_blocks(
        xp, None if d_hi is None else -d_hi, None if d_lo is None else -d_lo, k_first, k_last,
        0, q_len, block_q)
    if spec.sinks:  # a block holding sinks is seen by every (later, when causal) query
        is_sink = k_first < spec.sinks
        n_q = -(-q_len // block_q)
        if spec.causal:  # from the query block of the first sink on, if a query reaches it
            lo = xp.where(is_sink, k_first // block_q, lo)
            hi = xp.where(is_sink, xp.where(k_first < q_len, n_q, lo), hi)
        else:
            lo, hi = xp.where(is_sink, 0, lo), xp.where(is_sink, n_q, hi)
        full_lo = xp.where(is_sink, lo, full_lo)  # sink blocks are always masked
        full_hi = xp.where(is_sink, lo, full_hi)
    if spec.has_segments:
        full_lo = full_hi = hi
    return QueryBlocks(lo, full_lo, full_hi, hi)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """T queries in blocks of `bq` and S keys in blocks of `bk`, compared by index."""

    T: int
    S: int
    bq: int
    bk: int

    @property
    def nq(self):
        return -(-self.T // self.bq)

    @property
    def nk(self):
        return -(-self.S // self.bk)

    @property
    def Tp(self):
        return self.nq * self.bq

    @property
    def Sp(self):
        return self.nk * self.bk

    def needs_mask(self, spec):
        """False when no tile needs a mask (padded query rows are sliced off, not masked)."""
        return spec.masks_positions or spec.has_segments or self.S != self.Sp

    def key_blocks(self, spec, i):
        """`KeyBlocks` of query block `i` (an int, a NumPy array or traced)."""
        if spec.has_positions:  # positions are traced: every block is visited and masked
            zero = i * 0
            return KeyBlocks(zero, zero, zero, zero, zero + self.nk)
        q_first = i * self.bq
        q_last = _xp(i).minimum(q_first + self.bq, self.T) - 1
        return key_blocks(spec, q_first, q_last, block_k=self.bk, kv_len=self.S)

    def query_blocks(self, spec, j):
        """`QueryBlocks` of key block `j` (an int, a NumPy array or traced)."""
        if spec.has_positions:
            zero = j * 0
            return QueryBlocks(zero, zero, zero, zero + self.nq)
        k_first = j * self.bk
        k_last = _xp(j).minimum(k_first + self.bk, self.S) - 1
        out = query_blocks(spec, k_first, k_last, block_q=self.bq, q_len=self.T)
        if self.S % self.bk:  # the padded last key block is always masked
            full_hi = _xp(j).where(k_first + self.bk > self.S, out.lo, out.full_hi)
            out = out._replace(full_lo=_xp(j).minimum(out.full_lo, full_hi), full_hi=full_hi)
        return out

    def visited(self, spec):
        """NumPy bool `[nq, nk]`: the tiles `key_blocks` visits (sinks and band)."""
        kb = self.key_blocks(spec, np.arange(self.nq)[:, None])
        j = np.arange(self.nk)[None, :]
        return np.broadcast_to((j < kb.sinks) | ((j >= kb.lo) & (j < kb.hi)),
                               (self.nq, self.nk))
