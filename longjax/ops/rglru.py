"""The Real-Gated Linear Recurrent Unit of Griffin / Hawk (De et al. 2024).

    a_t = sigmoid(Lambda) ** (c r_t),    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)

with `c = 8`, recurrence gate `r_t` and input gate `i_t` in (0, 1). At the first token of
a document the input is not normalised (`h_t = i_t x_t`), as in the paper's code. The scan
itself is `longjax.ops.scan.linear_scan`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longjax.ops.linear_attention import resets_from_segments
from longjax.ops.scan import linear_scan

RGLRU_C = 8.0


def rglru_coefficients(x, r, i, a_param, resets):
    """`(a, b)` of the scan `h_t = a_t h_{t-1} + b_t`, fp32 `[B, T, D]`; `resets` `[B, T]`
    marks first tokens of documents (there `a_t = 0` and the input is not normalised)."""
    log_a = -RGLRU_C * r.astype(jnp.float32) * jax.nn.softplus(-a_param.astype(jnp.float32))
    a = jnp.exp(log_a)
    # sqrt(1 - a^2) = sqrt(-expm1(2 log a)), accurate for a near 1.
    norm = jnp.sqrt(-jnp.expm1(2.0 * log_a))
    reset = resets[..., None]
    b = jnp.where(reset, 1.0, norm) * i.astype(jnp.float32) * x.astype(jnp.float32)
    return jnp.where(reset, 0.0, a), b


def rglru_resets(segment_ids, batch, length, first_is_start):
    """`[B, T]` bool: document starts (segment changes, and token 0 where `first_is_start`,
    a bool or `[B]` bools)."""
    return resets_from_segments(segment_ids, batch, length).at[:, 0].set(first_is_start)


def rg_lru(x, r, i, a_param, *, segment_ids=None, initial_state=None, first_is_start=None,
           return_final_state=False, impl="auto"):
    """RG-LRU over x `[B, T, D]` with gates r, i `[B, T, D]` in (0, 1) and `a_param` `[D]`.

    Token 0 starts a document where `first_is_start` (a bool or `[B]` bools; default: when
    no `initial_state` `[B, D]` is given), else it continues `initial_state`. `impl` is the
    `linear_scan` impl. Returns y `[B, T, D]` in x's dtype (and the fp32 final state).
    """
    B, T, D = x.shape
    if r.shape != x.shape or i.shape != x.shape:
        raise ValueError(f"r and i must have x's shape {x.shape}; got {r.shape}, {i.shape}")
    if a_param.shape != (D,):
        raise ValueError(f"a_param must have shape {(D,)}; got {a_param.shape}")
    if segment_ids is not None and segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids must have shape {(B, T)}; got {segment_ids.shape}")
    if first_is_start is None:
        first_is_start = initial_state is None
    resets = rglru_resets(segment_ids, B, T, first_is_start)
    a, b = rglru_coefficients(x, r, i, a_param, resets)
    h, state = linear_scan(a, b, initial_state=initial_state, return_final_state=True,
                           impl=impl)
    h = h.astype(x.dtype)
    return (h, state) if return_final_state else h
