"""Mamba's selective scan (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces", Algorithm 2 with zero-order-hold `A` and Euler `B`):

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   y_t = C_t h_t + D u_t,
    y_t <- y_t * silu(z_t)  when z is given,

per channel d and state index n, with `delta <- softplus(delta + delta_bias)` optionally.
Implementations: `"reference"` (sequential `lax.scan`, autodiff, fp32 state), `"xla"` (the
same token-by-token recurrence in chunks, with a hand-written backward that recomputes each
chunk's states from one saved state per chunk, as the Pallas kernels do, so no
`[B, T, D, N]` tensor exists and the working set stays in cache), `"pallas"` /
`"pallas_interpret"` (`pallas_kernels.selective_scan`, GPU and TPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longjax.ops import impl as impl_lib
from longjax.ops.cpu_rewrites import axis_sum
from longjax.ops.scan import check_state_norm, clip_state_norm, segment_keep

IMPLS = ("reference", "xla", "pallas", "pallas_interpret")


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids, impl):
    if impl not in IMPLS + ("auto",):
        raise ValueError(f"selective_scan: impl must be one of {IMPLS + ('auto',)}; got {impl!r}")
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be [B, T, D]; got u {u.shape}, "
                         f"delta {delta.shape}")
    Bsz, T, Dch = u.shape
    if A.ndim != 2 or A.shape[0] != Dch:
        raise ValueError(f"selective_scan: A must be [D, N] = [{Dch}, N]; got {A.shape}")
    N = A.shape[1]
    for name, x in (("B", B), ("C", C)):
        if x.shape[:2] != (Bsz, T) or x.shape[-1] != N or x.ndim not in (3, 4):
            raise ValueError(f"selective_scan: {name} must be [B, T, N] or [B, T, G, N] with "
                             f"B, T, N = {Bsz}, {T}, {N}; got {x.shape}")
    if B.shape != C.shape:
        raise ValueError(f"selective_scan: B {B.shape} and C {C.shape} must have one shape")
    if B.ndim == 4 and Dch % B.shape[2]:
        raise ValueError(f"selective_scan: D = {Dch} channels must divide into the "
                         f"G = {B.shape[2]} groups of B and C")
    for name, x, shape in (("D", D, (Dch,)), ("delta_bias", delta_bias, (Dch,)),
                           ("z", z, u.shape), ("initial_state", initial_state, (Bsz, Dch, N)),
                           ("segment_ids", segment_ids, (Bsz, T))):
        if x is not None and x.shape != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}; got {x.shape}")


def _reference_core(u, delta, A, B, C, keep, h0, state_norm=None):
    """Grouped layout: u, delta `[B, T, G, E]`, A `[G, E, N]`, B, C `[B, T, G, N]`, keep
    `[B, T]`, h0 `[B, G, E, N]`. Returns `C_t h_t` `[B, T, G, E]` and the last state.
    `state_norm`: after each update, each channel's state `[N]` is scaled down to that
    L2 norm where it is larger."""

    def step(h, xs):
        u_t, dt_t, B_t, C_t, keep_t = xs
        a = jnp.exp(dt_t[..., None] * A) * keep_t[:, None, None, None]
        h = a * h + (dt_t * u_t)[..., None] * B_t[:, :, None, :]
        if state_norm is not None:
            h = clip_state_norm(h, state_norm)
        return h, jnp.einsum("bgen,bgn->bge", h, C_t)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (u, delta, B, C, keep))
    h_last, y = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(y, 0, 1), h_last


def _decays(dt, A_T, keep):
    """`a_k = exp(dt_k A)` for a chunk, `[K, BG, N, E]`; 0 across a document border."""
    return jnp.exp(dt[..., None, :] * A_T) * keep[..., None, None]


def _inputs(B, dtu):
    """`b_k = B_k (dt_k u_k)^T`, the state update of each token, `[..., BG, N, E]`."""
    return B[..., None] * dtu[..., None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _chunked(u, dt, A_T, B, C, keep, h0, K):
    """The scan in chunks of K tokens, time-major: u, dt `[T, BG, E]`, B, C `[T, BG, N]`,
    keep `[T, BG]`, A_T, h0 `[BG, N, E]` (BG = batch x groups). Returns `y [T, BG, E]` and
    `h_T`. The forward pass runs token by token and saves the state entering each chunk;
    the backward pass recomputes one chunk's states at a time from it (as the Pallas
    kernels do), so memory is `T / K` states plus one chunk's `[K, BG, N, E]` work."""
    return _chunked_fwd(u, dt, A_T, B, C, keep, h0, K)[0]


