"""Mamba's selective scan (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces", Algorithm 2 with zero-order-hold `A` and Euler `B`):

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   y_t = C_t h_t + D u_t,
    y_t <- y_t * silu(z_t)  when z is given,

per channel d and state index n, with `delta <- softplus(delta + delta_bias)` optionally.
Implementations: `"reference"` (sequential `lax.scan`, fp32 state), `"xla"` (a scan over
chunks with a parallel scan inside each chunk, rematerialised in the backward pass, so no
`[B, T, D, N]` tensor for the whole sequence exists), `"pallas"` / `"pallas_interpret"`
(`pallas_kernels.selective_scan`, GPU and TPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longjax.ops.scan import segment_keep

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


def _reference_core(u, delta, A, B, C, keep, h0):
    """Grouped layout: u, delta `[B, T, G, E]`, A `[G, E, N]`, B, C `[B, T, G, N]`, keep
    `[B, T]`, h0 `[B, G, E, N]`. Returns `C_t h_t` `[B, T, G, E]` and the last state."""

    def step(h, xs):
        u_t, dt_t, B_t, C_t, keep_t = xs
        a = jnp.exp(dt_t[..., None] * A) * keep_t[:, None, None, None]
        h = a * h + (dt_t * u_t)[..., None] * B_t[:, :, None, :]
        return h, jnp.einsum("bgen,bgn->bge", h, C_t)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (u, delta, B, C, keep))
    h_last, y = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(y, 0, 1), h_last


def _chunk(u, delta, A, B, C, keep, h0):
    """One chunk by a parallel prefix scan over its tokens; same layout as the reference."""
    a = jnp.exp(delta[..., None] * A) * keep[:, :, None, None, None]
    b = (delta * u)[..., None] * B[:, :, :, None, :]
    a_cum, b_cum = jax.lax.associative_scan(
        lambda l, r: (l[0] * r[0], r[0] * l[1] + r[1]), (a, b), axis=1)
    h = a_cum * h0[:, None] + b_cum
    return jnp.einsum("btgen,btgn->btge", h, C), h[:, -1]


def _xla_core(u, delta, A, B, C, keep, h0, chunk_size):
    Bsz, T = u.shape[:2]
    pad = -T % chunk_size
    # padded steps have delta = 0 and keep = 1: the identity, so the last state is unchanged
    padded = [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (u, delta, B, C)]
    keep = jnp.pad(keep, [(0, 0), (0, pad)], constant_values=1.0)
    chunks = lambda x: jnp.moveaxis(x.reshape((Bsz, -1, chunk_size) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def step(h, xs):
        u_c, dt_c, B_c, C_c, keep_c = xs
        y_c, h = _chunk(u_c, dt_c, A, B_c, C_c, keep_c, h)
        return h, y_c

    h_last, y = jax.lax.scan(step, h0, tuple(chunks(x) for x in padded + [keep]))
    y = jnp.moveaxis(y, 0, 1).reshape((Bsz, T + pad) + y.shape[3:])
    return y[:, :T], h_last


def selective_scan_core(u, delta, A, B, C, *, keep, h0, impl, chunk_size=None):
    """The scan alone, in fp32 and the grouped layout of `_reference_core`: returns
    `(C_t h_t [B, T, G, E], h_T [B, G, E, N])`. `keep [B, T]` zeroes the state's decay."""
    if impl == "reference":
        return _reference_core(u, delta, A, B, C, keep, h0)
    if impl == "xla":
        return _xla_core(u, delta, A, B, C, keep, h0, chunk_size or 64)
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
                   impl="auto", chunk_size=None):
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
      impl: "reference", "xla", "pallas", "pallas_interpret" or "auto" (= "xla": the Pallas
        kernels are opt-in until timed on hardware).
      chunk_size: chunk length of "xla" (default 64) and the Pallas kernels.

    Returns:
      y `[B, T, D]` in u's dtype, and the final state when asked.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids, impl)
    impl = "xla" if impl == "auto" else impl
    Bsz, T, Dch = u.shape
    u_g, dt_g, A_g, B_g, C_g, h0 = prepare(u, delta, A, B, C, delta_bias, delta_softplus,
                                           initial_state)
    keep = (jnp.ones((Bsz, T), jnp.float32) if segment_ids is None
            else segment_keep(segment_ids))
    y, h_last = selective_scan_core(u_g, dt_g, A_g, B_g, C_g, keep=keep, h0=h0, impl=impl,
                                    chunk_size=chunk_size)
    y = finish(y.reshape(Bsz, T, Dch), u, D, z)
    return (y, h_last.reshape(Bsz, Dch, -1)) if return_final_state else y
