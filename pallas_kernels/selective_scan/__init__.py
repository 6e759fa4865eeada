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
    `[Bt, G, E, N]`, fp32. `backend` ("gpu" or "tpu") defaults to the default backend's
    kernel (the GPU one off TPU); `interpret=True` runs it in the Pallas interpreter.
    `chunk_size` (tokens between saved states) defaults to 16 on GPU, 128 on TPU.
    """
    backend = backend or ("tpu" if jax.default_backend() == "tpu" else "gpu")
    if backend not in _KERNELS:
        raise ValueError(f"selective_scan_pallas: backend must be 'gpu' or 'tpu'; got {backend!r}")
    Bt, T, G, E = u.shape
    N = A.shape[-1]
    K = chunk_size or (16 if backend == "gpu" else 128)
    if backend == "gpu":  # Triton blocks are powers of two
        block_e = min(64, pl_next_power_of_2(E))
        N_pad = pl_next_power_of_2(N)
    else:  # TPU lanes: a multiple of 128 or the whole (small) channel axis
        block_e = E if E <= 128 else 128
        N_pad = N
    BG = Bt * G
    seq = lambda x: x.transpose(0, 2, 1, 3).reshape(BG, T, x.shape[-1])
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


def pl_next_power_of_2(n):
    return 1 << max(0, (n - 1).bit_length())
