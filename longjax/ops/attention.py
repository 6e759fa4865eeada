"""Softmax attention: the reference, a blockwise pure-JAX version and the `impl=` dispatcher.

Layout: q `[B, T, H, D]`, k / v `[B, S, K, D]` with `H % K == 0` (GQA / MQA when K < H).
Scores are `softcap * tanh(scale * q.k / softcap)` (Gemma 2) plus `bias` plus ALiBi
(`-slope_h * |pos_q - pos_k|`, Press et al. 2022), masked by a `MaskSpec` and segment ids
(`longjax.ops.masks`). The logsumexp `lse` is `[B, H, T]` fp32; a query row that sees no
key gives output 0 and lse = -inf.

`impl="xla"` is FlashAttention in pure JAX: an online softmax over key blocks (Rabe &
Staats 2021; Dao et al. 2022) and the FlashAttention-2 backward from `out` and `lse`
(Dao 2023), so forward + backward memory is O(T); empty tiles are skipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from longjax.ops import impl as impl_lib
from longjax.ops.masks import EMPTY, MaskSpec, segment_visible

IMPLS = ("auto", "reference", "split_kv", "xla", "pallas", "pallas_interpret", "cudnn")
_FLOAT_DTYPES = {
    "reference": (jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16),
    "split_kv": (jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16),
    "xla": (jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16),
    "pallas": (jnp.float32, jnp.bfloat16, jnp.float16),
    "pallas_interpret": (jnp.float32, jnp.bfloat16, jnp.float16),
    "cudnn": (jnp.bfloat16, jnp.float16),
}
# Arguments that shape the computation; the public entry points are jitted with these static.
_STATIC = ("causal", "window", "num_sinks", "softcap", "scale", "impl", "block_q", "block_k")


def _check_args(q, k, v, window, num_sinks, segment_ids=None, kv_segment_ids=None,
                q_positions=None, kv_positions=None, bias=None, alibi_slopes=None):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be [batch, seq, heads, head_dim]; got shapes {q.shape}, {k.shape}, "
            f"{v.shape}"
        )
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree on batch, seq and heads; got {k.shape}, {v.shape}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head_dim differ: {q.shape[3]} vs {k.shape[3]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})"
        )
    MaskSpec(window=window, num_sinks=num_sinks)  # validates window and num_sinks
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


def _check_dtype(impl, *arrays):
    for x in arrays:
        if not any(x.dtype == d for d in _FLOAT_DTYPES[impl]):
            allowed = ", ".join(jnp.dtype(d).name for d in _FLOAT_DTYPES[impl])
            raise ValueError(f"impl={impl!r} supports q/k/v dtypes {allowed}; got {x.dtype}")


def attention_mask(
    q_len, kv_len, *, causal=False, segment_ids=None, kv_segment_ids=None, window=None,
    num_sinks=0, q_positions=None, kv_positions=None,
):
    """Boolean mask `[B or 1, 1, T, S]`: True where query t may attend to key s.

    Causality and windows compare positions (`q_positions` `[B, T]`, `kv_positions`
    `[B, S]`, default: the indices). `window=w` keeps keys with `0 <= t - s < w` plus the
    first `num_sinks` keys (LM-Infinite / StreamingLLM). Segment id 0 is padding.
    """
    if q_positions is None:
        q_positions = jnp.arange(q_len)[None]
    if kv_positions is None:
        kv_positions = jnp.arange(kv_len)[None]
    spec = MaskSpec(causal=causal, window=window, num_sinks=num_sinks)
    mask = spec.visible(q_positions[:, :, None], kv_positions[:, None, :])
    if segment_ids is not None or kv_segment_ids is not None:
        q_seg = segment_ids if segment_ids is not None else jnp.ones((1, q_len), jnp.int32)
        kv_seg = kv_segment_ids if kv_segment_ids is not None else q_seg
        mask &= segment_visible(q_seg, kv_seg)
    return mask[:, None]


def alibi_bias(slopes, q_positions, kv_positions):
    """ALiBi `[B or 1, H, T, S]` = `-slopes[h] * |q_pos - k_pos|` (Press et al. 2022)."""
    dist = jnp.abs(q_positions[:, :, None] - kv_positions[:, None, :]).astype(jnp.float32)
    return -slopes.astype(jnp.float32)[None, :, None, None] * dist[:, None]


def _masked_scores(q, k, *, causal, segment_ids, kv_segment_ids, window, num_sinks, bias,
                   alibi_slopes, softcap, scale, q_positions, kv_positions):
    """Scores `[B, K, G, T, S]` in fp32 with soft-cap, bias and ALiBi, and the mask
    `[B or 1, 1, 1, T, S]`; masked scores are -inf."""
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qg = q.reshape(B, T, K, H // K, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    if alibi_slopes is not None:
        qp = jnp.arange(T)[None] if q_positions is None else q_positions
        kp = jnp.arange(S)[None] if kv_positions is None else kv_positions
        bias = alibi_bias(alibi_slopes, qp, kp) + (0.0 if bias is None else bias)
    if bias is not None:
        s = s + jnp.broadcast_to(bias, (B, H, T, S)).reshape(B, K, H // K, T, S)
    mask = attention_mask(
        T, S, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        window=window, num_sinks=num_sinks, q_positions=q_positions, kv_positions=kv_positions,
    )[:, :, None]
    return jnp.where(mask, s, -jnp.inf), mask


def _finite(lse):
    return jnp.where(jnp.isfinite(lse), lse, 0.0)


@functools.partial(jax.jit, static_argnames=(
    "causal", "window", "num_sinks", "softcap", "scale", "return_lse"))
def reference_attention(
    q, k, v, *, causal=False, segment_ids=None, kv_segment_ids=None, window=None,
    num_sinks=0, bias=None, alibi_slopes=None, softcap=None, scale=None, q_positions=None,
    kv_positions=None, return_lse=False,
):
    """Materialised-scores attention with an fp32 softmax; the test oracle.

    Returns `[B, T, H, D]` in q's dtype (and the logsumexp `[B, H, T]` in fp32 when
    `return_lse`). A query row with no visible key gives zeros and lse = -inf.
    """
    B, T, H, D = q.shape
    s, mask = _masked_scores(
        q, k, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        window=window, num_sinks=num_sinks, bias=bias, alibi_slopes=alibi_slopes,
        softcap=softcap, scale=scale, q_positions=q_positions, kv_positions=kv_positions)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - _finite(lse)[..., None]), 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = out.reshape(B, T, H, D).astype(q.dtype)
    if return_lse:
        return out, lse.reshape(B, H, T)
    return out


@functools.partial(jax.jit, static_argnames=(
    "causal", "window", "num_sinks", "softcap", "scale", "return_lse", "block_k"))
def split_kv_attention(
    q, k, v, *, causal=False, segment_ids=None, kv_segment_ids=None, window=None,
    num_sinks=0, bias=None, alibi_slopes=None, softcap=None, scale=None, q_positions=None,
    kv_positions=None, return_lse=False, block_k=None,
):
    """The decode path: a few queries q `[B, T, H, D]` against a long cache k, v
    `[B, S, K, D]`, the cache cut into splits of `block_k` keys (default 512) whose
    partial softmaxes are computed independently (in parallel, no loop over the cache)
    and merged by their logsumexp, as in Flash-Decoding (Dao et al. 2023). Scores are
    materialised, O(B H T S) memory: meant for T = 1 .. a few. Same math and outputs as
    `reference_attention`."""
    B, T, H, D = q.shape
    S, K, G = k.shape[1], k.shape[2], H // k.shape[2]
    split = min(S, block_k or 512)
    n = -(-S // split)
    s, _ = _masked_scores(
        q, k, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        window=window, num_sinks=num_sinks, bias=bias, alibi_slopes=alibi_slopes,
        softcap=softcap, scale=scale, q_positions=q_positions, kv_positions=kv_positions)
    s = _pad_axis(s, 4, n * split, -jnp.inf).reshape(B, K, G, T, n, split)
    vs = _pad_axis(v, 1, n * split).reshape(B, n, split, K, D)
    # Per split: max m, sum l and unnormalised output o (m only shifts the exponent, so it
    # carries no gradient); then the merge rescales each split by exp(m - max m).
    m = jax.lax.stop_gradient(_finite(s.max(axis=-1)))  # [B, K, G, T, n]
    p = jnp.exp(s - m[..., None])
    l = p.sum(axis=-1)
    o = jnp.einsum("bkgtns,bnskd->bkgtnd", p.astype(v.dtype), vs,
                   preferred_element_type=jnp.float32)
    w = jnp.exp(m - m.max(axis=-1, keepdims=True))
    total = (w * l).sum(axis=-1)
    seen = total > 0
    out = jnp.einsum("bkgtn,bkgtnd->bkgtd", w, o) / jnp.where(seen, total, 1.0)[..., None]
    out = jnp.moveaxis(out, 3, 1).reshape(B, T, H, D).astype(q.dtype)
    lse = jnp.where(seen, m.max(axis=-1) + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    if return_lse:
        return out, lse.reshape(B, H, T)
    return out


# ----------------------------------------------------------------------------------------
# Blockwise attention in pure JAX ("xla").


def _head_major(x, num_kv_heads):
    """`[B, T, H, D]` -> `[B, K, G, T, D]` (query head h = k G + g shares key head k)."""
    B, T, H, D = x.shape
    return x.reshape(B, T, num_kv_heads, H // num_kv_heads, D).transpose(0, 2, 3, 1, 4)


def _round_up(n, m):
    return -(-n // m) * m


def _default_block(n, preferred=512):
    return min(preferred, _round_up(n, 8))


def _pad_axis(x, axis, size, value=0):
    if x is None or x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


class _Blocks:
    """Padded, grouped operands and per-tile helpers shared by the forward and backward.

    Tensors are kept head-major, q `[B, K, G, Tp, D]`, k / v `[B, K, Sp, D]`, so that every
    tile product is a plain batched matrix product over `(B, K)` whose `[G * bq, bk]`
    score-sized operand is never transposed (the backward forms dK^T and dV^T, whose
    transposes are `[D, bk]`); the bias is held at its broadcast shape `[b, h, t, s]`
    (size-1 dims not expanded) and sliced per tile.
    """

    def __init__(self, q, k, v, *, spec, segment_ids, kv_segment_ids, q_positions,
                 kv_positions, bias, alibi_slopes, softcap, scale, block_q, block_k):
        B, T, H, D = q.shape
        S, K = k.shape[1], k.shape[2]
        self.B, self.T, self.S, self.H, self.K, self.G, self.D = B, T, S, H, K, H // K, D
        self.bq = block_q or _default_block(T)
        self.bk = block_k or _default_block(S)
        self.Tp, self.Sp = _round_up(T, self.bq), _round_up(S, self.bk)
        self.nq, self.nk = self.Tp // self.bq, self.Sp // self.bk
        self.spec, self.softcap = spec, softcap
        self.scale = D**-0.5 if scale is None else scale
        self.q = _head_major(_pad_axis(q, 1, self.Tp), K)
        self.k, self.v = (_pad_axis(x, 1, self.Sp).transpose(0, 2, 1, 3) for x in (k, v))
        if segment_ids is None and kv_segment_ids is not None:
            segment_ids = jnp.ones((1, T), jnp.int32)
        if kv_segment_ids is None:
            kv_segment_ids = segment_ids
        self.q_seg = _pad_axis(segment_ids, 1, self.Tp)
        self.kv_seg = _pad_axis(kv_segment_ids, 1, self.Sp)
        self.q_pos = _pad_axis(q_positions, 1, self.Tp)
        self.kv_pos = _pad_axis(kv_positions, 1, self.Sp)
        self.bias_shape = None if bias is None else bias.shape
        if bias is not None:
            bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
            if bias.shape[2] == T:
                bias = _pad_axis(bias, 2, self.Tp)
            if bias.shape[3] == S:
                bias = _pad_axis(bias, 3, self.Sp)
        self.bias = bias
        self.alibi = None if alibi_slopes is None else alibi_slopes.astype(jnp.float32)
        self.static_map = q_positions is None
        self.needs_mask = not (spec.is_trivial and segment_ids is None
                               and T == self.Tp and S == self.Sp)

    def visits(self, transpose=False):
        """Per block row: the non-empty tiles to visit `[n, m]` (padded) and their count."""
        if self.static_map:
            tiles = self.spec.tile_map(self.T, self.S, self.bq, self.bk) != EMPTY
        else:  # positions are traced: masks are checked per element, nothing is skipped.
            tiles = np.ones((self.nq, self.nk), bool)
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
        qt = jax.lax.dynamic_slice_in_dim(self.q, i * self.bq, self.bq, 3)
        kt = jax.lax.dynamic_slice_in_dim(self.k, j * self.bk, self.bk, 2)
        s = jnp.einsum("bkgqd,bksd->bkgqs", qt, kt, preferred_element_type=jnp.float32)
        s = s * self.scale
        tanh = None
        if self.softcap is not None:
            tanh = jnp.tanh(s / self.softcap)
            s = self.softcap * tanh
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


def _xla_forward(blk):
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
            vt = jax.lax.dynamic_slice_in_dim(blk.v, j * blk.bk, blk.bk, 2)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vt.dtype), vt,
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


def _xla_backward(blk, out, lse, dout, dlse=None):
    """FlashAttention-2 backward: dq, dk, dv and (when present) dbias, dslopes."""
    B, K, G, bq, bk, D = blk.B, blk.K, blk.G, blk.bq, blk.bk, blk.D
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse
    # Padded query rows are masked out, so their lse / delta values are never used.
    lse = _pad_axis(jnp.where(jnp.isfinite(lse), lse, 0.0), 2, blk.Tp).reshape(B, K, G, blk.Tp)
    delta = _pad_axis(delta, 2, blk.Tp).reshape(B, K, G, blk.Tp)
    do = _head_major(_pad_axis(dout, 1, blk.Tp), K)
    idx, counts = blk.visits(transpose=True)
    has_bias, has_alibi = blk.bias is not None, blk.alibi is not None

    def kv_block(carry, args):
        j, row, count = args
        kt = jax.lax.dynamic_slice_in_dim(blk.k, j * bk, bk, 2)
        vt = jax.lax.dynamic_slice_in_dim(blk.v, j * bk, bk, 2)

        def body(n, inner):
            return blk.skip_empty(functools.partial(step, row[n]), row[n], j, inner)

        def step(i, inner):
            dk_t, dv_t, dq, dbias, dslopes = inner
            s, mask, tanh, dist = blk.scores(i, j)
            lse_t = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, 3)
            delta_t = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, 3)
            do_t = jax.lax.dynamic_slice_in_dim(do, i * bq, bq, 3)
            q_t = jax.lax.dynamic_slice_in_dim(blk.q, i * bq, bq, 3)
            p = jnp.exp(s - lse_t[..., None])
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dv_t = dv_t + jnp.einsum("bkgqd,bkgqs->bkds", do_t, p.astype(do.dtype),
                                     preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do_t, vt, preferred_element_type=jnp.float32)
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
            dk_t = dk_t + jnp.einsum("bkgqd,bkgqs->bkds", q_t, ds,
                                     preferred_element_type=jnp.float32)
            dq_t = jnp.einsum("bkgqs,bksd->bkgqd", ds, kt, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, 3) + dq_t, i * bq, 3)
            return dk_t, dv_t, dq, dbias, dslopes

        dq, dbias, dslopes = carry
        zeros = jnp.zeros((B, K, D, bk), jnp.float32)
        dk, dv, dq, dbias, dslopes = jax.lax.fori_loop(
            0, count, body, (zeros, zeros, dq, dbias, dslopes))
        return (dq, dbias, dslopes), (dk, dv)

    init = (jnp.zeros(blk.q.shape, jnp.float32),
            jnp.zeros(blk.bias.shape, jnp.float32) if has_bias else None,
            jnp.zeros((K, G), jnp.float32) if has_alibi else None)
    (dq, dbias, dslopes), (dk, dv) = jax.lax.scan(kv_block, init, (jnp.arange(blk.nk), idx, counts))
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(B, blk.Tp, blk.H, D)[:, : blk.T].astype(blk.q.dtype)
    # dk, dv: [nk, B, K, D, bk] (transposed tiles) -> [B, S, K, D]
    dk, dv = (g.transpose(1, 0, 4, 2, 3).reshape(B, blk.Sp, K, D)[:, : blk.S].astype(x.dtype)
              for g, x in ((dk, blk.k), (dv, blk.v)))
    if has_bias:
        full = (1,) * (4 - len(blk.bias_shape)) + blk.bias_shape
        dbias = dbias[:, :, : full[2], : full[3]].reshape(blk.bias_shape)
    if has_alibi:
        dslopes = dslopes.reshape(blk.H)
    return dq, dk, dv, dbias, dslopes


# ----------------------------------------------------------------------------------------
# Public entry points.


@functools.partial(jax.jit, static_argnames=_STATIC)
def attention_forward(
    q, k, v, *, causal=False, segment_ids=None, kv_segment_ids=None, window=None,
    num_sinks=0, bias=None, alibi_slopes=None, softcap=None, scale=None, q_positions=None,
    kv_positions=None, impl="xla", block_q=None, block_k=None,
):
    """Attention forward without autodiff: `(out [B, T, H, D], lse [B, H, T] fp32)`.

    For blockwise callers such as ring attention, which merge blocks with `lse` and call
    `attention_backward` themselves. `impl` is `"xla"`, `"reference"`, `"pallas"` or
    `"pallas_interpret"`.
    """
    _check_args(q, k, v, window, num_sinks, segment_ids, kv_segment_ids, q_positions,
                kv_positions, bias, alibi_slopes)
    _check_impl(impl, ("xla", "reference", "pallas", "pallas_interpret"), q, k, v)
    kw = dict(causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
              window=window, num_sinks=num_sinks, bias=bias, alibi_slopes=alibi_slopes,
              softcap=softcap, scale=scale, q_positions=q_positions, kv_positions=kv_positions)
    if impl == "reference":
        return reference_attention(q, k, v, return_lse=True, **kw)
    if impl.startswith("pallas"):
        return _pallas_module().forward(q, k, v, interpret=impl == "pallas_interpret",
                                        block_q=block_q, block_k=block_k, **kw)
    return _xla_forward(_make_blocks(q, k, v, kw, block_q, block_k))


@functools.partial(jax.jit, static_argnames=_STATIC)
def attention_backward(
    q, k, v, out, lse, dout, *, causal=False, segment_ids=None, kv_segment_ids=None,
    window=None, num_sinks=0, bias=None, alibi_slopes=None, softcap=None, scale=None,
    q_positions=None, kv_positions=None, impl="xla", block_q=None, block_k=None, dlse=None,
):
    """FlashAttention-2 backward from `out`, `lse` and `dout`: `(dq, dk, dv)`.

    `dlse` `[B, H, T]` is the cotangent of `lse` when the caller differentiates through it.
    Gradients for `bias` / `alibi_slopes` come from `dot_product_attention`'s VJP.
    """
    _check_args(q, k, v, window, num_sinks, segment_ids, kv_segment_ids, q_positions,
                kv_positions, bias, alibi_slopes)
    _check_impl(impl, ("xla", "pallas", "pallas_interpret"), q, k, v)
    kw = dict(causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
              window=window, num_sinks=num_sinks, bias=bias, alibi_slopes=alibi_slopes,
              softcap=softcap, scale=scale, q_positions=q_positions, kv_positions=kv_positions)
    if impl.startswith("pallas"):
        return _pallas_module().backward(q, k, v, out, lse, dout, dlse=dlse,
                                         interpret=impl == "pallas_interpret",
                                         block_q=block_q, block_k=block_k, **kw)[:3]
    return _xla_backward(_make_blocks(q, k, v, kw, block_q, block_k), out, lse, dout, dlse)[:3]


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets, from each part's normalised output
    `[B, T, H, D]` and logsumexp `[B, H, T]`: `(output in fp32, logsumexp)`. A row that
    sees no key in either part gives 0 (ring attention merges its steps with this)."""
    lse = jnp.logaddexp(lse_a, lse_b)
    ref = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def weighted(out, part_lse):
        return out.astype(jnp.float32) * jnp.moveaxis(jnp.exp(part_lse - ref), 1, 2)[..., None]

    return weighted(out_a, lse_a) + weighted(out_b, lse_b), lse


