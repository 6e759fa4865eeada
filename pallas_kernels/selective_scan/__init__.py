"""Pallas kernels for Mamba's selective scan (Gu & Dao 2023), forward and backward.

`selective_scan_pallas` is the differentiable entry point used by
`longjax.ops.selective_scan` (`impl="pallas"` / `"pallas_interpret"`). The GPU kernel
(`gpu.py`, Triton style) and the TPU kernel (`tpu.py`, Mosaic) share the per-token math of
`step.py`; both keep the state in fp32 on chip, save it only every `chunk_size` tokens, and
recompute the states inside a chunk in the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.platform import by_platform
from pallas_kernels.selective_scan import gpu, tpu

_KERNELS = {"gpu": gpu, "tpu": tpu}


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _scan(u, dt, A_T, B, C, keep, h0, config):
    y, hT, _ = _forward(u, dt, A_T, B, C, keep, h0, config)
    return y, hT


def _forward(u, dt, A_T, B, C, keep, h0, config):
    backend, K, block_e, interpret = config
    return _KERNELS[backend].forward(u, dt, A_T, B, C, keep, h0, K=K, block_e=block_e,
                                     interpret=interpret)


def _scan_fwd(u, dt, A_T, B, C, keep, h0, config):
    y, hT, checkpoints = _forward(u, dt, A_T, B, C, keep, h0, config)
    return (y, hT), (u, dt, A_T, B, C, keep, checkpoints)


def _scan_bwd(config, residuals, cotangents):
    backend, K, block_e, interpret = config
    u, dt, A_T, B, C, keep, checkpoints = residuals
    dy, dhT = cotangents
    du, ddt, dA_T, dB, dC, dh0 = _KERNELS[backend].backward(
        u, dt, A_T, B, C, keep, checkpoints, dy, dhT, K=K, block_e=block_e,
        interpret=interpret)
    G = A_T.shape[0]
    dA_T = dA_T.reshape((-1, G) + A_T.shape[1:]).sum(0)
    return du, ddt, dA_T, dB.sum(1), dC.sum(1), jnp.zeros_like(keep), dh0


_scan.defvjp(_scan_fwd, _scan_bwd)


def _pad(x, axis, multiple, value=0.0):
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def selective_scan_pallas(u, delta, A, B, C, keep, h0, *, interpret=False, chunk_size=None,
                          backend=None):
    """The scan `h_t = keep_t exp(delta_t A) h_{t-1} + delta_t u_t B_t`, `y_t = C_t . h_t`.

    Grouped fp32 layout: u, delta `[Bt, T, G, E]`, A `[G, E, N]`, B, C `[Bt, T, G, N]`,
    keep `[Bt, T]`, h0 `[Bt, G, E, N]`. Returns `y [Bt, T, G, E]` and the final state
    `[Bt, G, E, N]`, fp32. `backend` ("gpu" or "tpu") defaults to the kernel of the
    platform lowered for (`pallas_kernels.platform.by_platform`); `interpret=True` runs it
    in the Pallas interpreter. `chunk_size` (tokens between saved states) defaults to the
    kernel's `DEFAULT_CHUNK`; a compiled kernel refuses calls past its limits (each
    kernel's `refusal`) with a ValueError.
    """
    def kernel(backend, u, delta, A, B, C, keep, h0):
        return _padded_scan(backend, u, delta, A, B, C, keep, h0, chunk_size, interpret)

    def refusal(backend):
        module = _KERNELS[backend]
        return None if interpret else module.refusal(
            A.shape[-1], chunk_size or module.DEFAULT_CHUNK)

    return by_platform(kernel, u, delta, A, B, C, keep, h0, backend=backend,
                       interpret=interpret, refusal=refusal)


def _padded_scan(backend, u, delta, A, B, C, keep, h0, chunk_size, interpret):
    """The scan through `backend`'s kernel, its inputs padded to the kernel's blocks."""
    module = _KERNELS[backend]
    Bt, T, G, E = u.shape
    N = A.shape[-1]
    K, block_e, N_pad = module.blocks(E, N, chunk_size or module.DEFAULT_CHUNK)
    BG = Bt * G
    seq = lambda x: x.transpose(0, 2, 1, 3).reshape(BG, T, x.shape[-1])  # noqa: E731
    u_k = _pad(_pad(seq(u), 1, K), 2, block_e)
    dt_k = _pad(_pad(seq(delta), 1, K), 2, block_e)
    B_k = _pad(_pad(seq(B), 1, K), 2, N_pad)
    C_k = _pad(_pad(seq(C), 1, K), 2, N_pad)
    keep_k = _pad(jnp.repeat(keep, G, axis=0), 1, K, 1.0)
    A_T = _pad(_pad(A.transpose(0, 2, 1), 1, N_pad), 2, block_e)
    h0_k = _pad(_pad(h0.reshape(BG, E, N).transpose(0, 2, 1), 1, N_pad), 2, block_e)
    y, hT = _scan(u_k, dt_k, A_T, B_k, C_k, keep_k, h0_k, (backend, K, block_e, interpret))
    y = y[:, :T, :E].reshape(Bt, G, T, E).transpose(0, 2, 1, 3)
    hT = hT[:, :N, :E].transpose(0, 2, 1).reshape(Bt, G, E, N)
    return y, hT
