"""Shared pieces of the GPU and TPU flash-attention kernels.

Argument preparation (padding to whole blocks), the range of key blocks each query block
visits (and the reverse) derived from a `MaskSpec`, and the per-tile math: scores with
soft-cap and ALiBi, the online-softmax step of FlashAttention (Dao et al. 2022) and the
FlashAttention-2 backward tile (Dao 2023). Tile tensors are 2-D: q `[bq, D]`,
k / v `[bk, D]`, row statistics `[bq, 1]`, query positions `[bq, 1]`, key positions
`[1, bk]`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from longjax.ops.masks import MaskSpec, segment_visible


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything a kernel needs to know at trace time (hashable)."""

    spec: MaskSpec
    T: int
    S: int
    bq: int
    bk: int
    H: int
    K: int
    D: int
    scale: float
    softcap: float | None
    has_positions: bool
    has_segments: bool
    has_alibi: bool

    @property
    def G(self):
        return self.H // self.K

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

    @property
    def sink_blocks(self):
        """Key blocks holding sink tokens (sinks only exist together with a window)."""
        return -(-self.spec.num_sinks // self.bk) if self.spec.window is not None else 0

    @property
    def any_mask(self):
        return not (self.spec.is_trivial and not self.has_segments and self.S == self.Sp)


def prepare(q, k, v, *, causal, window, num_sinks, segment_ids, kv_segment_ids, q_positions,
            kv_positions, alibi_slopes, softcap, scale, block_q, block_k, bias=None):
    """Pads q / k / v to whole blocks and broadcasts the integer side inputs to `[B, *]`.

    Returns `(static, arrays)`; `arrays` holds q, k, v and, where given, q_pos / k_pos,
    q_seg / k_seg (int32) and slopes (fp32).
    """
    if bias is not None:
        raise ValueError("bias is not supported by the Pallas kernels; use impl='xla' or "
                         "pass alibi_slopes for ALiBi")
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    st = Static(
        spec=MaskSpec(causal=causal, window=window, num_sinks=num_sinks), T=T, S=S,
        bq=block_q, bk=block_k, H=H, K=K, D=D, scale=D**-0.5 if scale is None else scale,
        softcap=softcap, has_positions=q_positions is not None,
        has_segments=segment_ids is not None or kv_segment_ids is not None,
        has_alibi=alibi_slopes is not None,
    )

    def pad(x, n, axis=1):
        return jnp.pad(x, [(0, n - x.shape[axis]) if a == axis else (0, 0)
                           for a in range(x.ndim)])

    def ints(x, n):
        return pad(jnp.broadcast_to(x, (B, x.shape[1])).astype(jnp.int32), n)

    arrays = dict(q=pad(q, st.Tp), k=pad(k, st.Sp), v=pad(v, st.Sp))
    if st.has_positions:
        arrays.update(q_pos=ints(q_positions, st.Tp), k_pos=ints(kv_positions, st.Sp))
    if st.has_segments:
        if segment_ids is None:
            segment_ids = jnp.ones((1, T), jnp.int32)
        if kv_segment_ids is None:
            kv_segment_ids = segment_ids
        # Padding gets segment 0, which sees nothing and is seen by nothing.
        arrays.update(q_seg=ints(segment_ids, st.Tp), k_seg=ints(kv_segment_ids, st.Sp))
    if st.has_alibi:
        arrays["slopes"] = alibi_slopes.astype(jnp.float32)
    return st, arrays


def _floordiv(a, b):
    return jnp.floor_divide(a, b) if isinstance(a, jax.Array) else a // b


def kv_blocks(st, i):
    """Key blocks for query block `i`: `(sink_hi, lo, full_lo, full_hi, hi)`.

    Visit blocks `[0, sink_hi)` (sinks) and `[lo, hi)`; inside the latter, tiles in
    `[full_lo, full_hi)` are FULL and need no mask. With positions nothing is static:
    every block is visited and masked.
    """
    if st.has_positions:
        return 0, 0, 0, 0, st.nk
    d_lo, d_hi = st.spec.band
    q0 = i * st.bq
    q1 = jnp.minimum(q0 + st.bq, st.T) - 1
    sink_hi = st.sink_blocks
    lo = jnp.int32(0) if math.isinf(d_hi) else jnp.maximum(0, _floordiv(q0 - d_hi, st.bk))
    hi = jnp.int32(st.nk) if math.isinf(d_lo) else jnp.minimum(
        st.nk, _floordiv(q1 - d_lo, st.bk) + 1)
    lo = jnp.maximum(lo, sink_hi)
    if d_lo > d_hi:  # window 0: only the sinks are visible
        hi = lo
    elif not math.isinf(d_hi):  # the window may start past the last key
        hi = jnp.where(q0 - d_hi > st.S - 1, lo, hi)
    if st.has_segments:  # every tile needs the per-element segment check
        return sink_hi, lo, hi, hi, hi
    full_lo = lo if math.isinf(d_hi) else -_floordiv(-(q1 - d_hi), st.bk)
    full_hi = hi if math.isinf(d_lo) else _floordiv(q0 - d_lo + 1, st.bk)
    full_hi = jnp.minimum(full_hi, st.S // st.bk)  # blocks with key padding are partial
    full_lo = jnp.clip(full_lo, lo, jnp.maximum(lo, hi))
    full_hi = jnp.clip(full_hi, full_lo, jnp.maximum(full_lo, hi))
    return sink_hi, lo, full_lo, full_hi, hi


def q_blocks(st, j):
    """Query blocks that see key block `j`: `(lo, full_lo, full_hi, hi)` as in `kv_blocks`."""
    if st.has_positions:
        return 0, 0, 0, st.nq
    d_lo, d_hi = st.spec.band
    k0 = j * st.bk
    k1 = jnp.minimum(k0 + st.bk, st.S) - 1
    lo = jnp.int32(0) if math.isinf(d_lo) else jnp.maximum(0, _floordiv(k0 + d_lo, st.bq))
    hi = jnp.int32(st.nq) if math.isinf(d_hi) else jnp.minimum(
        st.nq, _floordiv(k1 + d_hi, st.bq) + 1)
    if d_lo > d_hi:
        hi = lo
    elif not math.isinf(d_lo):  # only padded query rows may reach this key block
        hi = jnp.where(k0 + d_lo > st.T - 1, lo, hi)
    if st.sink_blocks:  # a sink block is seen by every (later, when causal) query
        is_sink = j < st.sink_blocks
        lo = jnp.where(is_sink, _floordiv(k0, st.bq) if st.spec.causal else 0, lo)
        hi = jnp.where(is_sink, st.nq, hi)
    if st.has_segments:
        return lo, hi, hi, hi
    full_lo = lo if math.isinf(d_lo) else -_floordiv(-(k1 + d_lo), st.bq)
    full_hi = hi if math.isinf(d_hi) else _floordiv(k0 + d_hi + 1, st.bq)
    full_hi = jnp.minimum(full_hi, st.T // st.bq)
    if st.sink_blocks or st.S % st.bk:  # sink tiles and key padding: always masked
        partial = (j < st.sink_blocks) | (k0 + st.bk > st.S)
        full_hi = jnp.where(partial, lo, full_hi)
    full_lo = jnp.clip(full_lo, lo, jnp.maximum(lo, hi))
    full_hi = jnp.clip(full_hi, full_lo, jnp.maximum(full_lo, hi))
    return lo, full_lo, full_hi, hi


def dot_nt(a, b):
    """`a @ b.T` with fp32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def dot_nn(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """`a.T @ b` with fp32 accumulation (an explicit 2-D transpose, as Mosaic prefers)."""
    return dot_nn(a.T, b)


def scores(st, q, k, q_pos, k_pos, slope):
    """Tile scores `[bq, bk]` fp32 before masking, tanh of the soft-cap and |q_pos - k_pos|."""
    s = dot_nt(q, k) * st.scale
    tanh = dist = None
    if st.softcap is not None:
        tanh = jnp.tanh(s / st.softcap)
        s = st.softcap * tanh
    if st.has_alibi:
        dist = jnp.abs(q_pos - k_pos).astype(jnp.float32)
        s = s - slope * dist
    return s, tanh, dist


def mask(st, q_pos, k_pos, k_idx, q_seg, k_seg):
    """Tile mask `[bq, bk]`: the spec on positions, key padding and segments."""
    m = st.spec.visible(q_pos, k_pos) & (k_idx < st.S)
    if st.has_segments:
        m &= segment_visible(q_seg[:, 0], k_seg[0])
    return m


def softmax_step(carry, s, m_tile, v):
    """One online-softmax update of `(m, l, acc)` with tile scores `s` and values `v`."""
    m, l, acc = carry
    if m_tile is not None:
        s = jnp.where(m_tile, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m - m_safe)
    return m_new, alpha * l + p.sum(axis=1, keepdims=True), alpha * acc + dot_nn(
        p.astype(v.dtype), v)


def finalize(m, l, acc):
    """Output `[bq, D]` fp32 and lse `[bq, 1]`; rows that saw no key give 0 and -inf."""
    empty = l == 0.0
    l = jnp.where(empty, 1.0, l)
    return acc / l, jnp.where(empty, -jnp.inf, m + jnp.log(l))


def grad_step(st, s, tanh, m_tile, lse, delta, do, v):
    """Backward tile: probabilities `p` and `ds` (gradient of the raw `q.k`, scaled).

    Also returns `g`, the gradient of the post-cap scores (used for the ALiBi slopes).
    `lse` must be finite (0 for rows that see nothing; they are masked out).
    """
    p = jnp.exp(s - lse)
    if m_tile is not None:
        p = jnp.where(m_tile, p, 0.0)
    g = p * (dot_nt(do, v) - delta)
    ds = g if tanh is None else g * (1.0 - tanh * tanh)
    return p, ds * st.scale, g
