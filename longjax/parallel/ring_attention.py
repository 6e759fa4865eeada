"""Ring attention: exact softmax attention over a sequence sharded along a mesh axis.

Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers": each of the P
devices keeps its queries; key/value shards travel one hop per step with `ppermute`, and
each step's partial attention is merged into the running output through its logsumexp in
fp32 (Milakov & Gimelshein 2018). The backward pass recomputes every step from the saved
output and logsumexp; at the start of each step a device sends the dK/dV it accumulated
for the block it held to the device that holds that block now, so every transfer (K/V
and dK/dV alike) overlaps a step's tiles, and after P hops each block's dK/dV is at its
owner.

Every step is cut into tiles (`block_size` queries x `block_size` keys), each classified
by the block planner from its tokens' position ranges: a tile whose positions rule out
every pair (causal order, sliding window) is skipped, so fully masked work costs nothing,
and a tile whose positions allow every pair runs without a position mask (only the packed
documents' segments, when given, are checked per element). With the `"zigzag"` and
`"striped"` layouts every device then computes the same number of tiles (Brandon et al.
2023, "Striped Attention").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from longjax.ops import impl as impl_lib
from longjax.ops.attention import (
    AttentionSpec,
    SideInputs,
    backward,
    forward,
    make_spec,
    merge_attention,
)
from longjax.ops.attention.planner import key_blocks
from longjax.parallel.layouts import bound_axis_size, check_layout, shard_positions

TILE_IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
_MAX_DEFAULT_BLOCK = 512
_EMPTY, _PARTIAL, _FULL = 0, 1, 2  # tile kinds, the branches of `_on_kind`


class _Config(NamedTuple):
    axis_name: str
    layout: str
    spec: AttentionSpec  # of PARTIAL tiles, masked by global positions
    block_size: int
    impl: str
    group_size: int


def ring_attention(
    q, k, v, *, axis_name, causal=False, segment_ids=None, layout="zigzag", window=None,
    num_sinks=0, softcap=None, scale=None, block_size=None, impl="auto", group_size=1,
    return_tile_count=False,
):
    """Attention of the local query shard to the whole sharded sequence; call in
    `jax.shard_map(..., check_vma=False)` (the tile attention does not type varying axes).

    q `[B, T, H, D]` and k, v `[B, T, K, D]` (`H % K == 0`, GQA without repeating K/V) are
    this device's `T` tokens, laid out by `layout` over the `axis_name` shards (see
    `longjax.parallel.to_layout`); `segment_ids` `[B, T]` are the local tokens' ids
    (0 = padding). Masks (causal, window, sinks) use the tokens' global positions.
    `block_size` (the tile) must divide the layout chunk; by default it is the chunk (a
    quarter of it for "striped", whose steps are triangular), halved while above 512.
    `impl` is the blockwise attention run per tile (`TILE_IMPLS`; "auto" is resolved
    by `longjax.ops.impl`). With `group_size=U` the ring runs across the `P / U` groups of
    `U` consecutive devices of `axis_name` (the device at offset u of a group talks to
    offset u of the next), each group being one ring shard (USP, `usp_attention`).
    Returns `[B, T, H, D]` in q's dtype, and with
    `return_tile_count` also the number of tiles this device computed (forward only).
    """
    spec, _ = make_spec(q, k, v, causal=causal, window=window, num_sinks=num_sinks,
                        softcap=softcap, scale=scale, segment_ids=segment_ids)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must hold the same local tokens; got lengths {q.shape[1]} "
                         f"and {k.shape[1]}")
    num_devices = bound_axis_size(axis_name)
    if not (isinstance(group_size, int) and group_size >= 1 and num_devices % group_size == 0):
        raise ValueError(f"group_size must be a positive int dividing the {num_devices} devices "
                         f"of axis {axis_name!r}; got {group_size!r}")
    num_shards = num_devices // group_size
    local_len = q.shape[1]
    check_layout(layout, local_len * num_shards, num_shards)
    chunk = local_len // 2 if layout == "zigzag" else local_len
    block_size = _default_block_size(chunk, layout) if block_size is None else block_size
    if block_size < 1 or chunk % block_size:
        raise ValueError(f"block_size must divide the layout chunk of {chunk} tokens; "
                         f"got {block_size}")
    if impl not in TILE_IMPLS:
        raise ValueError(f"impl must be one of {TILE_IMPLS}; got {impl!r}")
    spec = dataclasses.replace(spec, has_positions=True)
    cfg = _Config(axis_name, layout, spec, block_size, impl, group_size)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    if return_tile_count:
        out, _, count = _forward(cfg, q, k, v, segment_ids)
        return out, count
    return _ring(cfg, q, k, v, segment_ids)


def _default_block_size(chunk, layout):
    """See `ring_attention`'s docstring."""
    block = chunk // 4 if layout == "striped" and chunk % 4 == 0 else chunk
    while block > _MAX_DEFAULT_BLOCK and block % 2 == 0:
        block //= 2
    return block