def _split(x, K):
    return x.reshape((-1, K) + x.shape[1:])


def _chunked_fwd(u, dt, A_T, B, C, keep, h0, K):
    def token(h, x):
        u, dt, B, C, keep = x
        h = _decays(dt, A_T, keep) * h + _inputs(B, dt * u)
        return h, jnp.einsum("gn,gne->ge", C, h)

    def chunk(h, xs):
        h_end, y = jax.lax.scan(token, h, xs)
        return h_end, (y, h)

    h_last, (y, starts) = jax.lax.scan(chunk, h0, tuple(_split(x, K) for x in (u, dt, B, C, keep)))
    return (y.reshape(u.shape), h_last), (u, dt, A_T, B, C, keep, starts)


def _chunked_bwd(K, residuals, cotangents):
    """Per chunk, last to first: the decays at once, the states `h_{k-1}` before each token
    recomputed token by token from the saved one, then the state gradients
    `g_k = dL/dh_k = C_k dy_k + a_{k+1} g_{k+1}` token by token backwards, accumulating
    `dL/d(dt_k A) = a_k g_k h_{k-1}` into dA and (summed over N) into ddt on the way; the
    gradients of B, C and dt u are contractions of the chunk's g and states. (Each piece
    was placed, in a loop or as one chunk-wide op, by timing on CPU: XLA runs a
    `[K, BG, N, E]` sum over N as a slow reduction but a contraction as a fast matmul.)"""
    u, dt, A_T, B, C, keep, starts = residuals
    dy, dh_last = cotangents

    def chunk(carry, xs):
        g_after, dA = carry  # dL/dh at the chunk's end from later chunks; dL/dA_T so far
        start, u, dt, B, C, keep, dy = xs
        a, dtu = _decays(dt, A_T, keep), dt * u
        h_end, previous = jax.lax.scan(lambda h, x: (x[0] * h + _inputs(x[1], x[2]), h),
                                       start, (a, B, dtu))

        def token(carry, x):
            g_next, dA = carry  # a_{k+1} g_{k+1}
            a_k, C_k, dy_k, previous_k, dt_k = x
            g = C_k[..., None] * dy_k[..., None, :] + g_next
            g_next = a_k * g
            d_log_a = g_next * previous_k
            return ((g_next, dA + d_log_a * dt_k[..., None, :]),
                    (g, axis_sum(d_log_a * A_T, -2)))

        (g_start, dA), (g, ddt_decay) = jax.lax.scan(token, (g_after, dA),
                                                     (a, C, dy, previous, dt), reverse=True)
        d_dtu = jnp.einsum("kgne,kgn->kge", g, B)
        dB = jnp.einsum("kgne,kge->kgn", g, dtu)
        # dC_k = h_k . dy_k with h_k = previous_{k+1}, and the chunk's last state
        dC = jnp.concatenate([jnp.einsum("kgne,kge->kgn", previous[1:], dy[:-1]),
                              jnp.einsum("gne,ge->gn", h_end, dy[-1])[None]])
        return (g_start, dA), (d_dtu * dt, d_dtu * u + ddt_decay, dB, dC)

    xs = (starts,) + tuple(_split(x, K) for x in (u, dt, B, C, keep, dy))
    (dh0, dA), grads = jax.lax.scan(chunk, (dh_last, jnp.zeros_like(A_T)), xs, reverse=True)
    du, ddt, dB, dC = (x.reshape((-1,) + x.shape[2:]) for x in grads)
    return du, ddt, dA, dB, dC, jnp.zeros_like(keep), dh0


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _xla_core(u, delta, A, B, C, keep, h0, chunk_size):
    """`_chunked` on the grouped layout (T padded to a multiple of `chunk_size`, which is cut
    to T for shorter inputs such as decode steps)."""
    Bsz, T, G, E = u.shape
    chunk_size = min(chunk_size, T)
    pad = -T % chunk_size
    # padded steps have delta = 0 and keep = 1: the identity, so the last state is unchanged
    time_major = lambda x, value=0.0: jnp.moveaxis(
        jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value), 1, 0)
    rows = lambda x: time_major(x).reshape((T + pad, Bsz * G, x.shape[-1]))
    keep = jnp.repeat(time_major(keep, 1.0), G, axis=1)  # [T, BG], column b * G + g
    A_T = jnp.tile(jnp.swapaxes(A, 1, 2), (Bsz, 1, 1))  # [BG, N, E]
    h0 = jnp.swapaxes(h0, 2, 3).reshape((Bsz * G,) + A_T.shape[1:])
    y, h_last = _chunked(rows(u), rows(delta), A_T, rows(B), rows(C), keep, h0, chunk_size)
    y = jnp.moveaxis(y[:T].reshape(T, Bsz, G, E), 0, 1)
    return y, jnp.swapaxes(h_last.reshape((Bsz, G) + h_last.shape[1:]), 2, 3)


