"""Ulysses sequence parallelism: all-to-all from sequence shards to head shards and back.

Jacobs et al. 2023, "DeepSpeed Ulysses": each of the P devices holds `T/P` tokens of all
heads; one all-to-all gives it all `T` tokens of `H/P` heads, attention runs locally on
full sequences, and a second all-to-all returns the output to sequence shards. The
communication per device is O(T H D / P), but P may not exceed the head count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longjax.ops.attention import dot_product_attention
from longjax.parallel.layouts import bound_axis_size, check_layout, layout_order


def ulysses_attention(
    q, k, v, *, axis_name, causal=False, segment_ids=None, layout="zigzag", window=None,
    num_sinks=0, softcap=None, scale=None, impl="auto",
):
    """Attention of the local sequence shard, computed head-parallel; call in `shard_map`.

    q `[B, T, H, D]`, k, v `[B, T, K, D]` and `segment_ids` `[B, T]` are this device's `T`
    tokens in `layout`'s order over the `axis_name` shards. `H` must divide by the axis
    size P; when `K` does not, K/V heads are repeated up to `H`. Returns `[B, T, H, D]`.
    """
    num_shards = bound_axis_size(axis_name)
    B, T, H, _ = q.shape
    K = k.shape[2]
    check_layout(layout, T * num_shards, num_shards)
    if H % num_shards:
        raise ValueError(f"ulysses: the number of heads ({H} on this device) must be divisible "
                         f"by the size {num_shards} of axis {axis_name!r}")
    if K % num_shards:
        k, v = (jnp.repeat(x, H // K, axis=2) for x in (k, v))
    to_heads = lambda x: jax.lax.all_to_all(x, axis_name, 2, 1, tiled=True)
    positions = jnp.broadcast_to(layout_order(T * num_shards, layout, num_shards),
                                 (B, T * num_shards))
    if segment_ids is not None:
        segment_ids = jax.lax.all_gather(segment_ids, axis_name, axis=1, tiled=True)
    out = dot_product_attention(
        to_heads(q), to_heads(k), to_heads(v), causal=causal, segment_ids=segment_ids,
        window=window, num_sinks=num_sinks, softcap=softcap, scale=scale,
        q_positions=positions, kv_positions=positions, impl=impl,
    )
    return jax.lax.all_to_all(out, axis_name, 1, 2, tiled=True)
