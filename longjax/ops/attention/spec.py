"""The attention spec: the options that shape one attention call, validated once.

An `AttentionSpec` (frozen, hashable, so it is static under `jax.jit`) travels from the
public entry points to the reference, the blockwise `xla` path, the decode path, the
Pallas kernels and ring attention; the arrays beside q, k, v travel as `SideInputs`.

Scores are `softcap * tanh(scale * q.k / softcap)` (Gemma 2) plus a dense bias plus ALiBi
`-slope_h * |t - s|` (Press et al. 2022). The mask: causal, a sliding window of width `w`
(keys with `0 <= t - s < w`; `|t - s| < w` when not causal), `num_sinks` always-visible
first keys (with a window: the Lambda-shaped mask of LM-Infinite, Han et al. 2023, and
the attention sinks of StreamingLLM, Xiao et al. 2023) and packed segment ids (0 is
padding and sees nothing). t and s are positions: the indices, or `q_positions` /
`kv_positions` when given.

This module and `planner` import only JAX and NumPy: `pallas_kernels` imports them and
nothing else of longjax.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static options of an attention call, and which side inputs it has."""

    causal: bool = False
    window: int | None = None
    num_sinks: int = 0
    softcap: float | None = None
    scale: float | None = None  # None: D ** -0.5
    has_segments: bool = False
    has_positions: bool = False
    has_alibi: bool = False

    def __post_init__(self):
        if self.window is not None and (int(self.window) != self.window or self.window < 0):
            raise ValueError(f"window must be an int >= 0 or None; got {self.window!r}")
        if int(self.num_sinks) != self.num_sinks or self.num_sinks < 0:
            raise ValueError(f"num_sinks must be an int >= 0; got {self.num_sinks!r}")
        if self.softcap is not None and not (isinstance(self.softcap, numbers.Real)
                                             and self.softcap > 0):
            raise ValueError(f"softcap must be a number > 0 or None; got {self.softcap!r}")
        if self.scale is not None and not isinstance(self.scale, numbers.Real):
            raise ValueError(f"scale must be a number or None; got {self.scale!r}")

    @property
    def band(self):
        """`(lo, hi)`: the non-sink keys seen by query t are those with lo <= t - s <= hi
        (None: unbounded)."""
        lo = 0 if self.causal else None
        hi = None
        if self.window is not None:
            hi = self.window - 1
            if not self.causal:
                lo = -(self.window - 1)
        return lo, hi

    @property
    def sinks(self):
        """The number of always-visible first keys (sinks exist only with a window)."""
        return self.num_sinks if self.window is not None else 0

    @property
    def masks_positions(self):
        """True when positions hide some key from some query (segments aside)."""
        return self.causal or self.window is not None

    def softmax_scale(self, head_dim):
        return head_dim**-0.5 if self.scale is None else self.scale

    def visible(self, q_pos, k_pos):
        """Boolean mask from broadcastable integer query and key positions."""
        d = q_pos - k_pos
        mask = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)), bool)
        if self.causal:
            mask &= d >= 0
        if self.window is not None:
            lo, hi = self.band
            local = d <= hi
            if not self.causal:
                local &= d >= lo
            if self.num_sinks:
                local |= k_pos < self.num_sinks
            mask &= local
        return mask


class SideInputs(NamedTuple):
    """The arrays beside q, k, v; None where absent. Segment ids and positions are int
    `[B or 1, T]` (queries) / `[B or 1, S]` (keys), `alibi_slopes` `[H]`, `bias`
    broadcastable to `[B, H, T, S]`. Built by `make_spec`: when only key segment ids are
    given the query ids are all 1; read the key ids as `kv_segments`."""

    segment_ids: Any = None
    kv_segment_ids: Any = None
    q_positions: Any = None
    kv_positions: Any = None
    alibi_slopes: Any = None
    bias: Any = None

    @property
    def kv_segments(self):
        """The key segment ids: `kv_segment_ids`, or the query ids when only those are given."""
        return self.segment_ids if self.kv_segment_ids is None else self.kv_segment_ids


def make_spec(q, k, v, *, causal=False, window=None, num_sinks=0, softcap=None, scale=None,
              segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None,
              alibi_slopes=None, bias=None):
    """Validates one attention call (q `[B, T, H, D]`, k / v `[B, S, K, D]`, `H % K == 0`)
    and returns `(AttentionSpec, SideInputs)`; a bad argument raises a ValueError naming it."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got shapes {q.shape}, "
                         f"{k.shape}, {v.shape}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree on batch, seq and heads; got {k.shape}, {v.shape}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head_dim differ: {q.shape[3]} vs {k.shape[3]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    B, T, H, _ = q.shape
    S = k.shape[1]
    for name, x, n in (("segment_ids", segment_ids, T), ("q_positions", q_positions, T),
                       ("kv_segment_ids", kv_segment_ids, S), ("kv_positions", kv_positions, S)):
        if x is not None and (x.ndim != 2 or x.shape[1] != n or x.shape[0] not in (1, B)):
            raise ValueError(f"{name} must be [batch or 1, {n}]; got shape {x.shape}")
        if x is not None and not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array; got {x.dtype}")
    if (q_positions is None) != (kv_positions is None):
        raise ValueError("q_positions and kv_positions must be given together")
    if bias is not None and (bias.ndim > 4 or any(
            b not in (1, n) for b, n in zip(bias.shape[::-1], (S, T, H, B), strict=False))):
        raise ValueError(f"bias must broadcast to [B, H, T, S] = {(B, H, T, S)}; got {bias.shape}")
    if alibi_slopes is not None and alibi_slopes.shape != (H,):
        raise ValueError(f"alibi_slopes must be [num_heads] = [{H}]; got {alibi_slopes.shape}")
    has_segments = segment_ids is not None or kv_segment_ids is not None
    segment_ids = query_segments(T, segment_ids, kv_segment_ids)
    spec = AttentionSpec(causal=causal, window=window, num_sinks=num_sinks, softcap=softcap,
                         scale=scale, has_segments=has_segments,
                         has_positions=q_positions is not None,
                         has_alibi=alibi_slopes is not None)
    return spec, SideInputs(segment_ids, kv_segment_ids, q_positions, kv_positions,
                            alibi_slopes, bias)


def query_segments(T, segment_ids, kv_segment_ids):
    """The query segment ids: as given, or all 1 when only key ids are given."""
    if segment_ids is None and kv_segment_ids is not None:
        return jnp.ones((1, T), jnp.int32)
    return segment_ids


def segment_visible(q_segment_ids, kv_segment_ids):
    """Boolean `[..., T, S]` from `[..., T]`, `[..., S]` ids: same segment, not padding (0)."""
    q = q_segment_ids[..., :, None]
    return (q == kv_segment_ids[..., None, :]) & (q != 0)
