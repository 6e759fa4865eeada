"""Token orders for a sequence split over `P` devices, and the permutations to reach them.

A layout says which global tokens each of the `P` shards of the sequence axis holds:

- `"contiguous"`: shard r holds tokens `[r T/P, (r+1) T/P)`.
- `"zigzag"`: the sequence is cut into `2P` chunks and shard r holds chunks r and
  `2P-1-r`, so every shard does the same causal work (Brandon et al. 2023, "Striped
  attention", and the zigzag ring of Zhu et al., ring-flash-attention).
- `"striped"`: token i lives on shard `i mod P` (Brandon et al. 2023).

`to_layout` reorders a global array so that splitting it into `P` equal contiguous pieces
gives each shard its tokens (`layout_order` spells the permutation out); `from_layout`
undoes it. Inside `jax.shard_map`, `shard_to_layout` / `shard_from_layout` do the same
with explicit collectives on shards that hold contiguous pieces of the natural order (how
`jax.make_mesh`'s explicit-axes arrays arrive), and `shard_positions` gives the global
positions of the local tokens.
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


def shard_to_layout(x, layout: str, axis_name, *, ring_size: int | None = None, axis: int = 1,
                    inverse: bool = False):
    """Inside `shard_map`: from contiguous shards of the natural order to `layout`'s order.

    `x` holds this device's `L` tokens along `axis`, device p of the `P` devices of
    `axis_name` (a name or a tuple of names, linearised major to minor) holding the
    natural tokens `[p L, (p + 1) L)`. The layout is over `ring_size` shards (default P);
    with `ring_size = R < P` each of the R layout shards is split contiguously over
    `P / R` consecutive devices (Ulysses groups inside a ring, `usp_attention`).
    "zigzag" moves halves of shards with `ppermute`, "striped" is one `all_to_all`
    when `L % P == 0` (else an all-gather, O(T) per device); O(L) sent per device. `inverse=True` is
    `shard_from_layout`.
    """
    num_devices = bound_axis_size(axis_name)
    ring_size = num_devices if ring_size is None else ring_size
    if ring_size < 1 or num_devices % ring_size:
        raise ValueError(f"ring_size must divide the {num_devices} devices of {axis_name!r}; "
                         f"got {ring_size}")
    length = x.shape[axis]
    check_layout(layout, length * num_devices, ring_size)
    if layout == "contiguous":
        return x
    if layout == "striped":
        if ring_size != num_devices:
            raise ValueError("layout='striped' cannot be split into groups inside a ring; "
                             "use 'zigzag' or 'contiguous'")
        if length % num_devices:  # uneven exchange: gather all, keep mine (O(T) per device)
            order = layout_order(length * num_devices, layout, num_devices)
            order = np.argsort(order) if inverse else order
            mine = jnp.asarray(order.reshape(num_devices, length))[
                jax.lax.axis_index(axis_name)]
            gathered = jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)
            return jnp.take(gathered, mine, axis=axis)
        pre, post = x.shape[:axis], x.shape[axis + 1:]
        if inverse:  # laid-out i = (p L/P + a) P + r lives on shard p at a P + r
            y = jax.lax.all_to_all(x.reshape(*pre, num_devices, -1, *post), axis_name, axis,
                                   axis, tiled=True)
            return jnp.moveaxis(y, axis, axis + 1).reshape(x.shape)
        y = jnp.moveaxis(x.reshape(*pre, -1, num_devices, *post), axis + 1, axis)
        return jax.lax.all_to_all(y, axis_name, axis, axis, tiled=True).reshape(x.shape)
    if length % 2:
        raise ValueError(f"layout='zigzag' inside shard_map needs an even local length; got "
                         f"{length}")
    # Halves of shards are the unit: laid-out half q holds natural half order[q].
    order = layout_order(2 * num_devices, "zigzag", ring_size)
    source = np.argsort(order) if inverse else order
    halves = jnp.split(x, 2, axis)
    me = jax.lax.axis_index(axis_name)
    out = []
    for dst_slot in range(2):
        received = []
        for src_slot in range(2):
            perm = [(int(source[q]) // 2, q // 2) for q in range(dst_slot, 2 * num_devices, 2)
                    if source[q] % 2 == src_slot]
            received.append(jax.lax.ppermute(halves[src_slot], axis_name, perm) if perm
                            else jnp.zeros_like(halves[src_slot]))
        src_slot_of = jnp.asarray(source[dst_slot::2] % 2, jnp.int32)[me]
        out.append(jnp.where(src_slot_of == 0, received[0], received[1]))
    return jnp.concatenate(out, axis)


def shard_from_layout(x, layout: str, axis_name, *, ring_size: int | None = None,
                      axis: int = 1):
    """Inverse of `shard_to_layout`: back to contiguous shards of the natural order."""
    return shard_to_layout(x, layout, axis_name, ring_size=ring_size, axis=axis, inverse=True)
