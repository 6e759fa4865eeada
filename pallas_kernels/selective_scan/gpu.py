"""Selective scan kernels for GPUs in Pallas, lowered through Triton (its
`CompilerParams` name the backend; without them JAX 0.10 picks Mosaic GPU, which would
stage each program's whole `[T, E]` blocks in shared memory and refuses them).

Grid `(batch * groups, channel blocks)`; each program walks the whole sequence, keeping its
`[N, E]` state in fp32 registers. The forward pass saves the state at the start of every
chunk of `K` tokens (`[nC, N, E]` per program: a `1/K` fraction of the `[T, N, E]` states,
the rest is never stored). The backward pass walks the chunks in reverse: it recomputes the
chunk's `K + 1` states from its checkpoint (unrolled, in registers), then runs the `K`
backward steps. Refs live in global memory; each token is one row load per input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.selective_scan import step

DEFAULT_CHUNK = 16
MAX_CHUNK = 32  # the backward keeps chunk + 1 states in registers
MAX_STATE = 128
_STATE_BUDGET = 1024  # fp32 elements of one [N, E] state per program (8 per thread at 4 warps)
_PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=1)


def refusal(N, chunk_size):
    """Why the compiled kernel cannot serve state size N with chunks of `chunk_size`
    tokens, or None."""
    if not 1 <= chunk_size <= MAX_CHUNK:
        return (f"selective scan GPU kernel: chunk_size must be in 1..{MAX_CHUNK} (the "
                f"backward keeps chunk_size + 1 states in registers); got {chunk_size}")
    if N > MAX_STATE:
        return (f"selective scan GPU kernel: state size N must be at most {MAX_STATE} (the "
                f"state lives in registers); got {N}")
    return None


def blocks(E, N, chunk_size):
    """`(K, block_e, N_pad)` for E channels and state size N: Triton tiles are powers of
    two, and a program's state `[N_pad, block_e]` stays within `_STATE_BUDGET` (16 channels
    at least)."""
    N_pad = pl.next_power_of_2(N)
    return chunk_size, min(pl.next_power_of_2(E), max(16, _STATE_BUDGET // N_pad)), N_pad


def _inputs(u_ref, dt_ref, B_ref, C_ref, keep_ref, t):
    """Token t's `u, dt [1, E]`, `B, C [N, 1]`, `keep` scalar."""
    return (u_ref[t, :][None, :], dt_ref[t, :][None, :], B_ref[t, :][:, None],
            C_ref[t, :][:, None], keep_ref[t])


def _forward_kernel(u_ref, dt_ref, A_ref, B_ref, C_ref, keep_ref, h0_ref,
                    y_ref, hT_ref, ck_ref, *, K, num_chunks):
    A_T = A_ref[...]

    def chunk(c, h):
        ck_ref[c] = h
        for l in range(K):
            t = c * K + l
            u, dt, B, C, keep = _inputs(u_ref, dt_ref, B_ref, C_ref, keep_ref, t)
            h, y = step.forward(h, u, dt, A_T, B, C, keep)
            y_ref[t, :] = y[0]
        return h

    hT_ref[...] = jax.lax.fori_loop(0, num_chunks, chunk, h0_ref[...])


def _backward_kernel(u_ref, dt_ref, A_ref, B_ref, C_ref, keep_ref, ck_ref, dy_ref, dhT_ref,
                     du_ref, ddt_ref, dA_ref, dB_ref, dC_ref, dh0_ref, *, K, num_chunks):
    A_T = A_ref[...]

    def chunk(i, carry):
        g, dA = carry
        c = num_chunks - 1 - i
        states, tokens = [ck_ref[c]], []
        for l in range(K):
            tokens.append(_inputs(u_ref, dt_ref, B_ref, C_ref, keep_ref, c * K + l))
            u, dt, B, C, keep = tokens[-1]
            states.append(step.forward(states[-1], u, dt, A_T, B, C, keep)[0])
        for l in reversed(range(K)):
            t = c * K + l
            u, dt, B, C, keep = tokens[l]
            g, du, ddt, dB, dC, dA_t = step.backward(
                g, states[l], states[l + 1], u, dt, A_T, B, C, keep, dy_ref[t, :][None, :])
            du_ref[t, :] = du[0]
            ddt_ref[t, :] = ddt[0]
            dB_ref[t, :] = dB[:, 0]
            dC_ref[t, :] = dC[:, 0]
            dA = dA + dA_t
        return g, dA

    g, dA = jax.lax.fori_loop(0, num_chunks, chunk, (dhT_ref[...], jnp.zeros_like(A_T)))
    dh0_ref[...] = g
    dA_ref[...] = dA


