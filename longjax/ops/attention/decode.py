"""The decode path: a few queries against a long KV cache, split in parallel (Flash-Decoding).

Layout: q `[B, T, H, D]` with T = 1 .. a few, cache k / v `[B, S, K, D]`, `G = H / K`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longjax.ops.attention.blockwise import pad_axis
from longjax.ops.attention.reference import finite, masked_scores


@functools.partial(jax.jit, static_argnames=("spec", "block_k"))
def split_kv_attention(spec, q, k, v, side, *, block_k=None):
    """`(out [B, T, H, D], lse [B, H, T] fp32)` of a validated call (`make_spec`): the
    cache cut into splits of `block_k` keys (default 512) whose partial softmaxes are
    computed independently (no loop over the cache) and merged by their logsumexp (Dao
    et al. 2023, Flash-Decoding). Scores are materialised, O(B H T S) memory; the math
    and outputs are those of `reference_attention`."""
    B, T, H, D = q.shape
    S, K, G = k.shape[1], k.shape[2], H // k.shape[2]
    split = min(S, block_k or 512)
    n = -(-S // split)
    s, _ = masked_scores(spec, q, k, side)
    s = pad_axis(s, 4, n * split, -jnp.inf).reshape(B, K, G, T, n, split)
    vs = pad_axis(v, 1, n * split).reshape(B, n, split, K, D)
    # Per split: max m, sum l and unnormalised output o (m only shifts the exponent, so it
    # carries no gradient); then the merge rescales each split by exp(m - max m).
    m = jax.lax.stop_gradient(finite(s.max(axis=-1)))  # [B, K, G, T, n]
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
    return out, lse.reshape(B, H, T)
