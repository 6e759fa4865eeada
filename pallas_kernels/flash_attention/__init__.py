"""Flash-attention Pallas kernels for GPU (Triton) and TPU (Mosaic), forward and backward.

`forward(q, k, v, ...) -> (out, lse)` and `backward(q, k, v, out, lse, dout, ...) ->
(dq, dk, dv, dslopes)` take the arguments of `longjax.ops.attention.attention_forward`
(q `[B, T, H, D]`, k / v `[B, S, K, D]`, lse `[B, H, T]` fp32) and pad to whole blocks
inside. `backend` ("gpu" or "tpu") picks the kernel; by default it follows the platform
the code is lowered for (`pallas_kernels.platform.by_platform`). `interpret=True` runs it
through the Pallas interpreter on any backend.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.flash_attention import common, gpu, tpu
from pallas_kernels.platform import by_platform


def _setup(q, k, v, backend, block_q, block_k, kw):
    """The kernel module, its static config and padded arrays. A head dim the kernel
    cannot tile (`module.head_dim`) is zero-padded, which leaves q.k and the output's
    first D columns unchanged (the scale stays D^-0.5)."""
    module = tpu if backend == "tpu" else gpu
    D = q.shape[3]
    pad_d = module.head_dim(D) - D
    if pad_d:
        q, k, v = (jnp.pad(x, ((0, 0),) * 3 + ((0, pad_d),)) for x in (q, k, v))
        kw = {**kw, "scale": D**-0.5 if kw.get("scale") is None else kw["scale"]}
    T, S = q.shape[1], k.shape[1]
    block_q = block_q or module.default_block(T, "q")
    block_k = block_k or module.default_block(S, "k")
    st, arrays = common.prepare(q, k, v, block_q=block_q, block_k=block_k, **kw)
    return module, st, arrays


def forward(q, k, v, *, interpret=False, backend=None, block_q=None, block_k=None, **kw):
    """Attention output `[B, T, H, D]` and lse `[B, H, T]` fp32 (-inf for empty rows)."""

    def kernel(backend, q, k, v):
        module, st, arrays = _setup(q, k, v, backend, block_q, block_k, kw)
        out, lse = module.forward(st, arrays, interpret)
        return out[:, : st.T, :, : q.shape[3]], lse[:, :, : st.T]

    return by_platform(kernel, q, k, v, backend=backend, interpret=interpret)


def backward(q, k, v, out, lse, dout, *, dlse=None, interpret=False, backend=None,
             block_q=None, block_k=None, **kw):
    """`(dq, dk, dv, dslopes)` from the FlashAttention-2 backward (Dao 2023).

    `dslopes` `[H]` is the ALiBi slope gradient (None without `alibi_slopes`); `dlse` is
    the cotangent of `lse`, if any.
    """
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def kernel(backend, q, k, v, lse, delta, dout):
        module, st, arrays = _setup(q, k, v, backend, block_q, block_k, kw)
        D = q.shape[3]
        pad_t = ((0, 0), (0, 0), (0, st.Tp - st.T))
        do = jnp.pad(dout, ((0, 0), (0, st.Tp - st.T), (0, 0), (0, st.D - D)))
        dq, dk, dv, dslope = module.backward(st, arrays, do, jnp.pad(lse, pad_t),
                                             jnp.pad(delta, pad_t), interpret)
        if dslope is not None:
            dslope = dslope.sum((0, 2))
        return dq[:, : st.T, :, :D], dk[:, : st.S, :, :D], dv[:, : st.S, :, :D], dslope

    return by_platform(kernel, q, k, v, lse, delta, dout, backend=backend,
                       interpret=interpret)

