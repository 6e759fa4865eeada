"""One token of the selective scan and of its backward pass, shared by the GPU and TPU kernels.

Layout inside a kernel: the state `h` is `[N, E]` (state index on rows, a block of E
channels on columns); per-token channel vectors (`u`, `delta`, `dy`) are rows `[1, E]`;
per-token state vectors (`B`, `C`) are columns `[N, 1]`; `A_T` is `[N, E]`; `keep` (0 at
a document border) broadcasts. Math of Gu & Dao 2023:
`h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t`, `y_t = C_t . h_t`.
"""

from __future__ import annotations

import jax.numpy as jnp


def forward(h, u, dt, A_T, B_col, C_col, keep):
    """Returns `(h_t [N, E], y_t [1, E])` from `h_{t-1}`."""
    h = jnp.exp(dt * A_T) * keep * h + B_col * (dt * u)
    return h, jnp.sum(C_col * h, axis=-2, keepdims=True)


def backward(g, h_prev, h, u, dt, A_T, B_col, C_col, keep, dy):
    """Backward of `forward` at token t.

    `g` is dL/dh_t from later tokens; returns dL/dh_{t-1} (from this token's transition),
    `du [1, E]`, `ddt [1, E]`, `dB [N, 1]`, `dC [N, 1]` (summed over this block's channels)
    and this token's `dA_T [N, E]`.
    """
    a = jnp.exp(dt * A_T) * keep
    g = g + C_col * dy
    dC = jnp.sum(h * dy, axis=-1, keepdims=True)
    dB = jnp.sum(g * (dt * u), axis=-1, keepdims=True)
    d_dtu = jnp.sum(g * B_col, axis=-2, keepdims=True)
    da_a = g * h_prev * a  # dL/da * a = dL/d(dt A)
    ddt = d_dtu * u + jnp.sum(da_a * A_T, axis=-2, keepdims=True)
    return a * g, d_dtu * dt, ddt, dB, dC, da_a * dt
