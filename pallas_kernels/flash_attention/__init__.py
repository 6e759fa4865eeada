"""Flash-attention Pallas kernels for GPU (Triton) and TPU (Mosaic), forward and backward.

`forward(spec, q, k, v, side) -> (out, lse)` and `backward(spec, q, k, v, side, out, lse,
dout) -> (dq, dk, dv, dslopes)` take a validated call (`longjax.ops.attention.make_spec`:
q `[B, T, H, D]`, k / v `[B, S, K, D]`, lse `[B, H, T]` fp32) and pad to whole blocks
inside. `backend` ("gpu" or "tpu") picks the kernel; by default it follows the platform
the code is lowered for (`pallas_kernels.platform.by_platform`). `interpret=True` runs it
through the Pallas interpreter on any backend.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.flash_attention import common, gpu, tpu
from pallas_kernels.platform import by_platform


def _setup(spec, q, k, v, side, backend, block_q, block_k):
    """The kernel module, the spec with its scale set, the tiling and padded arrays. A head
    dim the kernel cannot tile (`module.head_dim`) is zero-padded, which leaves q.k and the
    output's first D columns unchanged (the scale stays D^-0.5); a dtype it cannot load is
    cast (`module.compute_dtype`)."""
    module = tpu if backend == "tpu" else gpu
    q, k, v = (x.astype(module.compute_dtype(x.dtype)) for x in (q, k, v))
    D = q.shape[3]
    spec = dataclasses.replace(spec, scale=spec.softmax_scale(D))
    pad_d = module.head_dim(D) - D
    if pad_d:
        q, k, v = (jnp.pad(x, ((0, 0),) * 3 + ((0, pad_d),)) for x in (q, k, v))
    T, S = q.shape[1], k.shape[1]
    block_q = block_q or module.default_block(T, "q")
    block_k = block_k or module.default_block(S, "k")
    tiling, arrays = common.prepare(spec, q, k, v, side, block_q=block_q, block_k=block_k)
    return module, spec, tiling, arrays


def forward(spec, q, k, v, side, *, interpret=False, backend=None, block_q=None,
            block_k=None):
    """Attention output `[B, T, H, D]` and lse `[B, H, T]` fp32 (-inf for empty rows)."""

    def kernel(backend, q, k, v, side):
        module, st, tiling, arrays = _setup(spec, q, k, v, side, backend, block_q, block_k)
        out, lse = module.forward(st, tiling, arrays, interpret)
        return out[:, : tiling.T, :, : q.shape[3]].astype(q.dtype), lse[:, :, : tiling.T]

    return by_platform(kernel, q, k, v, side, backend=backend, interpret=interpret)


def backward(spec, q, k, v, side, out, lse, dout, *, dlse=None, interpret=False, backend=None,
             block_q=None, block_k=None):
    """`(dq, dk, dv, dslopes)` from the FlashAttention-2 backward (Dao 2023).

    `dslopes` `[H]` is the ALiBi slope gradient (None without `alibi_slopes`); `dlse` is
    the cotangent of `lse`, if any.
    """
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def kernel(backend, q, k, v, side, lse, delta, dout):
        module, st, tiling, arrays = _setup(spec, q, k, v, side, backend, block_q, block_k)
        D, Dp = q.shape[3], arrays["q"].shape[3]
        pad_t = ((0, 0), (0, 0), (0, tiling.Tp - tiling.T))
        do = jnp.pad(dout, ((0, 0), (0, tiling.Tp - tiling.T), (0, 0), (0, Dp - D)))
        do = do.astype(module.compute_dtype(do.dtype))
        dq, dk, dv, dslope = module.backward(st, tiling, arrays, do, jnp.pad(lse, pad_t),
                                             jnp.pad(delta, pad_t), interpret)
        if dslope is not None:
            dslope = dslope.sum((0, 2))
        return (dq[:, : tiling.T, :, :D].astype(q.dtype),
                dk[:, : tiling.S, :, :D].astype(k.dtype),
                dv[:, : tiling.S, :, :D].astype(v.dtype), dslope)

    return by_platform(kernel, q, k, v, side, lse, delta, dout, backend=backend,
                       interpret=interpret)