def _over_tiles(cfg, length, kind_fn, tile_fn, carry):
    """Runs `carry = tile_fn(i, j, kind, carry)` over every tile (query block i, key block j)
    of kind `kind_fn(i, j)` (`_EMPTY`, `_PARTIAL` or `_FULL`); `tile_fn` computes only when
    not empty. Returns the carry and the number of tiles computed. One loop body, whatever
    the number of tiles.

    A `while_loop`, not a `fori_loop`: with static bounds the latter is a `scan`, and when
    the ring runs inside an outer `scan` that is differentiated (`model.scan_layers`),
    JAX's partial evaluation of that scan kept every tile's output block of the forward
    as a residual (48 GiB per device for a 1B model at 131k tokens on v5e-16), though
    the ring's custom VJP never differentiates this loop.
    """
    n = length // cfg.block_size

    def body(state):
        t, carry, count = state
        i, j = t // n, t % n
        kind = kind_fn(i, j)
        return t + 1, tile_fn(i, j, kind, carry), count + (kind != _EMPTY).astype(jnp.int32)

    count = _varying_like(jnp.zeros((), jnp.int32), jax.tree.leaves(carry)[0])
    _, carry, count = jax.lax.while_loop(lambda state: state[0] < n * n, body,
                                         (jnp.zeros((), jnp.int32), carry, count))
    return carry, count


def _on_kind(kind, compute, blocks):
    """`compute(full, blocks)` by tile kind: empty tiles return `blocks` unchanged, full
    ones compute without position masks."""
    return jax.lax.switch(kind, [lambda b: b, functools.partial(compute, False),
                                 functools.partial(compute, True)], blocks)


def _block(x, i, size, axis):
    if x is None:
        return None
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis)


def _set_block(x, update, i, size, axis):
    return jax.lax.dynamic_update_slice_in_dim(x, update, i * size, axis)


def _visible(cfg, q_pos, kv_pos, seq_len):
    """Tile kind from the block planner on the position masks (exact for position ranges,
    `seq_len` tokens in all): `_EMPTY` when it visits no key of `kv_pos` for the queries at
    `q_pos`, `_FULL` when every key is in its unmasked range, else `_PARTIAL`."""
    positions_only = dataclasses.replace(cfg.spec, has_segments=False)
    seen = key_blocks(positions_only, q_pos.min(), q_pos.max(), block_k=1, kv_len=seq_len)
    k_min, k_max = kv_pos.min(), kv_pos.max()
    visible = (k_min < seen.sinks) | ((seen.lo < seen.hi) & (k_min < seen.hi)
                                      & (k_max >= seen.lo))
    full = (k_min >= seen.full_lo) & (k_max < seen.full_hi)
    return jnp.where(visible, jnp.where(full, _FULL, _PARTIAL), _EMPTY).astype(jnp.int32)


