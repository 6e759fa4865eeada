"""Materialised-scores attention: the mask, the scores and the test oracle.

Layout: q `[B, T, H, D]`, k / v `[B, S, K, D]`, `G = H / K` query heads per key/value head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longjax.ops.attention.spec import (
    AttentionSpec,
    SideInputs,
    make_spec,
    query_segments,
    segment_visible,
)


def attention_mask(
    q_len, kv_len, *, causal=False, segment_ids=None, kv_segment_ids=None, window=None,
    num_sinks=0, q_positions=None, kv_positions=None,
):
    """Boolean mask `[B or 1, 1, T, S]`: True where query t may attend to key s.

    Causality and windows compare positions (`q_positions` `[B, T]`, `kv_positions`
    `[B, S]`, default: the indices). `window=w` keeps keys with `0 <= t - s < w` plus the
    first `num_sinks` keys (LM-Infinite / StreamingLLM). Segment id 0 is padding.
    """
    spec = AttentionSpec(causal=causal, window=window, num_sinks=num_sinks)
    side = SideInputs(query_segments(q_len, segment_ids, kv_segment_ids), kv_segment_ids,
                      q_positions, kv_positions)
    return _mask(spec, q_len, kv_len, side)


def _mask(spec, T, S, side):
    q_pos = jnp.arange(T)[None] if side.q_positions is None else side.q_positions
    kv_pos = jnp.arange(S)[None] if side.kv_positions is None else side.kv_positions
    mask = spec.visible(q_pos[:, :, None], kv_pos[:, None, :])
    if side.segment_ids is not None:
        mask &= segment_visible(side.segment_ids, side.kv_segments)
    return mask[:, None]


def alibi_bias(slopes, q_positions, kv_positions):
    """ALiBi `[B or 1, H, T, S]` = `-slopes[h] * |q_pos - k_pos|` (Press et al. 2022)."""
    dist = jnp.abs(q_positions[:, :, None] - kv_positions[:, None, :]).astype(jnp.float32)
    return -slopes.astype(jnp.float32)[None, :, None, None] * dist[:, None]


def masked_scores(spec, q, k, side):
    """Scores `[B, K, G, T, S]` in fp32 with soft-cap, bias and ALiBi, and the mask
    `[B or 1, 1, 1, T, S]`; masked scores are -inf."""
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    qg = q.reshape(B, T, K, H // K, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    s = s * spec.softmax_scale(D)
    if spec.softcap is not None:
        s = spec.softcap * jnp.tanh(s / spec.softcap)
    bias = side.bias
    if spec.has_alibi:
        qp = jnp.arange(T)[None] if side.q_positions is None else side.q_positions
        kp = jnp.arange(S)[None] if side.kv_positions is None else side.kv_positions
        bias = alibi_bias(side.alibi_slopes, qp, kp) + (0.0 if bias is None else bias)
    if bias is not None:
        s = s + jnp.broadcast_to(bias, (B, H, T, S)).reshape(B, K, H // K, T, S)
    mask = _mask(spec, T, S, side)[:, :, None]
    return jnp.where(mask, s, -jnp.inf), mask


def finite(lse):
    """`lse` with -inf (rows that see no key) replaced by 0."""
    return jnp.where(jnp.isfinite(lse), lse, 0.0)


def probabilities(spec, q, k, side):
    """`(p [B, K, G, T, S] fp32, lse [B, K, G, T])`: the softmax of the masked scores (0
    where masked; a row that sees no key is 0 with lse = -inf)."""
    s, mask = masked_scores(spec, q, k, side)
    lse = jax.nn.logsumexp(s, axis=-1)
    return jnp.where(mask, jnp.exp(s - finite(lse)[..., None]), 0.0), lse


def attention(spec, q, k, v, side):
    """`(out [B, T, H, D] in q's dtype, lse [B, H, T] fp32)` from materialised scores."""
    B, T, H, D = q.shape
    p, lse = probabilities(spec, q, k, side)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, D).astype(q.dtype), lse.reshape(B, H, T)


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
    spec, side = make_spec(
        q, k, v, causal=causal, window=window, num_sinks=num_sinks, softcap=softcap,
        scale=scale, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        q_positions=q_positions, kv_positions=kv_positions, alibi_slopes=alibi_slopes,
        bias=bias)
    out, lse = attention(spec, q, k, v, side)
    return (out, lse) if return_lse else out
