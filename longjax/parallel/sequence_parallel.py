"""Sequence-parallel attention on global arrays, and all-gather context parallelism.

`sequence_parallel_attention` is the user-level entry point: it takes global `[B, T, ...]`
arrays, lays the tokens out (`longjax.parallel.layouts`), runs one strategy inside
`jax.shard_map` over the mesh axis `axis_name`, and restores the natural token order:

- `"ring"`: `ring_attention`, K/V rotate around the ring; memory O(T/P) per device.
- `"all_gather"`: every device gathers all K/V and attends with its query shard
  (context parallelism as in Llama 3, Dubey et al. 2024); memory O(T) for K/V.
- `"ulysses"`: `ulysses_attention`, all-to-all between sequence and head shards.
- `"usp"`: `usp_attention`, Ulysses inside groups of devices and a ring across them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longjax.ops.attention import dot_product_attention
from longjax.parallel import mesh as mesh_lib
from longjax.parallel.layouts import (
    bound_axis_size,
    check_layout,
    layout_order,
    shard_from_layout,
    shard_positions,
    shard_to_layout,
)
from longjax.parallel.ring_attention import ring_attention
from longjax.parallel.ulysses import ulysses_attention
from longjax.parallel.usp import usp_attention

STRATEGIES = ("ring", "all_gather", "ulysses", "usp")


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
                 "ulysses": ulysses_attention, "usp": usp_attention}


def sequence_parallel_attention(
    q, k, v, *, mesh=None, axis_name="sequence", strategy="ring", layout="zigzag",
    causal=False, segment_ids=None, batch_axes=mesh_lib.BATCH_AXES, head_axis="tensor",
    ulysses_degree=None, **options,
):
    """Attention of global q `[B, T, H, D]`, k, v `[B, T, K, D]` with T split over `axis_name`.

    `mesh` defaults to the current one (`jax.set_mesh`); its axes may be explicit
    (`jax.make_mesh`'s default) or auto, and the inputs may already be sharded over it.
    The batch is split over the `batch_axes` of the mesh and heads over `head_axis` when
    the head counts divide. Each device's contiguous piece of the sequence is moved into
    `layout`'s order with collectives inside the `shard_map` (O(T/P) per device) and back.
    `strategy="usp"` splits the P devices of `axis_name` into Ulysses groups of
    `ulysses_degree` devices joined by a ring (`usp_attention`). `options` go to the
    strategy (`window`, `num_sinks`, `softcap`, `scale`, `impl`, and `block_size` for the
    ring and USP). Returns `[B, T, H, D]` in natural token order.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh; mesh axes: "
                         f"{tuple(mesh.axis_names)}")
    num_shards = mesh.shape[axis_name]
    if (strategy == "usp") != (ulysses_degree is not None):
        raise ValueError("ulysses_degree is required by strategy='usp' and only by it; got "
                         f"strategy={strategy!r}, ulysses_degree={ulysses_degree!r}")
    if strategy == "usp" and not (isinstance(ulysses_degree, int) and ulysses_degree >= 1
                                  and num_shards % ulysses_degree == 0):
        raise ValueError(f"ulysses_degree must be a positive int dividing the size "
                         f"{num_shards} of axis {axis_name!r}; got {ulysses_degree!r}")
    ring_size = num_shards // ulysses_degree if strategy == "usp" else num_shards
    check_layout(layout, q.shape[1], ring_size)
    batch = mesh_lib.batch_axes(mesh, q.shape[0], axes=batch_axes, exclude=(axis_name,))
    heads = head_axis if head_axis in mesh.axis_names and not (
        q.shape[2] % mesh.shape[head_axis] or k.shape[2] % mesh.shape[head_axis]) else None
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    seq_spec = PartitionSpec(batch, axis_name)
    qkv_spec = PartitionSpec(batch, axis_name, heads)
    attend = _STRATEGY_FNS[strategy]
    if strategy == "usp":
        attend = functools.partial(attend, ulysses_degree=ulysses_degree)
    relayout = functools.partial(shard_to_layout, layout=layout, axis_name=axis_name,
                                 ring_size=ring_size)

    def local(q, k, v, segment_ids):
        q, k, v, segment_ids = (relayout(x) for x in (q, k, v, segment_ids))
        out = attend(q, k, v, axis_name=axis_name, causal=causal, segment_ids=segment_ids,
                     layout=layout, **options)
        return shard_from_layout(out, layout, axis_name, ring_size=ring_size)

    inputs = (q, k, v, segment_ids)
    specs = (qkv_spec, qkv_spec, qkv_spec, seq_spec)
    if jax.sharding.AxisType.Explicit in mesh.axis_types:  # shard_map wants them as specified
        inputs = tuple(jax.reshard(x, NamedSharding(mesh, spec) if isinstance(mesh, Mesh)
                                   else spec) for x, spec in zip(inputs, specs, strict=True))
    sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qkv_spec,
                            check_vma=False)
    return sharded(*inputs)