def _tile_spec(cfg, full):
    """The spec of a tile: PARTIAL tiles mask by position, FULL ones only by segments."""
    if not full:
        return cfg.spec
    return dataclasses.replace(cfg.spec, causal=False, window=None, num_sinks=0,
                               has_positions=False)


def _side_inputs(full, q_seg, kv_seg, q_pos, kv_pos, batch):
    if full:
        return SideInputs(segment_ids=q_seg, kv_segment_ids=kv_seg)
    return SideInputs(
        segment_ids=q_seg, kv_segment_ids=kv_seg,
        q_positions=jnp.broadcast_to(q_pos, (batch, q_pos.shape[0])),
        kv_positions=jnp.broadcast_to(kv_pos, (batch, kv_pos.shape[0])),
    )


def _on_tiles(cfg, run):
    """`run(impl)` with the tiles' blockwise implementation (`"auto"`: `longjax.ops.impl`)."""
    return impl_lib.run("ring_attention_tile", cfg.impl, run)


def _tile_forward(cfg, spec, q, k, v, side):
    """(out `[B, t, H, D]`, lse `[B, H, t]` fp32) of one tile; rows with no key: lse=-inf."""
    return _on_tiles(cfg, lambda impl: forward(spec, q, k, v, side, impl=impl))


def _tile_backward(cfg, spec, q, k, v, out, lse, dout, side):
    """(dq, dk, dv) of one tile given the final `out` and `lse` of its query rows."""
    grads = _on_tiles(cfg, lambda impl: backward(spec, q, k, v, side, out, lse, dout,
                                                 impl=impl)[:3])
    return tuple(g.astype(jnp.float32) for g in grads)


def _varying_like(x, like):
    """`x` typed as varying over the same mesh axes as `like` (for `shard_map`'s checks)."""
    vma = tuple(sorted(jax.typeof(like).manual_axis_type.varying))
    return jax.lax.pcast(x, vma, to="varying") if vma else x


def _ring_index(cfg):
    """(number of ring shards, this device's ring shard): devices `[r U, (r + 1) U)` of the
    axis form ring shard r, U = `cfg.group_size`."""
    num_devices = jax.lax.axis_size(cfg.axis_name)
    return num_devices // cfg.group_size, jax.lax.axis_index(cfg.axis_name) // cfg.group_size


def _rotate(cfg, tree):
    """Sends every leaf one hop along the ring: device r U + u -> (r + 1) U + u."""
    num_devices, U = jax.lax.axis_size(cfg.axis_name), cfg.group_size
    perm = [(i, (i + U) % num_devices) for i in range(num_devices)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, cfg.axis_name, perm), tree)


def _forward(cfg, q, k, v, q_seg):
    """Returns (out in q.dtype, lse `[B, H, T]` fp32, number of tiles computed)."""
    num_shards, me = _ring_index(cfg)
    B, T, H, D = q.shape
    c = cfg.block_size
    q_pos = shard_positions(T, cfg.layout, num_shards, me)

    def attend(step, acc, kv):
        k_s, v_s, kv_seg = kv
        kv_pos = shard_positions(T, cfg.layout, num_shards, (me - step) % num_shards)

        def tile(i, j, kind, o_lse):
            o, lse = o_lse

            def compute(full, o_lse_i):
                side = _side_inputs(full, _block(q_seg, i, c, 1), _block(kv_seg, j, c, 1),
                                    _block(q_pos, i, c, 0), _block(kv_pos, j, c, 0), B)
                o_t, lse_t = _tile_forward(cfg, _tile_spec(cfg, full), _block(q, i, c, 1),
                                           _block(k_s, j, c, 1), _block(v_s, j, c, 1), side)
                return merge_attention(*o_lse_i, o_t, lse_t)

            o_i, lse_i = _on_kind(kind, compute, (_block(o, i, c, 1), _block(lse, i, c, 2)))
            return _set_block(o, o_i, i, c, 1), _set_block(lse, lse_i, i, c, 2)

        kind = lambda i, j: _visible(cfg, _block(q_pos, i, c, 0), _block(kv_pos, j, c, 0),
                                     T * num_shards)
        o_lse, count = _over_tiles(cfg, T, kind, tile, acc[:2])
        return (*o_lse, acc[2] + count)

    def body(carry, step):
        acc, kv = carry
        next_kv = _rotate(cfg, kv)  # issued before this step's compute
        return (attend(step, acc, kv), next_kv), None

    acc = jax.tree.map(lambda x: _varying_like(x, q), (
        jnp.zeros((B, T, H, D), jnp.float32), jnp.full((B, H, T), -jnp.inf, jnp.float32),
        jnp.zeros((), jnp.int32)))
    (acc, kv), _ = jax.lax.scan(body, (acc, (k, v, q_seg)), jnp.arange(num_shards - 1))
    o, lse, count = attend(num_shards - 1, acc, kv)
    return o.astype(q.dtype), lse, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg, q, k, v, q_seg):
    return _forward(cfg, q, k, v, q_seg)[0]


