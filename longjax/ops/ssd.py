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

from longjax.ops.scan import linear_scan, segment_keep

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


def _reference(x, dt, A, B, C, keep, h0):
    H = x.shape[2]

    def step(h, xs):
        x_t, dt_t, B_t, C_t, keep_t = xs
        decay = jnp.exp(dt_t * A) * keep_t[:, None]
        h = decay[..., None, None] * h + jnp.einsum("bhp,bhn->bhpn", dt_t[..., None] * x_t, B_t)
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
    Bsz, T, H, P = x.shape
    pad = -T % L
    pad_t = lambda v, value=0.0: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2),
                                         constant_values=value)
    nc = (T + pad) // L
    chunks = lambda v: v.reshape((Bsz, nc, L) + v.shape[2:])
    x_c, dt_c, B_c, C_c = (chunks(pad_t(v)) for v in (x, dt, _heads(B, H), _heads(C, H)))
    keep_c = chunks(pad_t(keep, 1.0))  # padded tokens: dt = 0, no input, no reset
    cum = jnp.cumsum(dt_c * A, axis=2)  # [B, c, L, H]
    docs, doc_in = _connected(keep_c)  # [B, c, L], [B, c, 1]
    # intra-chunk: y_t = sum_{s<=t, same doc} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s
    causal = jnp.tril(jnp.ones((L, L), bool))
    same = (docs[..., :, None] == docs[..., None, :]) & causal  # [B, c, t, s]
    segsum = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # [B, c, t, s, H]
    mask = jnp.exp(jnp.where(same[..., None], segsum, -jnp.inf))
    scores = jnp.einsum("bcthn,bcshn->bctsh", C_c, B_c) * mask
    y = jnp.einsum("bctsh,bcshp->bcthp", scores, dt_c[..., None] * x_c)
    # each chunk's final state from a zero start, and its decay over the whole chunk
    to_end = jnp.exp(cum[:, :, -1:] - cum) * (docs == docs[:, :, -1:])[..., None]
    states = jnp.einsum("bclh,bclhp,bclhn->bchpn", to_end * dt_c, x_c, B_c)
    whole = jnp.exp(cum[:, :, -1]) * (docs[:, :, -1] == doc_in[:, :, 0])[..., None]
    after, h_last = linear_scan(whole[..., None, None], states, initial_state=h0,
                                return_final_state=True, impl="reference")
    entering = jnp.concatenate([h0[:, None], after[:, :-1]], axis=1)  # [B, c, H, P, N]
    alive = (docs == doc_in)[..., None]
    y = y + (jnp.exp(cum) * alive)[..., None] * jnp.einsum("bclhn,bchpn->bclhp", C_c, entering)
    return y.reshape(Bsz, nc * L, H, P)[:, :T], h_last


def ssd(x, dt, A, B, C, *, chunk_size=64, D=None, initial_state=None, return_final_state=False,
        segment_ids=None, impl="auto"):
    """Mamba-2 SSD (see the module docstring).

    Args:
      x: `[B, T, H, P]` inputs; dt: `[B, T, H]` step sizes (already positive);
      A: `[H]` decay rates (negative); B, C: `[B, T, G, N]`; D: `[H]` skip connection.
      chunk_size: chunk length of "xla".
      initial_state: `[B, H, P, N]` (default zeros); return_final_state: also return the
        fp32 state after the last token.
      segment_ids: `[B, T]` document ids; the state resets at every border.
      impl: "reference", "xla" or "auto" (= "xla").

    Returns:
      y `[B, T, H, P]` in x's dtype, and the final state when asked.
    """
    _check(x, dt, A, B, C, D, initial_state, segment_ids, impl, chunk_size)
    Bsz, T, H, P = x.shape
    f32 = lambda v: v.astype(jnp.float32)
    keep = jnp.ones((Bsz, T), jnp.float32) if segment_ids is None else segment_keep(segment_ids)
    h0 = (jnp.zeros((Bsz, H, P, B.shape[3]), jnp.float32) if initial_state is None
          else f32(initial_state))
    args = (f32(x), f32(dt), f32(A), f32(B), f32(C), keep, h0)
    if impl == "reference":
        y, h_last = _reference(*args)
    else:
        y, h_last = _chunked(*args, chunk_size)
    if D is not None:
        y = y + f32(D)[:, None] * f32(x)
    y = y.astype(x.dtype)
    return (y, h_last) if return_final_state else y