def _make_blocks(q, k, v, kw, block_q, block_k):
    kw = dict(kw)
    spec = MaskSpec(causal=kw.pop("causal"), window=kw.pop("window"),
                    num_sinks=kw.pop("num_sinks"))
    return _Blocks(q, k, v, spec=spec, block_q=block_q, block_k=block_k, **kw)


def _pallas_module():
    from pallas_kernels import flash_attention

    return flash_attention


def _check_impl(impl, allowed, q, k, v):
    if impl not in allowed:
        raise ValueError(f"impl must be one of {allowed}; got {impl!r}")
    _check_dtype(impl, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _differentiable(q, k, v, bias, alibi_slopes, ints, options, impl):
    return attention_forward(q, k, v, bias=bias, alibi_slopes=alibi_slopes, impl=impl,
                             **ints, **dict(options))


def _differentiable_fwd(q, k, v, bias, alibi_slopes, ints, options, impl):
    out, lse = _differentiable(q, k, v, bias, alibi_slopes, ints, options, impl)
    return (out, lse), (q, k, v, bias, alibi_slopes, ints, out, lse)


def _differentiable_bwd(options, impl, res, cotangents):
    q, k, v, bias, alibi_slopes, ints, out, lse = res
    dout, dlse = cotangents
    options = dict(options)
    block_q, block_k = options.pop("block_q"), options.pop("block_k")
    kw = dict(bias=bias, alibi_slopes=alibi_slopes, **ints, **options)
    if impl == "xla":
        blk = _make_blocks(q, k, v, kw, block_q, block_k)
        dq, dk, dv, dbias, dslopes = _xla_backward(blk, out, lse, dout, dlse)
    else:  # the Pallas kernels take no dense bias (their forward refuses one)
        dq, dk, dv, dslopes = _pallas_module().backward(
            q, k, v, out, lse, dout, dlse=dlse, interpret=impl == "pallas_interpret",
            block_q=block_q, block_k=block_k, **kw)
        dbias = None
    dbias = None if bias is None else dbias.astype(bias.dtype)
    dslopes = None if alibi_slopes is None else dslopes.astype(alibi_slopes.dtype)
    return dq, dk, dv, dbias, dslopes, None


_differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)