def selective_scan_core(u, delta, A, B, C, *, keep, h0, impl, chunk_size=None):
    """The scan alone, in fp32 and the grouped layout of `_reference_core`: returns
    `(C_t h_t [B, T, G, E], h_T [B, G, E, N])`. `keep [B, T]` zeroes the state's decay."""
    if impl == "reference":
        return _reference_core(u, delta, A, B, C, keep, h0)
    if impl == "xla":
        return _xla_core(u, delta, A, B, C, keep, h0, chunk_size or 32)
    from pallas_kernels.selective_scan import selective_scan_pallas

    return selective_scan_pallas(u, delta, A, B, C, keep, h0, interpret=impl == "pallas_interpret",
                                 chunk_size=chunk_size)


def prepare(u, delta, A, B, C, delta_bias, delta_softplus, initial_state):
    """fp32 inputs in the grouped layout (G = 1 for `[B, T, N]` B and C)."""
    Bsz, T, Dch = u.shape
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    G, N = B.shape[2], A.shape[1]
    f32 = lambda x: x.astype(jnp.float32)
    delta = f32(delta)
    if delta_bias is not None:
        delta = delta + f32(delta_bias)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    grouped = lambda x: f32(x).reshape(Bsz, T, G, Dch // G)
    h0 = (jnp.zeros((Bsz, Dch, N), jnp.float32) if initial_state is None
          else f32(initial_state))
    return (grouped(u), grouped(delta), f32(A).reshape(G, Dch // G, N), f32(B), f32(C),
            h0.reshape(Bsz, G, Dch // G, N))


def finish(y, u, D, z):
    """`(y + D u) * silu(z)` in fp32, cast to u's dtype; y `[B, T, D]` fp32."""
    u32 = u.astype(jnp.float32)
    if D is not None:
        y = y + D.astype(jnp.float32) * u32
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(u.dtype)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, *, segment_ids=None,
                   impl="auto", chunk_size=None, state_norm=None):
    """The selective scan of Mamba (see the module docstring).

    Args:
      u, delta: `[B, T, D]` inputs and step sizes.
      A: `[D, N]` state matrix (diagonal per channel; negative real in Mamba).
      B, C: `[B, T, N]`, or `[B, T, G, N]` with the D channels split into G groups.
      D: `[D]` skip connection; z: `[B, T, D]` gate; delta_bias: `[D]`.
      delta_softplus: apply softplus to `delta + delta_bias`.
      initial_state: `[B, D, N]` state before token 0 (default zeros).
      return_final_state: also return the fp32 state `[B, D, N]` after the last token.
      segment_ids: `[B, T]` document ids; the state resets at every border.
      impl: "reference", "xla", "pallas", "pallas_interpret" or "auto" (resolved per
        lowering platform by `longjax.ops.impl`).
      chunk_size: tokens per saved state in "xla" (default 32) and the Pallas kernels.
      state_norm: a number > 0, or None. After each update every channel's state `[N]`
        whose L2 norm exceeds it is scaled down to it (Stuffed Mamba's state
        normalization, Chen et al. 2024): no longer a linear recurrence, so it runs
        token by token (the reference scan) whatever `impl`.

    Returns:
      y `[B, T, D]` in u's dtype, and the final state when asked.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids, impl)
    check_state_norm("selective_scan", state_norm)
    Bsz, T, Dch = u.shape
    u_g, dt_g, A_g, B_g, C_g, h0 = prepare(u, delta, A, B, C, delta_bias, delta_softplus,
                                           initial_state)
    keep = (jnp.ones((Bsz, T), jnp.float32) if segment_ids is None
            else segment_keep(segment_ids))
    if state_norm is not None:
        y, h_last = _reference_core(u_g, dt_g, A_g, B_g, C_g, keep, h0, float(state_norm))
    else:
        y, h_last = impl_lib.run("selective_scan", impl, lambda name: selective_scan_core(
            u_g, dt_g, A_g, B_g, C_g, keep=keep, h0=h0, impl=name, chunk_size=chunk_size))
    y = finish(y.reshape(Bsz, T, Dch), u, D, z)
    return (y, h_last.reshape(Bsz, Dch, -1)) if return_final_state else y
