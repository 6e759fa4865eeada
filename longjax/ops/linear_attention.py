"""Linear attention, retention, GLA, DeltaNet, Gated DeltaNet and Based.

Every op is one recurrence on a matrix state `S` `[B, H, Dk, Dv]` (fp32):

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T q_t

with `a_t = exp(g_t)` (`g <= 0` per token and head, or per key dimension for GLA, 0 when
ungated) and the delta term only for the delta rules (else `S_t = a_t S_{t-1} + k_t v_t^T`):
linear attention (Katharopoulos et al. 2020), retention (Sun et al. 2023, RetNet), GLA
(Yang et al. 2024, gated linear attention), DeltaNet (Schlag et al. 2021; Yang et al. 2024,
"Parallelizing linear transformers with the delta rule"), Gated DeltaNet (Yang, Kautz &
Hatamizadeh 2024) and Based (Arora et al. 2024: a 2nd-order Taylor feature map).

Layout: q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, outputs `[B, T, H, Dv]` in q's dtype.
`scale=None` means `Dk ** -0.5`, applied to q. `segment_ids` `[B, T]` reset the state at
every token whose id differs from the previous token's. `initial_state` `[B, H, Dk, Dv]`
continues the first segment; `return_final_state=True` also returns the fp32 state.

Implementations (`impl=`): `"reference"` is the token-by-token recurrence (the oracle);
`"xla"` is chunked: within a chunk of C tokens the outputs are dense matmuls, and each
chunk is summarised as an affine map of its incoming state, `S -> A S + B` (A diagonal,
or a `[Dk, Dk]` matrix for the delta rules, built with the WY / UT representation of
Yang et al. 2024), so only `T / C` sequential steps remain. `"auto"` is resolved per
lowering platform by `longjax.ops.impl`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from longjax.ops import impl as impl_lib
from longjax.ops.cpu_rewrites import cumsum, decayed_scores, unit_lower_solve

IMPLS = ("auto", "reference", "xla")
FEATURE_MAPS = ("identity", "elu+1", "relu", "taylor")
_NORMALIZER_EPS = 1e-6


class ChunkMaps(NamedTuple):
    """Per-chunk summaries, leading axes `[B, N]` (N chunks of C tokens).

    `intra` `[B, N, C, H, Dv]`: outputs from a zero incoming state; `readout`
    `[B, N, C, H, Dk]`: outputs are `intra + readout @ S_in`; `A` `[B, N, H, Dk]`
    (diagonal) or `[B, N, H, Dk, Dk]`, `B` `[B, N, H, Dk, Dv]`: `S_out = A S_in + B`.
    """

    intra: jax.Array
    readout: jax.Array
    A: jax.Array
    B: jax.Array


def apply_transition(A, S):
    """`A S` for a diagonal `A` `[..., Dk]` or a matrix `A` `[..., Dk, Dk]`; S `[..., Dk, Dv]`."""
    if A.ndim == S.ndim - 1:
        return A[..., None] * S
    return jnp.einsum("...ij,...jv->...iv", A, S)


def resets_from_segments(segment_ids, batch, length):
    """`[B, T]` bool: True where the state restarts (the segment id changes)."""
    if segment_ids is None:
        return jnp.zeros((batch, length), bool)
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return segment_ids != prev


# ----------------------------------------------------------------------------- reference


def _recurrent(q, k, v, g, beta, resets, state):
    """The token-by-token recurrence; fp32 inputs, state `[B, H, Dk, Dv]`."""
    log_a = jnp.zeros(k.shape, jnp.float32) if g is None else jnp.broadcast_to(
        g if g.ndim == 4 else g[..., None], k.shape)
    a = jnp.where(resets[:, :, None, None], 0.0, jnp.exp(log_a))
    delta = beta is not None
    beta = jnp.ones(k.shape[:3], jnp.float32) if beta is None else beta

    def step(S, xs):
        q_t, k_t, v_t, a_t, b_t = xs
        S = a_t[..., None] * S
        if delta:
            v_t = v_t - jnp.einsum("bhkv,bhk->bhv", S, k_t)
        S = S + b_t[..., None, None] * k_t[..., None] * v_t[..., None, :]
        return S, jnp.einsum("bhkv,bhk->bhv", S, q_t)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, a, beta))
    state, o = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(o, 0, 1), state


# ----------------------------------------------------------------------------- chunked


def chunk_maps(q, k, v, g, beta, resets, delta) -> ChunkMaps:
    """Summarises chunks of fp32 `q, k [B, N, C, H, Dk]`, `v [B, N, C, H, Dv]`.

    `g` `[B, N, C, H]` or `[B, N, C, H, Dk]` (or None), `beta` `[B, N, C, H]` (used when
    `delta`), `resets` `[B, N, C]`. Tokens after a reset see neither the incoming state nor
    earlier tokens of the chunk.
    """
    C = q.shape[2]
    doc = jnp.cumsum(resets.astype(jnp.int32), axis=2)  # document index within the chunk
    first = doc == 0
    last = doc == doc[:, :, -1:]
    carry = doc[:, :, -1] == 0
    same = doc[:, :, :, None] == doc[:, :, None, :]
    causal = jnp.tril(jnp.ones((C, C), bool))
    if g is None:
        g = jnp.zeros(q.shape[:4], jnp.float32)
    b = cumsum(g, axis=2)  # log decay from the chunk start, inclusive
    per_dim = g.ndim == 5
    bc = b[:, :, -1:]

    def mask(x, m, extra):  # broadcast a [B, N, C(, C)] mask over trailing head axes
        return jnp.where(m.reshape(m.shape + (1,) * extra), x, -jnp.inf)

    extra = 2 if per_dim else 1
    e = jnp.exp(mask(b, first, extra))  # decay from the chunk start to token i
    f = jnp.exp(mask(bc - b, last, extra))  # decay from token j to the chunk end
    A = jnp.exp(mask(bc[:, :, 0], carry, extra))  # [B, N, H(, Dk)]
    if per_dim:
        heads_first = lambda x: jnp.moveaxis(x, 3, 2)  # [B, N, H, C, Dk]
        scores = gla_scores(heads_first(q), heads_first(k), heads_first(b),
                            (causal & same)[:, :, None])
        readout = q * e
        kf = k * f
    else:
        diff = b[:, :, :, None] - b[:, :, None, :]  # [B, N, C, C, H]
        decay = jnp.moveaxis(jnp.exp(mask(diff, causal & same, 1)), -1, 2)  # [B, N, H, C, C]
        scores = jnp.einsum("bnihd,bnjhd->bnhij", q, k) * decay
        readout = q * e[..., None]
        kf = k * f[..., None]
        A = A[..., None] * jnp.ones(q.shape[-1], jnp.float32)
    if not delta:
        intra = jnp.einsum("bnhij,bnjhv->bnihv", scores, v)
        return ChunkMaps(intra, readout, A, jnp.einsum("bnchk,bnchv->bnhkv", kf, v))
    # UT transform: (I + tril(diag(beta) (Gamma * K K^T), -1)) [U | W] = diag(beta) [V | e K].
    strict = jnp.tril(jnp.ones((C, C), bool), -1)
    beta_h = jnp.moveaxis(beta, -1, 2)[..., None]  # [B, N, H, C, 1]
    kk = jnp.einsum("bnihd,bnjhd->bnhij", k, k) * jnp.where(strict, decay, 0.0)
    ke = jnp.moveaxis(k * e[..., None], 3, 2)
    rhs = beta_h * jnp.concatenate([jnp.moveaxis(v, 3, 2), ke], -1)
    uw = unit_lower_solve(beta_h * kk, rhs)
    u, w = uw[..., : v.shape[-1]], uw[..., v.shape[-1]:]  # [B, N, H, C, Dv / Dk]
    intra = jnp.einsum("bnhij,bnhjv->bnihv", scores, u)
    readout = readout - jnp.moveaxis(jnp.einsum("bnhij,bnhjd->bnhid", scores, w), 2, 3)
    A = A[..., None] * jnp.eye(q.shape[-1]) - jnp.einsum("bnjhk,bnhjd->bnhkd", kf, w)
    return ChunkMaps(intra, readout, A, jnp.einsum("bnjhk,bnhjv->bnhkv", kf, u))


def gla_scores(q, k, b, visible):
    """GLA's intra-chunk scores `S_ij = sum_d q_id k_jd exp(b_id - b_jd)` for `visible`
    pairs, else 0; q, k, b `[..., C, Dk]`, visible `[..., C, C]` bool.

    Secondary-level chunking (Yang et al. 2024, sec. 4.2), applied recursively: split a
    block in halves and let r be the last token of the first half. For i in the second
    half and j in the first the decay factors through r,

        exp(b_i - b_j) = exp(b_i - b_r) exp(b_r - b_j),   both exponents <= 0,

    so that quarter of the block is one stable matmul of `q_i exp(b_i - b_r)` against
    `k_j exp(b_r - b_j)`, and the halves recurse (all blocks of a level at once). Only
    blocks of odd length (single tokens when C is a power of 2) go to `decayed_scores`.
    """
    scores = _block_scores(q[..., None, :, :], k[..., None, :, :], b[..., None, :, :])
    return jnp.where(visible, scores[..., 0, :, :], 0.0)


def _block_scores(q, k, b):
    """Causal scores `[..., m, s, s]` of m blocks: q, k, b `[..., m, s, Dk]`."""
    m, s, d = q.shape[-3:]
    if s % 2:
        return decayed_scores(q, k, b, jnp.tril(jnp.ones((s, s), bool)))
    h = s // 2
    halves = lambda x: x.reshape(x.shape[:-3] + (2 * m, h, d))
    inner = _block_scores(halves(q), halves(k), halves(b))
    inner = inner.reshape(inner.shape[:-3] + (m, 2, h, h))
    r = b[..., h - 1:h, :]
    off = jnp.einsum("...id,...jd->...ij", q[..., h:, :] * jnp.exp(b[..., h:, :] - r),
                     k[..., :h, :] * jnp.exp(r - b[..., :h, :]))
    top = jnp.concatenate([inner[..., 0, :, :], jnp.zeros_like(off)], -1)
    return jnp.concatenate([top, jnp.concatenate([off, inner[..., 1, :, :]], -1)], -2)


def chunk_states(A, B, state):
    """States entering each chunk `[B, N, H, Dk, Dv]` and the final state, from `state`."""

    def step(S, ab):
        return apply_transition(ab[0], S) + ab[1], S

    final, states = jax.lax.scan(step, state, (jnp.moveaxis(A, 1, 0), jnp.moveaxis(B, 1, 0)))
    return jnp.moveaxis(states, 0, 1), final


def chunk_outputs(maps: ChunkMaps, states):
    """Outputs `[B, N, C, H, Dv]` of the chunks given their incoming states."""
    return maps.intra + jnp.einsum("bnchk,bnhkv->bnchv", maps.readout, states)


def to_chunks(q, k, v, g, beta, resets, chunk_size):
    """Pads T to a multiple of C = min(chunk_size, T) with inert tokens and splits it."""
    T = q.shape[1]
    C = min(chunk_size, T)
    pad = -T % C

    def split(x):
        if x is None:
            return None
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(x.shape[0], -1, C, *x.shape[2:])

    return tuple(split(x) for x in (q, k, v, g, beta, resets))


def finish_chunks(maps: ChunkMaps, state, length):
    """Outputs `[B, length, H, Dv]` and the final state, from the state entering chunk 0."""
    states, state = chunk_states(maps.A, maps.B, state)
    o = chunk_outputs(maps, states)
    return o.reshape(o.shape[0], -1, *o.shape[3:])[:, :length], state


def _chunked(q, k, v, g, beta, resets, state, chunk_size, delta):
    maps = chunk_maps(*to_chunks(q, k, v, g, beta, resets, chunk_size), delta=delta)
    return finish_chunks(maps, state, q.shape[1])


# ----------------------------------------------------------------------------- public ops


def _check(q, k, v, *, g=None, g_ndim=3, beta=None, segment_ids=None, initial_state=None,
           impl="auto", chunk_size=64):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q and k must have equal shapes and v the same [batch, seq, heads]; "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    B, T, H, Dk = q.shape
    if g is not None and g.shape != (B, T, H, Dk)[:g_ndim]:
        raise ValueError(f"g must have shape {(B, T, H, Dk)[:g_ndim]}; got {g.shape}")
    if beta is not None and beta.shape != (B, T, H):
        raise ValueError(f"beta must have shape {(B, T, H)}; got {beta.shape}")
    if segment_ids is not None and segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids must have shape {(B, T)}; got {segment_ids.shape}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, v.shape[3]):
        raise ValueError(f"initial_state must have shape {(B, H, Dk, v.shape[3])}; "
                         f"got {initial_state.shape}")
    if not callable(impl) and impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or a callable; got {impl!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")


def recurrence(q, k, v, *, g=None, beta=None, segment_ids=None, initial_state=None,
               return_final_state=False, impl="auto", chunk_size=64):
    """The general recurrence of the module doc on already scaled / feature-mapped q, k.

    `g` `[B, T, H]` or `[B, T, H, Dk]` log decays (None: no decay); `beta` `[B, T, H]`
    turns on the delta rule. The ops below are thin wrappers over this. `impl` may also be
    a callable `(q, k, v, g, beta, segment_ids, state, chunk_size) -> (o, final_state)` on
    fp32 arrays (`longjax.parallel.sequence_linear` passes its sharded form this way).
    """
    _check(q, k, v, g=g, g_ndim=None if g is None else g.ndim, beta=beta,
           segment_ids=segment_ids, initial_state=initial_state, impl=impl,
           chunk_size=chunk_size)
    B, T, H, Dk = q.shape
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    state = (jnp.zeros((B, H, Dk, v.shape[3]), jnp.float32) if initial_state is None
             else f32(initial_state))
    q32, k32, v32, g32, beta32 = (f32(x) for x in (q, k, v, g, beta))
    resets = resets_from_segments(segment_ids, B, T)

    def run(name):
        if name == "reference":
            return _recurrent(q32, k32, v32, g32, beta32, resets, state)
        return _chunked(q32, k32, v32, g32, beta32, resets, state, chunk_size=chunk_size,
                        delta=beta is not None)

    if callable(impl):
        o, state = impl(q32, k32, v32, g32, beta32, segment_ids, state, chunk_size)
    else:
        o, state = impl_lib.run("linear_attention", impl, run)
    o = o.astype(q.dtype)
    return (o, state) if return_final_state else o


def _scaled(q, scale):
    return q * (q.shape[-1] ** -0.5 if scale is None else scale)


def taylor_feature_map(x, scale):
    """Based's feature map `[1, sqrt(s) x, s x (x) x / sqrt(2)]`, so that
    `phi(q) . phi(k) = 1 + s q.k + (s q.k)^2 / 2` (Arora et al. 2024). Dk -> 1 + Dk + Dk^2.
    """
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], -1)
    ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
    return jnp.concatenate([ones, math.sqrt(scale) * x, scale / math.sqrt(2) * outer], -1)


def linear_attention(q, k, v, *, feature_map="identity", normalize=False, scale=None,
                     segment_ids=None, initial_state=None, return_final_state=False,
                     impl="auto", chunk_size=64):
    """`o_t = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s` (Katharopoulos et al. 2020).

    `feature_map` is one of `FEATURE_MAPS`; q is scaled after the map (for `"taylor"`
    the scale goes inside it, see `taylor_feature_map`). `normalize=True` divides by
    `phi(q_t) . sum_{s<=t} phi(k_s)`; the state then carries that sum as an extra last
    value column: `[B, H, F, Dv + 1]` with F the feature dimension.
    """
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}; got {feature_map!r}")
    if feature_map == "taylor":
        s = q.shape[-1] ** -0.5 if scale is None else scale
        q, k = taylor_feature_map(q, s), taylor_feature_map(k, s)
    else:
        phi = {"identity": lambda x: x, "elu+1": lambda x: jax.nn.elu(x) + 1,
               "relu": jax.nn.relu}[feature_map]
        q, k = _scaled(phi(q), scale), phi(k)
    if normalize:
        v = jnp.concatenate([v, jnp.ones(v.shape[:3] + (1,), v.dtype)], axis=-1)
    o, state = recurrence(q, k, v, segment_ids=segment_ids, initial_state=initial_state,
                          return_final_state=True, impl=impl, chunk_size=chunk_size)
    if normalize:
        o32 = o.astype(jnp.float32)
        o = (o32[..., :-1] / (o32[..., -1:] + _NORMALIZER_EPS)).astype(q.dtype)
    return (o, state) if return_final_state else o


def based(q, k, v, *, scale=None, segment_ids=None, initial_state=None,
          return_final_state=False, impl="auto", chunk_size=64):
    """Based's linear attention (Arora et al. 2024): the Taylor feature map, normalised.

    q, k `[B, T, H, F]` with a small F (16 in the paper); the state is
    `[B, H, 1 + F + F^2, Dv + 1]` (see `linear_attention`).
    """
    return linear_attention(q, k, v, feature_map="taylor", normalize=True, scale=scale,
                            segment_ids=segment_ids, initial_state=initial_state,
                            return_final_state=return_final_state, impl=impl,
                            chunk_size=chunk_size)


def retention_log_decays(num_heads):
    """RetNet's per-head decays `log(1 - 2^(-5 - h))`, h = 0 .. num_heads - 1 (Sun et al. 2023)."""
    return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(num_heads, dtype=jnp.float32))))


