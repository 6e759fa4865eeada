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
    B, T = q.shape[:2]
    check_layout(layout, T * num_shards, num_shards)
    q, k, v = to_head_shards(q, k, v, axis_name)
    positions = jnp.broadcast_to(layout_order(T * num_shards, layout, num_shards),
                                 (B, T * num_shards))
    if segment_ids is not None:
        segment_ids = jax.lax.all_gather(segment_ids, axis_name, axis=1, tiled=True)
    out = dot_product_attention(
        q, k, v, causal=causal, segment_ids=segment_ids, window=window, num_sinks=num_sinks,
        softcap=softcap, scale=scale, q_positions=positions, kv_positions=positions,
        impl=impl,
    )
    return to_sequence_shards(out, axis_name)


def to_head_shards(q, k, v, axis_name, group_size=None):
    """All-to-all inside groups of `group_size` = U consecutive devices of `axis_name`
    (default: the whole axis): q `[B, T, H, D]`, k, v `[B, T, K, D]` of the local `T`
    tokens become the group's `U T` tokens of `H / U` (and `K / U`) heads. K/V heads are
    repeated up to `H` when `K % U`; `ValueError` unless `H % U == 0`."""
    group_size = bound_axis_size(axis_name) if group_size is None else group_size
    H, K = q.shape[2], k.shape[2]
    if H % group_size:
        raise ValueError(f"ulysses: the number of heads ({H} on this device) must be divisible "
                         f"by the {group_size} devices of each all-to-all group of axis "
                         f"{axis_name!r}")
    if K % group_size:
        k, v = (jnp.repeat(x, H // K, axis=2) for x in (k, v))
    return (group_all_to_all(x, axis_name, group_size, 2, 1) for x in (q, k, v))


def to_sequence_shards(out, axis_name, group_size=None):
    """Inverse of `to_head_shards` for the output `[B, U T, H / U, D]`."""
    group_size = bound_axis_size(axis_name) if group_size is None else group_size
    return group_all_to_all(out, axis_name, group_size, 1, 2)


def group_all_to_all(x, axis_name, group_size, split_axis, concat_axis):
    """`jax.lax.all_to_all(..., tiled=True)` inside each group of `group_size` = U
    consecutive devices of `axis_name`: `x` is cut into U chunks along `split_axis`, chunk
    u goes to the group's device u, and the received chunks are concatenated along
    `concat_axis` in the senders' order. The whole axis is one `all_to_all`; smaller
    groups exchange by U - 1 `ppermute`s, one per offset, the same bytes per device."""
    num_devices = bound_axis_size(axis_name)
    if group_size == num_devices:
        return jax.lax.all_to_all(x, axis_name, split_axis, concat_axis, tiled=True)
    U = group_size
    chunks = jnp.stack(jnp.split(x, U, split_axis))  # [U, ...]: chunk u is for device u
    me = jax.lax.axis_index(axis_name) % U
    received = []  # received[s]: from the device s places before me, its chunk `me`
    for s in range(U):
        sent = jnp.take(chunks, (me + s) % U, axis=0)
        perm = [(p, p - p % U + (p % U + s) % U) for p in range(num_devices)]
        received.append(jax.lax.ppermute(sent, axis_name, perm) if s else sent)
    by_sender = jnp.take(jnp.stack(received), (me - jnp.arange(U)) % U, axis=0)
    return jnp.concatenate(list(by_sender), concat_axis)


def group_all_gather(x, axis_name, group_size, axis):
    """`jax.lax.all_gather(..., tiled=True)` along `axis` inside each group of `group_size`
    consecutive devices of `axis_name` (a `group_all_to_all` of that many copies)."""
    copies = jnp.broadcast_to(jnp.expand_dims(x, axis), (*x.shape[:axis], group_size,
                                                         *x.shape[axis:]))
    return jnp.squeeze(group_all_to_all(copies, axis_name, group_size, axis, axis + 1), axis)
