"""Softmax attention: the reference implementation and the `impl=` dispatcher.

Layout: q `[B, T, H, D]`, k / v `[B, S, K, D]` with `H % K == 0` (GQA / MQA when K < H).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "reference")


def _check_args(q, k, v, window, num_sinks):
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
    if window is not None and window < 0:
        raise ValueError(f"window must be >= 0 or None; got {window}")
    if num_sinks < 0:
        raise ValueError(f"num_sinks must be >= 0; got {num_sinks}")


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
    qp = q_positions[:, :, None]
    kp = kv_positions[:, None, :]
    mask = jnp.ones((1, q_len, kv_len), bool)
    if causal:
        mask &= kp <= qp
    if window is not None:
        local = qp - kp < window
        if not causal:
            local &= kp - qp < window
        if num_sinks:
            local |= kp < num_sinks
        mask &= local
    if segment_ids is not None or kv_segment_ids is not None:
        q_seg = segment_ids if segment_ids is not None else jnp.ones((1, q_len), jnp.int32)
        kv_seg = kv_segment_ids if kv_segment_ids is not None else q_seg
        mask &= (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    return mask[:, None]


def reference_attention(
    q, k, v, *, causal=False, segment_ids=None, kv_segment_ids=None, window=None,
    num_sinks=0, bias=None, softcap=None, scale=None, q_positions=None, kv_positions=None,
    return_lse=False,
):
    """Materialised-scores attention with an fp32 softmax; the test oracle.

    Returns `[B, T, H, D]` in q's dtype (and the logsumexp `[B, H, T]` in fp32 when
    `return_lse`). A query row with no visible key gives zeros and lse = -inf.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qg = q.reshape(B, T, K, H // K, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    if bias is not None:
        s = s + jnp.broadcast_to(bias, (B, H, T, S)).reshape(B, K, H // K, T, S)
    mask = attention_mask(
        T, S, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        window=window, num_sinks=num_sinks, q_positions=q_positions, kv_positions=kv_positions,
    )[:, :, None]
    s = jnp.where(mask, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = out.reshape(B, T, H, D).astype(q.dtype)
    if return_lse:
        return out, lse.reshape(B, H, T)
    return out


def dot_product_attention(
    q, k, v, *, causal=False, segment_ids=None, kv_segment_ids=None, window=None,
    num_sinks=0, bias=None, softcap=None, scale=None, q_positions=None, kv_positions=None,
    return_lse=False, impl="auto",
):
    """Scaled dot-product attention with masks, GQA, soft-cap and bias; see the module doc.

    `impl` picks the implementation (`"reference"`, ...; `"auto"` the fastest that
    supports the arguments); all give the same math.
    """
    _check_args(q, k, v, window, num_sinks)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    return reference_attention(
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        window=window, num_sinks=num_sinks, bias=bias, softcap=softcap, scale=scale,
        q_positions=q_positions, kv_positions=kv_positions, return_lse=return_lse,
    )
