"""Shared pieces of the GPU and TPU flash-attention kernels.

Argument preparation (padding to whole blocks) and the per-tile math: scores with
soft-cap and ALiBi, the online-softmax step of FlashAttention (Dao et al. 2022) and the
FlashAttention-2 backward tile (Dao 2023). The options come from an `AttentionSpec`, the
blocks each program visits from the block planner (`longjax.ops.attention.planner`), the
only part of longjax the kernels import. Tile tensors are 2-D: q `[bq, D]`, k / v
`[bk, D]`, row statistics `[bq, 1]`, query positions `[bq, 1]`, key positions `[1, bk]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longjax.ops.attention.planner import Tiling
from longjax.ops.attention.spec import segment_visible


def prepare(spec, q, k, v, side, *, block_q, block_k):
    """Pads q / k / v `[B, T, H, D]` / `[B, S, K, D]` to whole blocks and broadcasts the
    integer side inputs to `[B, Tp]` / `[B, Sp]`.

    Returns `(tiling, arrays)`; `arrays` holds q, k, v and, where the spec has them,
    q_pos / k_pos, q_seg / k_seg (int32; padding is segment 0, which sees nothing and is
    seen by nothing) and slopes (fp32).
    """
    if side.bias is not None:
        raise ValueError("bias is not supported by the Pallas kernels; use impl='xla' or "
                         "pass alibi_slopes for ALiBi")
    B, T = q.shape[:2]
    tiling = Tiling(T=T, S=k.shape[1], bq=block_q, bk=block_k)

    def pad(x, n, axis=1):
        return jnp.pad(x, [(0, n - x.shape[axis]) if a == axis else (0, 0)
                           for a in range(x.ndim)])

    def ints(x, n):
        return pad(jnp.broadcast_to(x, (B, x.shape[1])).astype(jnp.int32), n)

    arrays = dict(q=pad(q, tiling.Tp), k=pad(k, tiling.Sp), v=pad(v, tiling.Sp))
    if spec.has_positions:
        arrays.update(q_pos=ints(side.q_positions, tiling.Tp),
                      k_pos=ints(side.kv_positions, tiling.Sp))
    if spec.has_segments:
        arrays.update(q_seg=ints(side.segment_ids, tiling.Tp),
                      k_seg=ints(side.kv_segments, tiling.Sp))
    if spec.has_alibi:
        arrays["slopes"] = side.alibi_slopes.astype(jnp.float32)
    return tiling, arrays


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


def scores(spec, q, k, q_pos, k_pos, slope):
    """Tile scores `[bq, bk]` fp32 before masking, tanh of the soft-cap and |q_pos - k_pos|.
    `spec.scale` must be set (`prepare`'s callers fill in D^-0.5)."""
    s = dot_nt(q, k) * spec.scale
    tanh = dist = None
    if spec.softcap is not None:
        tanh = jnp.tanh(s / spec.softcap)
        s = spec.softcap * tanh
    if spec.has_alibi:
        dist = jnp.abs(q_pos - k_pos).astype(jnp.float32)
        s = s - slope * dist
    return s, tanh, dist


def mask(spec, tiling, q_pos, k_pos, k_idx, q_seg, k_seg):
    """Tile mask `[bq, bk]`: the spec on positions, key padding and segments."""
    m = spec.visible(q_pos, k_pos) & (k_idx < tiling.S)
    if spec.has_segments:
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


def grad_step(spec, s, tanh, m_tile, lse, delta, do, v):
    """Backward tile: probabilities `p` and `ds` (gradient of the raw `q.k`, scaled).

    Also returns `g`, the gradient of the post-cap scores (used for the ALiBi slopes).
    `lse` must be finite (0 for rows that see nothing; they are masked out).
    """
    p = jnp.exp(s - lse)
    if m_tile is not None:
        p = jnp.where(m_tile, p, 0.0)
    g = p * (dot_nt(do, v) - delta)
    ds = g if tanh is None else g * (1.0 - tanh * tanh)
    return p, ds * spec.scale, g
