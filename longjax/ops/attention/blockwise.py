"""Blockwise attention in pure JAX (the `"xla"` implementation), forward and backward.

FlashAttention in pure JAX: an online softmax over key blocks (Rabe & Staats 2021; Dao
et al. 2022) and the FlashAttention-2 backward from `out` and `lse` (Dao 2023), so
forward + backward memory is O(T). The tiles each block row visits come from the block
planner; skipped tiles cost nothing. Layout: q `[B, T, H, D]`, k / v `[B, S, K, D]`,
`G = H / K`; tiles are `bq` queries by `bk` keys.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from longjax.ops.attention.planner import Tiling
from longjax.ops.attention.spec import segment_visible


def default_block(n, preferred=512):
    """A block of up to `preferred` positions, a multiple of 8."""
    return min(preferred, -(-n // 8) * 8)


def pad_axis(x, axis, size, value=0):
    if x is None or x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


class Blocks:
    """Padded, grouped operands and per-tile helpers shared by the forward and backward.

    Tensors are kept as q `[B, Tp, K, G, D]`, k / v `[B, Sp, K, D]` (T, S padded to whole
    blocks); the bias is held at its broadcast shape `[b, h, t, s]` (size-1 dims not
    expanded) and sliced per tile.
    """

    def __init__(self, spec, q, k, v, side, *, block_q=None, block_k=None):
        B, T, H, D = q.shape
        S, K = k.shape[1], k.shape[2]
        self.B, self.T, self.S, self.H, self.K, self.G, self.D = B, T, S, H, K, H // K, D
        self.tiling = Tiling(T, S, block_q or default_block(T), block_k or default_block(S))
        self.bq, self.bk = self.tiling.bq, self.tiling.bk
        self.Tp, self.Sp = self.tiling.Tp, self.tiling.Sp
        self.nq, self.nk = self.tiling.nq, self.tiling.nk
        self.spec = spec
        self.scale = spec.softmax_scale(D)
        self.q = pad_axis(q, 1, self.Tp).reshape(B, self.Tp, K, self.G, D)
        self.k, self.v = pad_axis(k, 1, self.Sp), pad_axis(v, 1, self.Sp)
        self.q_seg = pad_axis(side.segment_ids, 1, self.Tp)
        self.kv_seg = pad_axis(side.kv_segments, 1, self.Sp)
        self.q_pos = pad_axis(side.q_positions, 1, self.Tp)
        self.kv_pos = pad_axis(side.kv_positions, 1, self.Sp)
        bias = side.bias
        self.bias_shape = None if bias is None else bias.shape
        if bias is not None:
            bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
            if bias.shape[2] == T:
                bias = pad_axis(bias, 2, self.Tp)
            if bias.shape[3] == S:
                bias = pad_axis(bias, 3, self.Sp)
        self.bias = bias
        alibi = side.alibi_slopes
        self.alibi = None if alibi is None else alibi.astype(jnp.float32)
        # The xla path also masks padded query rows (the kernels slice them off unmasked).
        self.needs_mask = self.tiling.needs_mask(spec) or T != self.Tp

    def visits(self, transpose=False):
        """Per block row: the tiles the planner visits `[n, m]` (padded) and their count."""
        tiles = self.tiling.visited(self.spec)
        if transpose:
            tiles = tiles.T
        counts = tiles.sum(1)
        idx = np.zeros((tiles.shape[0], max(1, counts.max())), np.int32)
        for r, row in enumerate(tiles):
            idx[r, : counts[r]] = np.nonzero(row)[0]
        return jnp.asarray(idx), jnp.asarray(counts, jnp.int32)

    def skip_empty(self, step, i, j, carry):
        """`step(carry)` unless segment ids leave tile (i, j) empty (packed documents)."""
        if self.q_seg is None:
            return step(carry)
        qs = jax.lax.dynamic_slice_in_dim(self.q_seg, i * self.bq, self.bq, 1)
        ks = jax.lax.dynamic_slice_in_dim(self.kv_seg, j * self.bk, self.bk, 1)
        return jax.lax.cond(segment_visible(qs, ks).any(), step, lambda c: c, carry)

    def _bias_tile(self, i, j):
        b = self.bias
        start = (0, 0, i * self.bq if b.shape[2] > 1 else 0, j * self.bk if b.shape[3] > 1 else 0)
        size = b.shape[:2] + (min(b.shape[2], self.bq), min(b.shape[3], self.bk))
        return start, size

    def _pos(self, i, j):
        qi = i * self.bq + jnp.arange(self.bq)
        kj = j * self.bk + jnp.arange(self.bk)
        if self.q_pos is None:
            return qi[None], kj[None], qi, kj
        qp = jax.lax.dynamic_slice_in_dim(self.q_pos, i * self.bq, self.bq, 1)
        kp = jax.lax.dynamic_slice_in_dim(self.kv_pos, j * self.bk, self.bk, 1)
        return qp, kp, qi, kj

    def scores(self, i, j):
        """Tile (i, j): scores `[B, K, G, bq, bk]` fp32 (unmasked), mask, tanh and |dpos|."""
        qt = jax.lax.dynamic_slice_in_dim(self.q, i * self.bq, self.bq, 1)
        kt = jax.lax.dynamic_slice_in_dim(self.k, j * self.bk, self.bk, 1)
        s = jnp.einsum("bqkgd,bskd->bkgqs", qt, kt, preferred_element_type=jnp.float32)
        s = s * self.scale
        tanh = None
        if self.spec.softcap is not None:
            tanh = jnp.tanh(s / self.spec.softcap)
            s = self.spec.softcap * tanh
        if self.bias is not None:
            start, size = self._bias_tile(i, j)
            bt = jax.lax.dynamic_slice(self.bias, start, size).astype(jnp.float32)
            hb = bt.shape[1]
            s = s + bt.reshape(bt.shape[0], self.K if hb > 1 else 1, self.G if hb > 1 else 1,
                               *bt.shape[2:])
        qp, kp, qi, kj = self._pos(i, j)
        dist = None
        if self.alibi is not None:
            dist = jnp.abs(qp[:, :, None] - kp[:, None, :]).astype(jnp.float32)[:, None, None]
            s = s - self.alibi.reshape(1, self.K, self.G, 1, 1) * dist
        mask = None
        if self.needs_mask:
            mask = self.spec.visible(qp[:, :, None], kp[:, None, :])
            mask &= (qi[:, None] < self.T) & (kj[None, :] < self.S)
            if self.q_seg is not None:
                qs = jax.lax.dynamic_slice_in_dim(self.q_seg, i * self.bq, self.bq, 1)
                ks = jax.lax.dynamic_slice_in_dim(self.kv_seg, j * self.bk, self.bk, 1)
                mask &= segment_visible(qs, ks)
            mask = mask[:, None, None]
        return s, mask, tanh, dist


def forward(blk):
    """Online-softmax forward: out `[B, T, H, D]` (q dtype), lse `[B, H, T]` fp32."""
    idx, counts = blk.visits()
    B, K, G, bq, D = blk.B, blk.K, blk.G, blk.bq, blk.D

    def q_block(args):
        i, row, count = args

        def body(n, carry):
            return blk.skip_empty(functools.partial(step, row[n]), i, row[n], carry)

        def step(j, carry):
            m, l, acc = carry
            s, mask, _, _ = blk.scores(i, j)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            vt = jax.lax.dynamic_slice_in_dim(blk.v, j * blk.bk, blk.bk, 1)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vt.dtype), vt,
                            preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        init = (jnp.full((B, K, G, bq), -jnp.inf, jnp.float32),
                jnp.zeros((B, K, G, bq), jnp.float32), jnp.zeros((B, K, G, bq, D), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, count, body, init)
        out = acc / jnp.where(l == 0, 1.0, l)[..., None]
        lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(jnp.where(l == 0, 1.0, l)))
        return out, lse

    out, lse = jax.lax.map(q_block, (jnp.arange(blk.nq), idx, counts))
    # out [nq, B, K, G, bq, D] -> [B, T, H, D]; lse [nq, B, K, G, bq] -> [B, H, T]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(B, blk.Tp, blk.H, D)[:, : blk.T]
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(B, blk.H, blk.Tp)[:, :, : blk.T]
    return out.astype(blk.q.dtype), lse


def backward(blk, out, lse, dout, dlse=None):
    """FlashAttention-2 backward: dq, dk, dv and (when present) dbias, dslopes."""
    B, K, G, bq, bk, D = blk.B, blk.K, blk.G, blk.bq, blk.bk, blk.D
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse
    # Padded query rows are masked out, so their lse / delta values are never used.
    lse = pad_axis(jnp.where(jnp.isfinite(lse), lse, 0.0), 2, blk.Tp).reshape(B, K, G, blk.Tp)
    delta = pad_axis(delta, 2, blk.Tp).reshape(B, K, G, blk.Tp)
    do = pad_axis(dout, 1, blk.Tp).reshape(B, blk.Tp, K, G, D)
    idx, counts = blk.visits(transpose=True)
    has_bias, has_alibi = blk.bias is not None, blk.alibi is not None

    def kv_block(carry, args):
        j, row, count = args
        kt = jax.lax.dynamic_slice_in_dim(blk.k, j * bk, bk, 1)
        vt = jax.lax.dynamic_slice_in_dim(blk.v, j * bk, bk, 1)

        def body(n, inner):
            return blk.skip_empty(functools.partial(step, row[n]), row[n], j, inner)

        def step(i, inner):
            dk, dv, dq, dbias, dslopes = inner
            s, mask, tanh, dist = blk.scores(i, j)
            lse_t = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, 3)
            delta_t = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, 3)
            do_t = jax.lax.dynamic_slice_in_dim(do, i * bq, bq, 1)
            q_t = jax.lax.dynamic_slice_in_dim(blk.q, i * bq, bq, 1)
            p = jnp.exp(s - lse_t[..., None])
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do.dtype), do_t,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", do_t, vt, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_t[..., None])
            if has_bias:
                start, size = blk._bias_tile(i, j)
                g = ds.reshape(B, blk.H, bq, bk)
                axes = tuple(a for a in range(4) if size[a] == 1 and g.shape[a] > 1)
                g = g.sum(axes, keepdims=True)
                dbias = jax.lax.dynamic_update_slice(
                    dbias, jax.lax.dynamic_slice(dbias, start, size) + g, start)
            if has_alibi:
                dslopes = dslopes - (ds * dist).sum((0, 3, 4))
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
            ds = (ds * blk.scale).astype(blk.q.dtype)
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, q_t, preferred_element_type=jnp.float32)
            dq_t = jnp.einsum("bkgqs,bskd->bqkgd", ds, kt, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, 1) + dq_t, i * bq, 1)
            return dk, dv, dq, dbias, dslopes

        dq, dbias, dslopes = carry
        zeros = jnp.zeros((B, bk, K, D), jnp.float32)
        dk, dv, dq, dbias, dslopes = jax.lax.fori_loop(
            0, count, body, (zeros, zeros, dq, dbias, dslopes))
        return (dq, dbias, dslopes), (dk, dv)

    init = (jnp.zeros(blk.q.shape, jnp.float32),
            jnp.zeros(blk.bias.shape, jnp.float32) if has_bias else None,
            jnp.zeros((K, G), jnp.float32) if has_alibi else None)
    (dq, dbias, dslopes), (dk, dv) = jax.lax.scan(kv_block, init, (jnp.arange(blk.nk), idx, counts))
    dq = dq.reshape(B, blk.Tp, blk.H, D)[:, : blk.T].astype(blk.q.dtype)
    dk = dk.transpose(1, 0, 2, 3, 4).reshape(B, blk.Sp, K, D)[:, : blk.S].astype(blk.k.dtype)
    dv = dv.transpose(1, 0, 2, 3, 4).reshape(B, blk.Sp, K, D)[:, : blk.S].astype(blk.v.dtype)
    if has_bias:
        full = (1,) * (4 - len(blk.bias_shape)) + blk.bias_shape
        dbias = dbias[:, :, : full[2], : full[3]].reshape(blk.bias_shape)
    if has_alibi:
        dslopes = dslopes.reshape(blk.H)
    return dq, dk, dv, dbias, dslopes
