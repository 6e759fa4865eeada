"""Diagonal linear recurrences `h_t = a_t * h_{t-1} + b_t` over the time axis 1.

Three implementations of the same math: `"reference"` (a sequential `lax.scan`, the test
oracle), `"associative"` (Blelloch's parallel prefix scan over the affine maps
`h -> a h + b`, Blelloch 1990; as used by Martin & Cundy 2018 and S5, Smith et al. 2023) and
`"chunked"` (a sequential scan over chunks with a parallel scan inside each, memory O(T)).
States are carried in fp32 (complex64 for complex inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("reference", "associative", "chunked")


def segment_keep(segment_ids):
    """`[B, T]` fp32: 1 where token t continues the document of token t-1, 0 at a border.

    Token 0 keeps (it continues from the initial state). `segment_ids` `[B, T]`: changes of
    id mark document borders (0 = padding is a document of its own)."""
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(jnp.float32)
    return jnp.concatenate([jnp.ones((segment_ids.shape[0], 1), jnp.float32), same], axis=1)


def check_state_norm(op: str, state_norm) -> None:
    """ValueError naming `op` unless `state_norm` is None or a number > 0."""
    if state_norm is not None and not (isinstance(state_norm, (int, float))
                                       and state_norm > 0):
        raise ValueError(f"{op}: state_norm must be a number > 0 or None; got {state_norm!r}")


def clip_state_norm(h, state_norm):
    """Stuffed Mamba's state normalization (Chen et al. 2024): each row `h[..., :]` (one
    channel's state `[N]`) scaled down to L2 norm `state_norm` where it is larger."""
    norm = jnp.sqrt(jnp.sum(h * h, axis=-1, keepdims=True))
    return h * jnp.minimum(1.0, state_norm / jnp.maximum(norm, 1e-30))


def _expand(keep, ndim):
    return keep.reshape(keep.shape + (1,) * (ndim - 2))


def _combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _reference(a, b, h0):
    def step(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    a_T = jnp.moveaxis(jnp.broadcast_to(a, b.shape), 1, 0)
    h_last, h_T = jax.lax.scan(step, h0, (a_T, jnp.moveaxis(b, 1, 0)))
    return jnp.moveaxis(h_T, 0, 1), h_last


def _associative(a, b, h0):
    a_cum, b_cum = jax.lax.associative_scan(_combine, (jnp.broadcast_to(a, b.shape), b), axis=1)
    h = a_cum * h0[:, None] + b_cum
    return h, h[:, -1]


def _chunked(a, b, h0, chunk_size):
    B, T = b.shape[:2]
    pad = -T % chunk_size
    a = jnp.broadcast_to(a, b.shape)
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (b.ndim - 2)
    a = jnp.pad(a, widths, constant_values=1.0)  # identity steps keep the final state
    b = jnp.pad(b, widths)
    chunks = lambda x: jnp.moveaxis(x.reshape((B, -1, chunk_size) + x.shape[2:]), 1, 0)

    def step(h, ab):
        h_chunk, h_last = _associative(ab[0], ab[1], h)
        return h_last, h_chunk

    h_last, h = jax.lax.scan(step, h0, (chunks(a), chunks(b)))
    h = jnp.moveaxis(h, 0, 1).reshape((B, T + pad) + b.shape[2:])
    return h[:, :T], h_last


def linear_scan(a, b, *, initial_state=None, segment_ids=None, reverse=False,
                return_final_state=False, impl="auto", chunk_size=128):
    """Runs `h_t = a_t * h_{t-1} + b_t` (or `h_t = a_t * h_{t+1} + b_t` with `reverse`).

    Args:
      a: decays, broadcastable to `b` (e.g. `[B, T, D, 1]` against `[B, T, D, N]`).
      b: inputs `[B, T, ...]`.
      initial_state: `[B, ...]` state before the first step (the last one when reversed);
        default zeros.
      segment_ids: `[B, T]` document ids; the state resets (`a_t = 0`) at every border.
      reverse: run from the end of the sequence to its start.
      return_final_state: also return the state after the last step (fp32, or complex64
        for complex inputs, as in S4D).
      impl: "reference", "associative", "chunked" or "auto" (= "chunked").
      chunk_size: chunk length of the "chunked" impl.

    Returns:
      `h [B, T, ...]` in `b`'s dtype, and the final state `[B, ...]` when asked.
    """
    if impl == "auto":
        impl = "chunked"
    if impl not in IMPLS:
        raise ValueError(f"linear_scan: impl must be one of {IMPLS + ('auto',)}; got {impl!r}")
    if b.ndim < 2:
        raise ValueError(f"linear_scan: b must be [B, T, ...]; got shape {b.shape}")
    try:
        jnp.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"linear_scan: a {a.shape} must broadcast to b {b.shape}") from None
    if segment_ids is not None and segment_ids.shape != b.shape[:2]:
        raise ValueError(f"linear_scan: segment_ids must be [B, T] = {b.shape[:2]}; "
                         f"got {segment_ids.shape}")
    if initial_state is not None and initial_state.shape != (b.shape[0],) + b.shape[2:]:
        raise ValueError(f"linear_scan: initial_state must be [B, ...] = "
                         f"{(b.shape[0],) + b.shape[2:]}; got {initial_state.shape}")
    if chunk_size < 1:
        raise ValueError(f"linear_scan: chunk_size must be >= 1; got {chunk_size}")
    out_dtype = b.dtype
    state_dtype = jnp.result_type(jnp.float32, a.dtype, b.dtype)  # complex stays complex
    a, b = a.astype(state_dtype), b.astype(state_dtype)
    if reverse:
        a, b = jnp.flip(a, 1) if a.shape[1] > 1 else a, jnp.flip(b, 1)
        segment_ids = None if segment_ids is None else jnp.flip(segment_ids, 1)
    if segment_ids is not None:
        a = a * _expand(segment_keep(segment_ids), a.ndim)
    h0 = jnp.zeros((b.shape[0],) + b.shape[2:], state_dtype)
    if initial_state is not None:
        h0 = initial_state.astype(state_dtype)
    if impl == "reference":
        h, h_last = _reference(a, b, h0)
    elif impl == "associative":
        h, h_last = _associative(a, b, h0)
    else:
        h, h_last = _chunked(a, b, h0, chunk_size)
    h = (jnp.flip(h, 1) if reverse else h).astype(out_dtype)
    return (h, h_last) if return_final_state else h
