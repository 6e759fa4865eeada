"""Keys masked per key/value head: `kv_segment_ids` / `kv_positions` `[B, S, K]`.

A KV cache that keeps different tokens per KV head in the same slots (SnapKV, H2O) gives
each head its own key positions and validity. The K heads are folded into the batch: KV
head k of row b becomes row `b * K + k` with its G query heads (GQA: a KV head's mask
applies to the query heads that share it), so every implementation runs it unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp


def is_per_head(kv_segment_ids, kv_positions) -> bool:
    """True when a key array is given per KV head (`[B, S, K]`)."""
    return any(x is not None and x.ndim == 3 for x in (kv_segment_ids, kv_positions))


def fold(q, k, v, *, segment_ids, kv_segment_ids, q_positions, kv_positions, bias,
         alibi_slopes):
    """The call with the KV heads in the batch: q `[B K, T, G, D]`, k / v `[B K, S, 1, D]`,
    per-query arrays `[B K, T]`, per-key arrays `[B K, S]`, bias `[B K, G, T, S]`; a dict
    of the keyword arguments. ValueError for a per-head array of the wrong shape and for
    `alibi_slopes` (give ALiBi as a dense `bias`)."""
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    for name, x in (("kv_segment_ids", kv_segment_ids), ("kv_positions", kv_positions)):
        if x is not None and x.ndim == 3 and (x.shape[1:] != (S, K) or x.shape[0] not in (1, B)):
            raise ValueError(f"{name} per key/value head must be [batch or 1, {S}, {K}]; got "
                             f"shape {x.shape}")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes cannot be combined with per-head kv_segment_ids / "
                         "kv_positions; pass ALiBi as a dense bias")

    def per_key(x):
        if x is None:
            return None
        x = x if x.ndim == 3 else x[:, :, None]
        return jnp.broadcast_to(x, (B, S, K)).transpose(0, 2, 1).reshape(B * K, S)

    def per_query(x):
        return None if x is None else jnp.repeat(jnp.broadcast_to(x, (B, T)), K, axis=0)

    def kv(x):
        return x.transpose(0, 2, 1, 3).reshape(B * K, S, 1, D)

    if bias is not None:
        bias = jnp.broadcast_to(bias, (B, H, T, S)).reshape(B * K, G, T, S)
    return dict(q=q.reshape(B, T, K, G, D).transpose(0, 2, 1, 3, 4).reshape(B * K, T, G, D),
                k=kv(k), v=kv(v), segment_ids=per_query(segment_ids),
                kv_segment_ids=per_key(kv_segment_ids), q_positions=per_query(q_positions),
                kv_positions=per_key(kv_positions), bias=bias)


def unfold_out(out, batch_size):
    """`[B K, T, G, D]` -> `[B, T, H, D]`."""
    BK, T, G, D = out.shape
    K = BK // batch_size
    return out.reshape(batch_size, K, T, G, D).transpose(0, 2, 1, 3, 4).reshape(
        batch_size, T, K * G, D)


def unfold_heads(x, batch_size):
    """`[B K, G, ...]` -> `[B, H, ...]` (lse, probabilities)."""
    return x.reshape(batch_size, -1, *x.shape[2:])