def retention(q, k, v, *, log_decay=None, scale=None, segment_ids=None, initial_state=None,
              return_final_state=False, impl="auto", chunk_size=64):
    """Retention (Sun et al. 2023): `S_t = gamma_h S_{t-1} + k_t v_t^T`, `o_t = S_t^T q_t`.

    `log_decay` `[H]` is `log gamma_h <= 0`, default `retention_log_decays(H)`.
    """
    B, T, H, _ = q.shape
    log_decay = retention_log_decays(H) if log_decay is None else log_decay
    if jnp.shape(log_decay) != (H,):
        raise ValueError(f"log_decay must have shape {(H,)}; got {jnp.shape(log_decay)}")
    g = jnp.broadcast_to(jnp.asarray(log_decay, jnp.float32), (B, T, H))
    return recurrence(_scaled(q, scale), k, v, g=g, segment_ids=segment_ids,
                      initial_state=initial_state, return_final_state=return_final_state,
                      impl=impl, chunk_size=chunk_size)


def gla(q, k, v, g, *, scale=None, segment_ids=None, initial_state=None,
        return_final_state=False, impl="auto", chunk_size=64):
    """Gated linear attention (Yang et al. 2024): `S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`.

    `g` `[B, T, H, Dk]` log decays per key dimension. The chunked form computes a chunk's
    scores by recursive secondary-level chunking (`gla_scores`): matmuls, and no `[C, C,
    Dk]` decays when C is a power of 2 (chunk sizes measured in benchmarks/RESULTS.md).
    """
    _check(q, k, v, g=g, g_ndim=4)
    return recurrence(_scaled(q, scale), k, v, g=g, segment_ids=segment_ids,
                      initial_state=initial_state, return_final_state=return_final_state,
                      impl=impl, chunk_size=chunk_size)


def delta_rule(q, k, v, beta, *, scale=None, segment_ids=None, initial_state=None,
               return_final_state=False, impl="auto", chunk_size=64):
    """DeltaNet: `S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T` (Schlag et al.
    2021), chunked with the WY representation (Yang et al. 2024). `beta` `[B, T, H]` in
    (0, 1); k is usually L2-normalised by the caller.
    """
    return recurrence(_scaled(q, scale), k, v, beta=beta, segment_ids=segment_ids,
                      initial_state=initial_state, return_final_state=return_final_state,
                      impl=impl, chunk_size=chunk_size)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, segment_ids=None, initial_state=None,
                     return_final_state=False, impl="auto", chunk_size=64):
    """Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024):
    `S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`, `g` `[B, T, H]`.
    """
    _check(q, k, v, g=g, g_ndim=3)
    return recurrence(_scaled(q, scale), k, v, g=g, beta=beta, segment_ids=segment_ids,
                      initial_state=initial_state, return_final_state=return_final_state,
                      impl=impl, chunk_size=chunk_size)