def _specs(T, N, E, G):
    """BlockSpecs for grid (b, e) over u, dt `[BG, T, D]`, A_T `[G, N, D]`, B, C `[BG, T, N]`,
    keep `[BG, T]`, states `[BG, N, D]`."""
    seq = pl.BlockSpec((None, T, E), lambda b, e: (b, 0, e))
    return dict(
        seq=seq,
        A=pl.BlockSpec((None, N, E), lambda b, e: (b % G, 0, e)),
        BC=pl.BlockSpec((None, T, N), lambda b, e: (b, 0, 0)),
        keep=pl.BlockSpec((None, T), lambda b, e: (b, 0)),
        state=pl.BlockSpec((None, N, E), lambda b, e: (b, 0, e)),
    )


def forward(u, dt, A_T, B, C, keep, h0, *, K, block_e, interpret):
    """u, dt `[BG, T, D]` (T divisible by K), A_T `[G, N, D]`, B, C `[BG, T, N]`, keep
    `[BG, T]`, h0 `[BG, N, D]` fp32 -> y `[BG, T, D]`, hT `[BG, N, D]`,
    checkpoints `[BG, T / K, N, D]`."""
    BG, T, D = u.shape
    N, G, nC = A_T.shape[1], A_T.shape[0], T // K
    s = _specs(T, N, block_e, G)
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_forward_kernel, K=K, num_chunks=nC),
        grid=(BG, D // block_e),
        in_specs=[s["seq"], s["seq"], s["A"], s["BC"], s["BC"], s["keep"], s["state"]],
        out_specs=[s["seq"], s["state"],
                   pl.BlockSpec((None, nC, N, block_e), lambda b, e: (b, 0, 0, e))],
        out_shape=[jax.ShapeDtypeStruct((BG, T, D), f32), jax.ShapeDtypeStruct((BG, N, D), f32),
                   jax.ShapeDtypeStruct((BG, nC, N, D), f32)],
        interpret=interpret,
        compiler_params=_PARAMS,
        name="selective_scan_fwd",
    )(u, dt, A_T, B, C, keep, h0)


def backward(u, dt, A_T, B, C, keep, checkpoints, dy, dhT, *, K, block_e, interpret):
    """Gradients `du, ddt [BG, T, D]`, `dA_T [BG, N, D]` (per sequence), `dB, dC
    [BG, D / block_e, T, N]` (per channel block), `dh0 [BG, N, D]`."""
    BG, T, D = u.shape
    N, G, nC, nE = A_T.shape[1], A_T.shape[0], T // K, D // block_e
    s = _specs(T, N, block_e, G)
    f32 = jnp.float32
    partial_BC = pl.BlockSpec((None, None, T, N), lambda b, e: (b, e, 0, 0))
    return pl.pallas_call(
        functools.partial(_backward_kernel, K=K, num_chunks=nC),
        grid=(BG, nE),
        in_specs=[s["seq"], s["seq"], s["A"], s["BC"], s["BC"], s["keep"],
                  pl.BlockSpec((None, nC, N, block_e), lambda b, e: (b, 0, 0, e)),
                  s["seq"], s["state"]],
        out_specs=[s["seq"], s["seq"], s["state"], partial_BC, partial_BC, s["state"]],
        out_shape=[jax.ShapeDtypeStruct((BG, T, D), f32), jax.ShapeDtypeStruct((BG, T, D), f32),
                   jax.ShapeDtypeStruct((BG, N, D), f32),
                   jax.ShapeDtypeStruct((BG, nE, T, N), f32),
                   jax.ShapeDtypeStruct((BG, nE, T, N), f32),
                   jax.ShapeDtypeStruct((BG, N, D), f32)],
        interpret=interpret,
        compiler_params=_PARAMS,
        name="selective_scan_bwd",
    )(u, dt, A_T, B, C, keep, checkpoints, dy, dhT)
