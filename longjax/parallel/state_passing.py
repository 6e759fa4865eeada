"""Cross-shard state passing for linear recurrences split over a sequence mesh axis.

A linear recurrence over a chunk of tokens is an affine map of the state entering it:
`h_out = A h_in + b`. When the sequence is sharded over a mesh axis, each shard scans its
tokens from a zero state (giving `b`, its final state) and the product of its transitions
(giving `A`). This module turns those per-shard summaries into each shard's incoming state,
so the shard can correct its local outputs (the scheme of Sun et al. 2024, "Linear
Attention Sequence Parallelism", and of Mamba-2's inter-chunk state passing, Dao & Gu 2024).

Call it inside `jax.shard_map` over `axis_name`. Cost per device: one all-gather of the
`n = axis_size` summaries (`n * (|A| + |b|)` values in fp32), then `n` affine steps on the
state locally (`O(n |b|)` for a diagonal `A`, `O(n S |b|)` for a matrix `A`). `n` is the
number of devices on the axis (small), so the sequential local combine is cheaper than a
log-depth scan of map compositions, whose matrix products would cost `O(S^3)` each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_affine(A, h, *, diagonal: bool):
    """`A h`: elementwise (`A` broadcastable to `h`) or a matrix `A [..., S, S]` on the
    leading state axis of `h [..., S, *rest]` (the leading dims of `A` are `h`'s batch)."""
    if diagonal:
        return A * h
    batch = A.ndim - 2
    rest = h.shape[batch + 1:]
    flat = h.reshape(h.shape[:batch + 1] + (-1,))
    return jnp.matmul(A, flat).reshape(h.shape[:batch + 1] + rest)


def _check(A, b, diagonal, initial_state):
    if diagonal:
        try:
            jnp.broadcast_shapes(A.shape, b.shape)
        except ValueError:
            raise ValueError(f"state_passing: diagonal A {A.shape} must broadcast to the state "
                             f"b {b.shape}") from None
    else:
        batch = A.ndim - 2
        if (A.ndim < 2 or A.shape[-1] != A.shape[-2] or b.ndim < A.ndim - 1
                or b.shape[:batch + 1] != A.shape[:-1]):
            raise ValueError(f"state_passing: matrix A must be [..., S, S] acting on axis "
                             f"{A.ndim - 2} of b [..., S, ...]; got A {A.shape}, b {b.shape}")
    if initial_state is not None and initial_state.shape != b.shape:
        raise ValueError(f"state_passing: initial_state {initial_state.shape} must have the "
                         f"state's shape {b.shape}")


def incoming_states(A, b, *, axis_name, initial_state=None, diagonal=True):
    """Each shard's incoming state, and the global final state, inside `shard_map`.

    Args:
      A: this shard's transition: diagonal (any shape broadcastable to `b`, e.g. `[B, H, 1,
        1]` for a per-head decay) or, with `diagonal=False`, a matrix `[*batch, S, S]` acting
        on axis `len(batch)` of the state.
      b: this shard's final state when started from zero, `[*batch, S, *rest]`.
      axis_name: the mesh axis the sequence is sharded over (shard `i` holds chunk `i`).
      initial_state: the state entering shard 0 (default zeros), shaped like `b`.
      diagonal: whether `A` is elementwise or a matrix.

    Returns:
      `(h_in, h_final)`, both fp32 (complex64 for complex states, as S4D's) shaped like
      `b`: the state entering this shard, and the state after the last shard (the same on
      every shard).
    """
    _check(A, b, diagonal, initial_state)
    dtype = jnp.promote_types(jnp.result_type(A, b), jnp.float32)
    A, b = A.astype(dtype), b.astype(dtype)
    h0 = jnp.zeros_like(b) if initial_state is None else initial_state.astype(dtype)
    all_A = jax.lax.all_gather(A, axis_name)
    all_b = jax.lax.all_gather(b, axis_name)

    def step(h, summary):
        A_i, b_i = summary
        return apply_affine(A_i, h, diagonal=diagonal) + b_i, h

    h_final, entering = jax.lax.scan(step, h0, (all_A, all_b))
    return entering[jax.lax.axis_index(axis_name)], h_final
