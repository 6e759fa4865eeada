"""Token orders for a sequence split over `P` devices, and the permutations to reach them.

A layout says which global tokens each of the `P` shards of the sequence axis holds:

- `"contiguous"`: shard r holds tokens `[r T/P, (r+1) T/P)`.
- `"zigzag"`: the sequence is cut into `2P` chunks and shard r holds chunks r and
  `2P-1-r`, so every shard does the same causal work (Brandon et al. 2023, "Striped
  attention", and the zigzag ring of Zhu et al., ring-flash-attention).
- `"striped"`: token i lives on shard `i mod P` (Brandon et al. 2023).

`to_layout` reorders a global array so that splitting it into `P` equal contiguous pieces
gives each shard its tokens (`layout_order` spells the permutation out); `from_layout`
undoes it. Inside `jax.shard_map`,
`shard_positions` gives the global positions of the local tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout: str, seq_len: int, num_shards: int) -> None:
    """Raises `ValueError` unless `layout` is known and `seq_len` splits into its chunks."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1; got {num_shards}")
    multiple = 2 * num_shards if layout == "zigzag" else num_shards
    if seq_len % multiple:
        raise ValueError(
            f"sequence length {seq_len} must be divisible by {multiple} for layout={layout!r} "
            f"over {num_shards} shards")


def bound_axis_size(axis_name: str) -> int:
    """Size of the mesh axis `axis_name` inside `shard_map`; `ValueError` if it is not bound."""
    try:
        return jax.lax.axis_size(axis_name)
    except NameError as e:
        raise ValueError(f"axis_name {axis_name!r} is not a mesh axis bound by the enclosing "
                         f"shard_map") from e


def layout_order(seq_len: int, layout: str, num_shards: int) -> np.ndarray:
    """`[seq_len]` int array: entry i is the global token at laid-out position i."""
    check_layout(layout, seq_len, num_shards)
    idx = np.arange(seq_len)
    if layout == "contiguous":
        return idx
    if layout == "striped":
        return idx.reshape(-1, num_shards).T.reshape(-1)
    chunks = idx.reshape(2 * num_shards, -1)
    pairs = [(r, 2 * num_shards - 1 - r) for r in range(num_shards)]
    return np.concatenate([chunks[list(pair)].reshape(-1) for pair in pairs])


def to_layout(x, layout: str, num_shards: int, axis: int = 1):
    """Reorders `x` along `axis` from natural token order into `layout`'s order.

    Built from reshapes, flips and transposes (never a gather), with the inverse
    permutation as its VJP, so on an array sharded along `axis` XLA moves only O(T/P) per
    device (collective permutes / all-to-all), forward and backward.
    """
    check_layout(layout, x.shape[axis], num_shards)
    return _reorder(x, layout, num_shards, axis % x.ndim, False)


def from_layout(x, layout: str, num_shards: int, axis: int = 1):
    """Inverse of `to_layout`: back from `layout`'s order to natural token order."""
    check_layout(layout, x.shape[axis], num_shards)
    return _reorder(x, layout, num_shards, axis % x.ndim, True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _reorder(x, layout, num_shards, axis, inverse):
    if layout == "contiguous":
        return x
    pre, length, post = x.shape[:axis], x.shape[axis], x.shape[axis + 1:]
    if layout == "striped":
        split = (num_shards, length // num_shards) if inverse else (length // num_shards,
                                                                      num_shards)
        return jnp.swapaxes(x.reshape(*pre, *split, *post), axis, axis + 1).reshape(x.shape)
    chunk = length // (2 * num_shards)
    if inverse:  # [P, 2, c] -> [2, P, c], second half reversed
        y = x.reshape(*pre, num_shards, 2, chunk, *post)
        halves = (jnp.take(y, 0, axis + 1), jnp.flip(jnp.take(y, 1, axis + 1), axis))
        return jnp.stack(halves, axis).reshape(x.shape)
    y = x.reshape(*pre, 2, num_shards, chunk, *post)
    halves = (jnp.take(y, 0, axis), jnp.flip(jnp.take(y, 1, axis), axis))
    return jnp.stack(halves, axis + 1).reshape(x.shape)


def _reorder_fwd(x, layout, num_shards, axis, inverse):
    return _reorder(x, layout, num_shards, axis, inverse), None


def _reorder_bwd(layout, num_shards, axis, inverse, _, g):
    return (_reorder(g, layout, num_shards, axis, not inverse),)


_reorder.defvjp(_reorder_fwd, _reorder_bwd)


def shard_positions(local_len: int, layout: str, num_shards: int, shard_index):
    """Global positions `[local_len]` (int32) of the tokens of shard `shard_index`.

    `shard_index` may be traced (e.g. `jax.lax.axis_index(axis_name)` in `shard_map`).
    """
    check_layout(layout, local_len * num_shards, num_shards)
    i = jnp.arange(local_len, dtype=jnp.int32)
    r = jnp.asarray(shard_index, jnp.int32)
    if layout == "contiguous":
        return r * local_len + i
    if layout == "striped":
        return i * num_shards + r
    half = local_len // 2
    chunk = jnp.where(i < half, r, 2 * num_shards - 1 - r)
    return chunk * half + i % half
