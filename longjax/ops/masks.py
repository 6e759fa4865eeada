"""Attention mask specs: described by a few numbers, never materialised as a T x S array.

A `MaskSpec` combines causal masking, a sliding window of width `w` (keys with
`0 <= t - s < w`; `|t - s| < w` when not causal), `num_sinks` always-visible first keys
(with a window: the Lambda-shaped mask of LM-Infinite, Han et al. 2023, and the
attention sinks of StreamingLLM, Xiao et al. 2023) and, given at call time, packed
segment ids (segment 0 is padding and sees nothing). The default spec is bidirectional.

`visible(...)` evaluates the mask on any broadcastable query / key positions (a tile in
a blockwise loop or inside a Pallas kernel); `tile_map(...)` classifies every
(query block, key block) tile as EMPTY, PARTIAL or FULL so kernels skip empty tiles and
skip masking on full ones.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which keys a query sees, from positions alone (segments are checked separately)."""

    causal: bool = False
    window: int | None = None
    num_sinks: int = 0

    def __post_init__(self):
        if self.window is not None and (int(self.window) != self.window or self.window < 0):
            raise ValueError(f"window must be an int >= 0 or None; got {self.window!r}")
        if int(self.num_sinks) != self.num_sinks or self.num_sinks < 0:
            raise ValueError(f"num_sinks must be an int >= 0; got {self.num_sinks!r}")

    @property
    def band(self):
        """`(lo, hi)`: the non-sink keys seen by query t are those with lo <= t - s <= hi."""
        lo = 0 if self.causal else -np.inf
        hi = np.inf
        if self.window is not None:
            hi = self.window - 1
            if not self.causal:
                lo = -(self.window - 1)
        return lo, hi

    @property
    def is_trivial(self):
        """True when every key is visible to every query (before segments and padding)."""
        return not self.causal and self.window is None

    def visible(self, q_pos, k_pos):
        """Boolean mask from broadcastable integer query and key positions."""
        d = q_pos - k_pos
        lo, hi = self.band
        mask = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)), bool)
        if self.causal:
            mask &= d >= 0
        if self.window is not None:
            local = d <= hi
            if not self.causal:
                local &= d >= lo
            if self.num_sinks:
                local |= k_pos < self.num_sinks
            mask &= local
        return mask

    def tile_map(self, q_len, kv_len, block_q, block_k, *, has_segments=False):
        """`int8 [ceil(T / bq), ceil(S / bk)]` of EMPTY / PARTIAL / FULL tiles.

        Query t and key s are compared by index. Tiles reaching past `q_len` / `kv_len`
        (padding) are never FULL; with `has_segments=True` no tile is FULL
        either, since segments must still be checked per element.
        """
        nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
        q0 = np.arange(nq)[:, None] * block_q
        k0 = np.arange(nk)[None, :] * block_k
        q1 = np.minimum(q0 + block_q, q_len) - 1  # last valid row
        k1 = np.minimum(k0 + block_k, kv_len) - 1
        lo, hi = self.band
        # Non-sink part of the tile: columns max(k0, n) .. k1.
        ks = np.maximum(k0, self.num_sinks if self.window is not None else 0)
        has_band = ks <= k1
        d_min, d_max = q0 - k1, q1 - ks
        band_any = has_band & (d_max >= lo) & (d_min <= hi) & (lo <= hi)
        band_all = ~has_band | ((d_min >= lo) & (d_max <= hi))
        # Sink part (only distinct with a window): columns k0 .. min(k1, n - 1), causal only.
        if self.window is not None and self.num_sinks:
            ke = np.minimum(k1, self.num_sinks - 1)
            has_sink = k0 <= ke
            sink_any = has_sink & ((q1 - k0 >= 0) if self.causal else True)
            sink_all = ~has_sink | ((q0 - ke >= 0) if self.causal else True)
        else:
            sink_any, sink_all = np.zeros_like(band_any), np.ones_like(band_all)
        any_ = band_any | sink_any
        full = band_all & sink_all
        full &= (q0 + block_q <= q_len) & (k0 + block_k <= kv_len) & (not has_segments)
        return np.where(full & any_, FULL, np.where(any_, PARTIAL, EMPTY)).astype(np.int8)


def segment_visible(q_segment_ids, kv_segment_ids):
    """Boolean `[..., T, S]` from `[..., T]`, `[..., S]` ids: same segment, not padding (0)."""
    q = q_segment_ids[..., :, None]
    return (q == kv_segment_ids[..., None, :]) & (q != 0)
