"""Mamba-2's state space duality (Dao & Gu 2024, "Transformers are SSMs", Sections 6-7):

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,   y_t = h_t C_t + D x_t,

per head h with a scalar decay `A[h] < 0`; x `[B, T, H, P]`, B, C `[B, T, G, N]` shared by
H / G heads, state `[B, H, P, N]`. `"reference"` runs the recurrence token by token;
`"xla"` is the chunked algorithm of the paper: inside each chunk of L tokens the quadratic
(attention-like) form with the 1-semiseparable mask `exp(segsum(dt A))`, across chunks a
scan of the chunk states. Segment sums are differences of in-chunk cumulative sums, masked
before the exponential, so nothing overflows. Document borders (`segment_ids`) cut the mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longjax.ops import impl as impl_lib
from longjax.ops.cpu_rewrites import broadcast_axis
from longjax.ops.scan import check_state_norm, clip_state_norm, linear_scan, segment_keep

IMPLS = ("reference", "xla")


def _check(x, dt, A, B, C, D, initial_state, segment_ids, impl, chunk_size):
    if impl not in IMPLS + ("auto",):
        raise ValueError(f"ssd: impl must be one of {IMPLS + ('auto',)}; got {impl!r}")
    if x.ndim != 4:
        raise ValueError(f"ssd: x must be [B, T, H, P]; got {x.shape}")
    Bsz, T, H, P = x.shape
    if dt.shape != (Bsz, T, H):
        raise ValueError(f"ssd: dt must be [B, T, H] = {(Bsz, T, H)}; got {dt.shape}")
    if A.shape != (H,):
        raise ValueError(f"ssd: A must be [H] = ({H},); got {A.shape}")
    if B.ndim != 4 or B.shape[:2] != (Bsz, T) or B.shape != C.shape or H % B.shape[2]:
        raise ValueError(f"ssd: B and C must both be [B, T, G, N] with B, T = {Bsz}, {T} and G "
                         f"dividing H = {H}; got B {B.shape}, C {C.shape}")
    N = B.shape[3]
    for name, v, shape in (("D", D, (H,)), ("initial_state", initial_state, (Bsz, H, P, N)),
                           ("segment_ids", segment_ids, (Bsz, T))):
        if v is not None and v.shape != shape:
            raise ValueError(f"ssd: {name} must have shape {shape}; got {v.shape}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be a positive int; got {chunk_size!r}")


def _heads(v, H):
    """`[..., G, N]` -> `[..., H, N]` (each group shared by H / G consecutive heads)."""
    return jnp.repeat(v, H // v.shape[-2], axis=-2)


def _reference(x, dt, A, B, C, keep, h0, state_norm=None):
    """Token by token; `state_norm`: after each update every channel's state `[N]` (one
    `(head, p)` row) is scaled down to that L2 norm where it is larger."""
    H = x.shape[2]

    def step(h, xs):
        x_t, dt_t, B_t, C_t, keep_t = xs
        decay = jnp.exp(dt_t * A) * keep_t[:, None]
        h = decay[..., None, None] * h + jnp.einsum("bhp,bhn->bhpn", dt_t[..., None] * x_t, B_t)
        if state_norm is not None:
            h = clip_state_norm(h, state_norm)
        return h, jnp.einsum("bhpn,bhn->bhp", h, C_t)

    xs = (x, dt, _heads(B, H), _heads(C, H), keep)
    h_last, y = jax.lax.scan(step, h0, tuple(jnp.moveaxis(v, 1, 0) for v in xs))
    return jnp.moveaxis(y, 0, 1), h_last


def _connected(keep):
    """Document index of each token within its block, and that of the state entering it."""
    resets = jnp.cumsum(1.0 - keep, axis=-1)
    return resets, resets[..., :1] - (1.0 - keep[..., :1])


def initial_state_output(dt, A, C, h0, keep):
    """`y_t` of the recurrence driven by the initial state alone (x = 0), `[B, T, H, P]`:
    `exp(sum_{s<=t} dt_s A) (C_t . h0)` until the first document border, 0 after it."""
    resets, doc_in = _connected(jnp.moveaxis(keep, 1, -1))
    alive = jnp.moveaxis(resets == doc_in, -1, 1)[..., None]
    decay = jnp.exp(jnp.cumsum(dt * A, axis=1)) * alive
    return decay[..., None] * jnp.einsum("bthn,bhpn->bthp", _heads(C, h0.shape[1]), h0)


def _chunked(x, dt, A, B, C, keep, h0, L):
    """The chunked form, head-major inside each chunk (`[B, c, G, R, L, ...]`, with the H
    heads split as G groups of R = H / G that share one group's B and C): the `C_t . B_s`
    scores are computed once per group, and every contraction has its batch axes leading."""
    Bsz, T, H, P = x.shape
    G, N = B.shape[2:]
    R = H // G
    pad = -T % L
    pad_t = lambda v, value=0.0: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2),
                                         constant_values=value)
    nc = (T + pad) // L
    # [B, T, ...] -> [B, c, <head axes>, L, <rest>]
    chunks = lambda v, heads: jnp.moveaxis(
        pad_t(v).reshape((Bsz, nc, L) + heads + v.shape[3:]), 2, 2 + len(heads))
    x_c = chunks(x, (G, R))  # [B, c, G, R, L, P]
    dt_c = chunks(dt[..., None], (G, R))[..., 0]  # [B, c, G, R, L]
    B_c, C_c = chunks(B, (G,)), chunks(C, (G,))  # [B, c, G, L, N]
    keep_c = pad_t(keep, 1.0).reshape(Bsz, nc, L)  # padded tokens: dt = 0, no input, no reset
    cum = jnp.cumsum(dt_c * A.reshape(G, R, 1), axis=-1)
    docs, doc_in = _connected(keep_c)  # [B, c, L], [B, c, 1]
    docs, doc_in = docs[:, :, None, None], doc_in[:, :, None, None]  # broadcast over heads
    # intra-chunk: y_t = sum_{s<=t, same doc} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s
    causal = jnp.tril(jnp.ones((L, L), bool))
    same = (docs[..., :, None] == docs[..., None, :]) & causal  # [B, c, 1, 1, t, s]
    mask = jnp.exp(jnp.where(same, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    # each group's C_t . B_s scores, for its R heads
    scores = broadcast_axis(jnp.einsum("bcgtn,bcgsn->bcgts", C_c, B_c), 3, R) * mask
    y = jnp.einsum("bcgrts,bcgrsp->bcgrtp", scores, dt_c[..., None] * x_c)
    # each chunk's final state from a zero start, and its decay over the whole chunk
    to_end = jnp.exp(cum[..., -1:] - cum) * (docs == docs[..., -1:])
    states = jnp.einsum("bcgrl,bcgrlp,bcgln->bcgrpn", to_end * dt_c, x_c, B_c)
    whole = jnp.exp(cum[..., -1]) * (docs[..., -1] == doc_in[..., 0])
    after, h_last = linear_scan(whole[..., None, None], states,
                                initial_state=h0.reshape(Bsz, G, R, P, N),
                                return_final_state=True, impl="reference")
    entering = jnp.concatenate([h0.reshape(Bsz, 1, G, R, P, N), after[:, :-1]], axis=1)
    decayed_in = (jnp.exp(cum) * (docs == doc_in))[..., None]
    y = y + decayed_in * jnp.einsum("bcgln,bcgrpn->bcgrlp", C_c, entering)
    y = jnp.moveaxis(y, 4, 2).reshape(Bsz, nc * L, H, P)
    return y[:, :T], h_last.reshape(Bsz, H, P, N)


def ssd(x, dt, A, B, C, *, chunk_size=64, D=None, initial_state=None, return_final_state=False,
        segment_ids=None, impl="auto", state_norm=None):
    """Mamba-2 SSD (see the module docstring).

    Args:
      x: `[B, T, H, P]` inputs; dt: `[B, T, H]` step sizes (already positive);
      A: `[H]` decay rates (negative); B, C: `[B, T, G, N]`; D: `[H]` skip connection.
      chunk_size: chunk length of "xla".
      initial_state: `[B, H, P, N]` (default zeros); return_final_state: also return the
        fp32 state after the last token.
      segment_ids: `[B, T]` document ids; the state resets at every border.
      impl: "reference", "xla" or "auto" (resolved per lowering platform by
        `longjax.ops.impl`).
      state_norm: a number > 0, or None. After each update every channel's state `[N]`
        (one row `h[b, h, p]`) whose L2 norm exceeds it is scaled down to it (Stuffed
        Mamba's state normalization, Chen et al. 2024, as in `selective_scan`): no longer
        a linear recurrence, so it runs token by token (the reference) whatever `impl`.

    Returns:
      y `[B, T, H, P]` in x's dtype, and the final state when asked.
    """
    _check(x, dt, A, B, C, D, initial_state, segment_ids, impl, chunk_size)
    check_state_norm("ssd", state_norm)
    Bsz, T, H, P = x.shape
    f32 = lambda v: v.astype(jnp.float32)
    keep = jnp.ones((Bsz, T), jnp.float32) if segment_ids is None else segment_keep(segment_ids)
    h0 = (jnp.zeros((Bsz, H, P, B.shape[3]), jnp.float32) if initial_state is None
          else f32(initial_state))
    args = (f32(x), f32(dt), f32(A), f32(B), f32(C), keep, h0)
    if state_norm is not None:
        y, h_last = _reference(*args, float(state_norm))
    else:
        y, h_last = impl_lib.run("ssd", impl, lambda name: (
            _reference(*args) if name == "reference" else _chunked(*args, chunk_size)))
    if D is not None:
        y = y + f32(D)[:, None] * f32(x)
    y = y.astype(x.dtype)
    return (y, h_last) if return_final_state else y