def _cudnn_supported(q, window, softcap, num_sinks, segment_ids, kv_segment_ids, q_positions,
                     alibi_slopes, return_lse):
    """True for a call cuDNN's fused attention serves (on an NVIDIA GPU)."""
    return (
        (window is None or window > 0) and q.dtype in (jnp.bfloat16, jnp.float16)
        and softcap is None and num_sinks == 0 and alibi_slopes is None
        and segment_ids is None and kv_segment_ids is None and q_positions is None
        and not return_lse
    )


@functools.partial(jax.jit, static_argnames=_STATIC + ("return_lse",))
def dot_product_attention(
    q, k, v, *, causal=False, segment_ids=None, kv_segment_ids=None, window=None,
    num_sinks=0, bias=None, alibi_slopes=None, softcap=None, scale=None, q_positions=None,
    kv_positions=None, return_lse=False, impl="auto", block_q=None, block_k=None,
):
    """Scaled dot-product attention with masks, GQA, soft-cap, bias and ALiBi.

    q `[B, T, H, D]`, k / v `[B, S, K, D]` -> `[B, T, H, D]` (and lse `[B, H, T]` fp32
    with `return_lse`). `impl`: `"reference"` (materialised scores), `"xla"` (blockwise,
    O(T) memory, custom VJP), `"pallas"` / `"pallas_interpret"` (flash-attention kernels),
    `"cudnn"` (GPU, bf16/fp16, no soft-cap / sinks / segments / ALiBi / positions / lse) or
    `"auto"`, resolved per lowering platform by `longjax.ops.impl.choose`. All give the
    same math.
    """
    _check_args(q, k, v, window, num_sinks, segment_ids, kv_segment_ids, q_positions,
                kv_positions, bias, alibi_slopes)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    cudnn_ok = _cudnn_supported(q, window, softcap, num_sinks, segment_ids, kv_segment_ids,
                                q_positions, alibi_slopes, return_lse)
    args = dict(causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                window=window, num_sinks=num_sinks, bias=bias, alibi_slopes=alibi_slopes,
                softcap=softcap, scale=scale, q_positions=q_positions,
                kv_positions=kv_positions, return_lse=return_lse, block_q=block_q,
                block_k=block_k)
    if impl != "auto":
        _check_dtype(impl, q, k, v)
    if impl == "cudnn" and not (cudnn_ok and impl_lib.cudnn_available()):
        raise ValueError(
            "impl='cudnn' needs cuDNN (a CUDA jaxlib), bf16/fp16 inputs and no softcap, "
            "num_sinks, segment_ids, positions, alibi_slopes or return_lse")
    return impl_lib.run("attention", impl, lambda name: _attention(q, k, v, name, **args),
                        query_length=q.shape[1], cudnn_supported=cudnn_ok)


def _attention(q, k, v, impl, *, causal, segment_ids, kv_segment_ids, window, num_sinks,
               bias, alibi_slopes, softcap, scale, q_positions, kv_positions, return_lse,
               block_q, block_k):
    """`dot_product_attention` through one named implementation."""
    if impl == "cudnn":
        local = None if window is None else (window - 1, 0 if causal else window - 1)
        if bias is not None:
            bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, scale=scale, is_causal=causal, local_window_size=local,
            implementation="cudnn")
    ints = dict(segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                q_positions=q_positions, kv_positions=kv_positions)
    common = dict(bias=bias, alibi_slopes=alibi_slopes, causal=causal, window=window,
                  num_sinks=num_sinks, softcap=softcap, scale=scale, return_lse=return_lse,
                  **ints)
    if impl == "reference":
        return reference_attention(q, k, v, **common)
    if impl == "split_kv":
        return split_kv_attention(q, k, v, block_k=block_k, **common)
    options = tuple(dict(causal=causal, window=window, num_sinks=num_sinks, softcap=softcap,
                         scale=scale, block_q=block_q, block_k=block_k).items())
    out, lse = _differentiable(q, k, v, bias, alibi_slopes, ints, options, impl)
    return (out, lse) if return_lse else out
