"""Sequence-parallel attention on global arrays, and all-gather context parallelism.

`sequence_parallel_attention` is the user-level entry point: it takes global `[B, T, ...]`
arrays, lays the tokens out (`longjax.parallel.layouts`), runs one strategy inside
`jax.shard_map` over the mesh axis `axis_name`, and restores the natural token order:

- `"ring"`: `ring_attention`, K/V rotate around the ring; memory O(T/P) per device.
- `"all_gather"`: every device gathers all K/V and attends with its query shard
  (context parallelism as in Llama 3, Dubey et al. 2024); memory O(T) for K/V.
- `"ulysses"`: `ulysses_attention`, all-to-all between sequence and head shards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from longjax.ops.attention import dot_product_attention
from longjax.parallel.layouts import (
    bound_axis_size,
    check_layout,
    from_layout,
    layout_order,
    shard_positions,
    to_layout,
)
from longjax.parallel.ring_attention import ring_attention
from longjax.parallel.ulysses import ulysses_attention

STRATEGIES = ("ring", "all_gather", "ulysses")


def all_gather_attention(
    q, k, v, *, axis_name, causal=False, segment_ids=None, layout="zigzag", window=None,
    num_sinks=0, softcap=None, scale=None, impl="auto",
):
    """Local queries attend to K/V all-gathered over `axis_name`; call in `shard_map`.

    Shapes and layout as in `ring_attention`; returns `[B, T, H, D]`.
    """
    num_shards = bound_axis_size(axis_name)
    B, T = q.shape[:2]
    check_layout(layout, T * num_shards, num_shards)
    gather = lambda x: jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
    q_pos = shard_positions(T, layout, num_shards, jax.lax.axis_index(axis_name))
    kv_pos = layout_order(T * num_shards, layout, num_shards)
    return dot_product_attention(
        q, gather(k), gather(v), causal=causal, segment_ids=segment_ids,
        kv_segment_ids=None if segment_ids is None else gather(segment_ids),
        window=window, num_sinks=num_sinks, softcap=softcap, scale=scale,
        q_positions=jnp.broadcast_to(q_pos, (B, T)),
        kv_positions=jnp.broadcast_to(kv_pos, (B, T * num_shards)), impl=impl,
    )


_STRATEGY_FNS = {"ring": ring_attention, "all_gather": all_gather_attention,
                 "ulysses": ulysses_attention}


def sequence_parallel_attention(
    q, k, v, *, mesh=None, axis_name="sequence", strategy="ring", layout="zigzag",
    causal=False, segment_ids=None, batch_axes=("data", "fsdp"), head_axis="tensor",
    **options,
):
    """Attention of global q `[B, T, H, D]`, k, v `[B, T, K, D]` with T split over `axis_name`.

    `mesh` defaults to the current one (`jax.set_mesh`). The batch is split over the
    `batch_axes` of the mesh and heads over `head_axis` when the head counts divide.
    `options` go to the strategy (`window`, `num_sinks`, `softcap`, `scale`, `impl`, and
    `block_size` for the ring). Returns `[B, T, H, D]` in natural token order.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if jax.sharding.AxisType.Explicit in mesh.axis_types:  # jax.make_mesh's default
        mesh = mesh.update(axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh; mesh axes: "
                         f"{tuple(mesh.axis_names)}")
    num_shards = mesh.shape[axis_name]
    check_layout(layout, q.shape[1], num_shards)
    batch = tuple(a for a in batch_axes if a in mesh.axis_names and a != axis_name)
    if q.shape[0] % int(np.prod([mesh.shape[a] for a in batch])):
        raise ValueError(f"batch size {q.shape[0]} must be divisible by the mesh axes "
                         f"{batch} (sizes {[mesh.shape[a] for a in batch]})")
    heads = head_axis if head_axis in mesh.axis_names and not (
        q.shape[2] % mesh.shape[head_axis] or k.shape[2] % mesh.shape[head_axis]) else None
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    seq_spec = PartitionSpec(batch, axis_name)
    qkv_spec = PartitionSpec(batch, axis_name, heads)
    attend = _STRATEGY_FNS[strategy]

    def local(q, k, v, segment_ids):
        return attend(q, k, v, axis_name=axis_name, causal=causal, segment_ids=segment_ids,
                      layout=layout, **options)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seq_spec),
                            out_specs=qkv_spec, check_vma=False)
    laid_out = (to_layout(x, layout, num_shards) for x in (q, k, v, segment_ids))
    return from_layout(sharded(*laid_out), layout, num_shards)