def _ring_fwd(cfg, q, k, v, q_seg):
    out, lse, _ = _forward(cfg, q, k, v, q_seg)
    return out, (q, k, v, q_seg, out, lse)


def _ring_bwd(cfg, res, dout):
    q, k, v, q_seg, out, lse = res
    num_shards, me = _ring_index(cfg)
    T, c = q.shape[1], cfg.block_size
    q_pos = shard_positions(T, cfg.layout, num_shards, me)

    def grads(step, dq, kv, dkv):
        k_s, v_s, kv_seg = kv
        kv_pos = shard_positions(T, cfg.layout, num_shards, (me - step) % num_shards)

        def tile(i, j, kind, acc):
            dq, dk, dv = acc

            def compute(full, blocks):
                side = _side_inputs(full, _block(q_seg, i, c, 1), _block(kv_seg, j, c, 1),
                                    _block(q_pos, i, c, 0), _block(kv_pos, j, c, 0),
                                    q.shape[0])
                grads = _tile_backward(
                    cfg, _tile_spec(cfg, full), _block(q, i, c, 1), _block(k_s, j, c, 1),
                    _block(v_s, j, c, 1), _block(out, i, c, 1), _block(lse, i, c, 2),
                    _block(dout, i, c, 1), side)
                return tuple(b + g for b, g in zip(blocks, grads, strict=True))

            dq_i, dk_j, dv_j = _on_kind(
                kind, compute, (_block(dq, i, c, 1), _block(dk, j, c, 1), _block(dv, j, c, 1)))
            return (_set_block(dq, dq_i, i, c, 1), _set_block(dk, dk_j, j, c, 1),
                    _set_block(dv, dv_j, j, c, 1))

        # dK/dV of the block held at the previous step go to the device holding it now;
        # the transfer overlaps this step's tiles, whose part is added when both are done.
        arriving = _rotate(cfg, dkv)
        kind = lambda i, j: _visible(cfg, _block(q_pos, i, c, 0), _block(kv_pos, j, c, 0),
                                     T * num_shards)
        (dq, *part), _ = _over_tiles(cfg, T, kind, tile, (dq, zeros(k), zeros(v)))
        return dq, tuple(a + b for a, b in zip(arriving, part, strict=True))

    def body(carry, step):
        dq, kv, dkv = carry
        next_kv = _rotate(cfg, kv)  # issued before this step's compute
        dq, dkv = grads(step, dq, kv, dkv)
        return (dq, next_kv, dkv), None

    zeros = lambda x: _varying_like(jnp.zeros(x.shape, jnp.float32), x)
    carry = (zeros(q), (k, v, q_seg), (zeros(k), zeros(v)))
    (dq, kv, dkv), _ = jax.lax.scan(body, carry, jnp.arange(num_shards - 1))
    dq, dkv = grads(num_shards - 1, dq, kv, dkv)
    dk, dv = _rotate(cfg, dkv)  # the last hop: every block's dK/dV back at its owner
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)
