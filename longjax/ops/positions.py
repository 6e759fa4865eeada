"""Position encodings. RoPE: Su et al. 2021, "RoFormer"."""

from __future__ import annotations

import jax.numpy as jnp


def rope_frequencies(head_dim, *, base=10000.0, fraction=1.0):
    """Inverse frequencies `[rotary_dim // 2]` for the first `fraction` of `head_dim`."""
    rotary_dim = int(head_dim * fraction) // 2 * 2
    return 1.0 / base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)


def rope(x, positions, *, base=10000.0, fraction=1.0):
    """Rotate `x` `[B, T, H, D]` by angles `positions[b, t] * inv_freq` (half-split pairs).

    Only the first `fraction * D` dims rotate (partial rotary); the rest pass through.
    """
    inv_freq = rope_frequencies(x.shape[-1], base=base, fraction=fraction)
    rotary_dim = 2 * inv_freq.shape[0]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, R/2]
    sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
    rot, rest = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
    x1, x2 = jnp.split(rot, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)
