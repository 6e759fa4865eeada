"""Selective scan kernels for TPU (Mosaic) in Pallas.

Grid `(batch * groups, channel blocks, time chunks)`, the time axis innermost and
sequential ("arbitrary"): each step holds a `[K, E]` tile of `u`, `delta` in VMEM and the
`[N, E]` fp32 state in a VMEM scratch carried across time chunks. `B`, `C` and `keep` come
transposed and stacked as one lane-major `[2N + 1, K]` tile; token l's column is taken by a
masked lane reduction (no dynamic lane indexing). The forward pass writes the state at each
chunk start (`[nC, N, E]` checkpoints); the backward pass visits chunks in reverse,
recomputes the chunk's `K + 1` states into a VMEM scratch and runs the backward steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.selective_scan import step

DEFAULT_CHUNK = 128


def refusal(N, chunk_size):
    """Why the compiled kernel cannot serve chunks of `chunk_size` tokens, or None."""
    if chunk_size % 128:
        return (f"selective scan TPU kernel: chunk_size must be a multiple of 128 (the "
                f"[2N + 1, chunk] B/C tile is lane-major); got {chunk_size}")
    return None


def blocks(E, N, chunk_size):
    """`(K, block_e, N_pad)`: 128 channels per block (or all, up to 128), N padded to 8
    sublanes."""
    return chunk_size, E if E <= 128 else 128, -(-N // 8) * 8


def _column(tile, l):
    """Column l `[R, 1]` of a `[R, K]` tile."""
    lanes = jax.lax.broadcasted_iota(jnp.int32, tile.shape, 1)
    return jnp.sum(jnp.where(lanes == l, tile, 0.0), axis=1, keepdims=True)


def _token(u_ref, dt_ref, bck_ref, l, N):
    col = _column(bck_ref[...], l)
    return (u_ref[pl.ds(l, 1), :], dt_ref[pl.ds(l, 1), :], col[:N], col[N:2 * N],
            col[2 * N:2 * N + 1])


def _forward_kernel(u_ref, dt_ref, A_ref, bck_ref, h0_ref, y_ref, hT_ref, ck_ref, h_scr,
                    *, K, N):
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        h_scr[...] = h0_ref[...]

    ck_ref[...] = h_scr[...]
    A_T = A_ref[...]

    def body(l, h):
        u, dt, B, C, keep = _token(u_ref, dt_ref, bck_ref, l, N)
        h, y = step.forward(h, u, dt, A_T, B, C, keep)
        y_ref[pl.ds(l, 1), :] = y
        return h

    h_scr[...] = jax.lax.fori_loop(0, K, body, h_scr[...])

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        hT_ref[...] = h_scr[...]


def _backward_kernel(u_ref, dt_ref, A_ref, bck_ref, ck_ref, dy_ref, dhT_ref,
                     du_ref, ddt_ref, dA_ref, dbc_ref, dh0_ref,
                     g_scr, dA_scr, hs_scr, dbc_scr, *, K, N):
    i = pl.program_id(2)
    A_T = A_ref[...]

    @pl.when(i == 0)
    def _():
        g_scr[...] = dhT_ref[...]
        dA_scr[...] = jnp.zeros_like(dA_scr)

    hs_scr[0] = ck_ref[...]

    def recompute(l, h):
        u, dt, B, C, keep = _token(u_ref, dt_ref, bck_ref, l, N)
        h = step.forward(h, u, dt, A_T, B, C, keep)[0]
        hs_scr[l + 1] = h
        return h

    jax.lax.fori_loop(0, K, recompute, hs_scr[0])
    lanes = jax.lax.broadcasted_iota(jnp.int32, dbc_scr.shape, 1)

    def body(j, carry):
        g, dA = carry
        l = K - 1 - j
        u, dt, B, C, keep = _token(u_ref, dt_ref, bck_ref, l, N)
        g, du, ddt, dB, dC, dA_t = step.backward(
            g, hs_scr[l], hs_scr[l + 1], u, dt, A_T, B, C, keep, dy_ref[pl.ds(l, 1), :])
        du_ref[pl.ds(l, 1), :] = du
        ddt_ref[pl.ds(l, 1), :] = ddt
        dbc_scr[...] = jnp.where(lanes == l, jnp.concatenate([dB, dC], axis=0), dbc_scr[...])
        return g, dA + dA_t

    g, dA = jax.lax.fori_loop(0, K, body, (g_scr[...], dA_scr[...]))
    g_scr[...] = g
    dA_scr[...] = dA
    dbc_ref[...] = dbc_scr[...]

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = g
        dA_ref[...] = dA


def _stack_bck(B, C, keep):
    """`[BG, T, N]` B, C and `[BG, T]` keep -> one lane-major `[BG, 2N + 1, T]`."""
    return jnp.concatenate([jnp.swapaxes(B, 1, 2), jnp.swapaxes(C, 1, 2), keep[:, None]], 1)


def _params(interpret):
    return dict(
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
    )


def forward(u, dt, A_T, B, C, keep, h0, *, K, block_e, interpret):
    """Same contract as `pallas_kernels.selective_scan.gpu.forward`."""
    BG, T, D = u.shape
    N, G, nC = A_T.shape[1], A_T.shape[0], T // K
    f32 = jnp.float32
    seq = pl.BlockSpec((None, K, block_e), lambda b, e, c: (b, c, e))
    state = pl.BlockSpec((None, N, block_e), lambda b, e, c: (b, 0, e))
    return pl.pallas_call(
        functools.partial(_forward_kernel, K=K, N=N),
        grid=(BG, D // block_e, nC),
        in_specs=[seq, seq, pl.BlockSpec((None, N, block_e), lambda b, e, c: (b % G, 0, e)),
                  pl.BlockSpec((None, 2 * N + 1, K), lambda b, e, c: (b, 0, c)), state],
        out_specs=[seq, state,
                   pl.BlockSpec((None, None, N, block_e), lambda b, e, c: (b, c, 0, e))],
        out_shape=[jax.ShapeDtypeStruct((BG, T, D), f32), jax.ShapeDtypeStruct((BG, N, D), f32),
                   jax.ShapeDtypeStruct((BG, nC, N, D), f32)],
        scratch_shapes=[pltpu.VMEM((N, block_e), f32)],
        name="selective_scan_fwd",
        **_params(interpret),
    )(u, dt, A_T, _stack_bck(B, C, keep), h0)


def backward(u, dt, A_T, B, C, keep, checkpoints, dy, dhT, *, K, block_e, interpret):
    """Same contract as `pallas_kernels.selective_scan.gpu.backward`."""
    BG, T, D = u.shape
    N, G, nC, nE = A_T.shape[1], A_T.shape[0], T // K, D // block_e
    f32 = jnp.float32
    rev = lambda c: nC - 1 - c
    seq = pl.BlockSpec((None, K, block_e), lambda b, e, c: (b, rev(c), e))
    state = pl.BlockSpec((None, N, block_e), lambda b, e, c: (b, 0, e))
    du, ddt, dA, dbc_partial, dh0 = pl.pallas_call(
        functools.partial(_backward_kernel, K=K, N=N),
        grid=(BG, nE, nC),
        in_specs=[seq, seq, pl.BlockSpec((None, N, block_e), lambda b, e, c: (b % G, 0, e)),
                  pl.BlockSpec((None, 2 * N + 1, K), lambda b, e, c: (b, 0, rev(c))),
                  pl.BlockSpec((None, None, N, block_e), lambda b, e, c: (b, rev(c), 0, e)),
                  seq, state],
        out_specs=[seq, seq, state,
                   pl.BlockSpec((None, None, 2 * N, K), lambda b, e, c: (b, e, 0, rev(c))),
                   state],
        out_shape=[jax.ShapeDtypeStruct((BG, T, D), f32), jax.ShapeDtypeStruct((BG, T, D), f32),
                   jax.ShapeDtypeStruct((BG, N, D), f32),
                   jax.ShapeDtypeStruct((BG, nE, 2 * N, T), f32),
                   jax.ShapeDtypeStruct((BG, N, D), f32)],
        scratch_shapes=[pltpu.VMEM((N, block_e), f32), pltpu.VMEM((N, block_e), f32),
                        pltpu.VMEM((K + 1, N, block_e), f32), pltpu.VMEM((2 * N, K), f32)],
        name="selective_scan_bwd",
        **_params(interpret),
    )(u, dt, A_T, _stack_bck(B, C, keep), checkpoints, dy, dhT)
    dB = jnp.swapaxes(dbc_partial[:, :, :N], 2, 3)
    dC = jnp.swapaxes(dbc_partial[:, :, N:], 2, 3)
    return du, ddt, dA, dB, dC, dh0
