"""Position encodings: pure functions, no parameters (the learned ones take them as inputs).

Rotary (applied to q and k):
- RoPE, Su et al. 2021 "RoFormer", with partial rotary and the context-extension
  scalings of `ROPE_SCALINGS`: `linear` (Position Interpolation, Chen et al. 2023), `ntk`
  (NTK-aware base change, bloc97 2023), `dynamic_ntk` (the NTK base grown with the
  current length only beyond the training length), `yarn` (Peng et al. 2023, ramp over
  dimensions + attention temperature), `llama3` (Meta 2024, wavelength bands).
- xPos, Sun et al. 2022 "A Length-Extrapolatable Transformer": RoPE times a per-dimension
  exponential decay in relative distance.

Additive score biases `[B, H, Tq, Tk]` from query and key positions:
- ALiBi slopes, Press et al. 2022 (`alibi_slopes`; the bias is `ops.attention.alibi_bias`).
- T5 relative buckets, Raffel et al. 2020.
- KERPLE (logarithmic), Chi et al. 2022.
- FIRE, Li et al. 2023 "Functional Interpolation for Relative Positions".

Absolute: sinusoidal embeddings, Vaswani et al. 2017. Query scaling: log-n (Chiang &
Cholak 2022; Nakanishi 2025 "Scalable-Softmax").
"""

from __future__ import annotations

import math

import jax.numpy as jnp

ROPE_SCALINGS = ("none", "linear", "ntk", "dynamic_ntk", "yarn", "llama3")
# YaRN's ramp bounds in rotations per training length (Peng et al. 2023, Sec. 3.2:
# alpha = 1, beta = 32 for LLaMA) and Llama 3.1's wavelength band factors.
YARN_BETA_SLOW, YARN_BETA_FAST = 1.0, 32.0
LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR = 1.0, 4.0
XPOS_GAMMA, XPOS_SCALE_BASE = 0.4, 512.0


def check_rope_scaling(scaling, factor, original_length, *, where="rope",
                       length_field="original_length"):
    """Raises ValueError naming `where` for an unknown scaling, a factor <= 0, or a missing
    training length (`length_field`) for the scalings that need one."""
    if scaling not in ROPE_SCALINGS:
        raise ValueError(f"{where}_scaling={scaling!r}; allowed: {list(ROPE_SCALINGS)}")
    if not (isinstance(factor, int | float) and not isinstance(factor, bool) and factor > 0):
        raise ValueError(f"{where}_scaling_factor must be a number > 0; got {factor!r}")
    needs_length = scaling in ("dynamic_ntk", "yarn", "llama3")
    if needs_length and not (isinstance(original_length, int) and original_length > 0):
        raise ValueError(f"{where}_scaling={scaling!r} needs the training length "
                         f"({length_field}, a positive int); got {original_length!r}")


def rope_frequencies(head_dim, *, base=10000.0, fraction=1.0, scaling="none", factor=1.0,
                     original_length=None, length=None):
    """Inverse frequencies `[rotary_dim // 2]` (radians per position) for the first
    `fraction` of `head_dim`, scaled by `scaling` with `factor` s for a model trained at
    `original_length` L; `length` is the current sequence length (`dynamic_ntk` only).

    - linear: theta / s.
    - ntk: base * s^(R / (R - 2)) with R the rotary dim.
    - dynamic_ntk: ntk with s' = max(1, s * length / L - (s - 1)), so unchanged up to L.
    - yarn: with r = L / wavelength, gamma = clip((r - 1) / (32 - 1), 0, 1):
      (1 - gamma) * theta / s + gamma * theta.
    - llama3: wavelengths above L / 1 are divided by s, below L / 4 kept, in between
      interpolated with smooth = (L / wavelength - 1) / (4 - 1).
    """
    check_rope_scaling(scaling, factor, original_length)
    rotary_dim = int(head_dim * fraction) // 2 * 2
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    if scaling == "ntk" or (scaling == "dynamic_ntk" and length is not None):
        s = factor if scaling == "ntk" else max(1.0, factor * length / original_length
                                                 - (factor - 1))
        base = base * s ** (rotary_dim / (rotary_dim - 2))
    inv_freq = 1.0 / base ** exponents
    if scaling == "linear":
        return inv_freq / factor
    if scaling in ("yarn", "llama3"):
        rotations = original_length * inv_freq / (2 * math.pi)  # L / wavelength
        if scaling == "yarn":
            keep = jnp.clip((rotations - YARN_BETA_SLOW) / (YARN_BETA_FAST - YARN_BETA_SLOW),
                            0.0, 1.0)
        else:
            keep = jnp.clip((rotations - LLAMA3_LOW_FREQ_FACTOR)
                            / (LLAMA3_HIGH_FREQ_FACTOR - LLAMA3_LOW_FREQ_FACTOR), 0.0, 1.0)
        return (1 - keep) * inv_freq / factor + keep * inv_freq
    return inv_freq


def yarn_attention_factor(factor):
    """YaRN's sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023, Eq. 22); q and k are each
    multiplied by it, so the logits by its square. 1 for s <= 1."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope(x, positions, *, base=10000.0, fraction=1.0, scaling="none", factor=1.0,
         original_length=None, length=None, inv_freq=None):
    """Rotate `x` `[B, T, H, D]` by angles `positions[b, t] * inv_freq` (half-split pairs).

    Only the first `fraction * D` dims rotate (partial rotary); the rest pass through.
    The frequencies are `rope_frequencies(D, base=..., fraction=..., scaling=...,
    factor=..., original_length=..., length=...)` unless `inv_freq` gives them.
    """
    if inv_freq is None:
        inv_freq = rope_frequencies(x.shape[-1], base=base, fraction=fraction, scaling=scaling,
                                    factor=factor, original_length=original_length,
                                    length=length)
    rotary_dim = 2 * inv_freq.shape[0]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, R/2]
    sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
    rot, rest = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
    x1, x2 = jnp.split(rot, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)


def xpos_scale(rotary_dim, positions, *, key, gamma=XPOS_GAMMA, scale_base=XPOS_SCALE_BASE):
    """xPos scale `[B, T, 1, rotary_dim]`: zeta_i^(n / scale_base) for queries and its
    inverse for keys, zeta_i = (2i / R + gamma) / (1 + gamma) shared by both halves of a
    rotation pair; q.k then decays as zeta^((m - n) / scale_base) (Sun et al. 2022, Eq. 9).
    """
    zeta = (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim + gamma) / (1 + gamma)
    power = positions.astype(jnp.float32)[..., None] / scale_base * (-1.0 if key else 1.0)
    scale = zeta ** power  # [B, T, R/2]
    return jnp.concatenate([scale, scale], axis=-1)[:, :, None]


def xpos(x, positions, *, key, inv_freq):
    """RoPE with `inv_freq`, then xPos's decay scale on the rotated dims (queries `key=False`
    scaled up with position, keys down)."""
    rotary_dim = 2 * inv_freq.shape[0]
    rotated = rope(x, positions, inv_freq=inv_freq)
    scaled = rotated[..., :rotary_dim] * xpos_scale(rotary_dim, positions, key=key)
    return jnp.concatenate([scaled.astype(x.dtype), rotated[..., rotary_dim:]], axis=-1)


def alibi_slopes(num_heads):
    """ALiBi head slopes `[num_heads]` (Press et al. 2022, Sec. 3): the geometric sequence
    2^(-8/n), 2^(-16/n), ... for n a power of two; otherwise those of the largest power of
    two m < n, then every other slope of 2m heads for the remaining n - m heads."""
    def powers_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1; got {num_heads}")
    m = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = powers_of_two(m) + powers_of_two(2 * m)[0::2][: num_heads - m]
    return jnp.asarray(slopes, jnp.float32)


def relative_distance(q_positions, kv_positions):
    """`q_pos - k_pos` `[B, Tq, Tk]` (int32) from `[B, Tq]` and `[B, Tk]` positions."""
    return q_positions[:, :, None].astype(jnp.int32) - kv_positions[:, None, :].astype(jnp.int32)


def t5_buckets(distance, *, num_buckets=32, max_distance=128, bidirectional=False):
    """T5 relative position buckets (Raffel et al. 2020) for `distance = q_pos - k_pos`.

    Causal: distances `n = max(distance, 0)` below `num_buckets // 2` get their own
    bucket; larger ones share log-spaced buckets up to `max_distance`, beyond which all
    fall in the last. Bidirectional: half the buckets for keys before the query, half
    (offset) for keys after.
    """
    n = distance.astype(jnp.int32)
    offset = 0
    if bidirectional:
        num_buckets //= 2
        offset = jnp.where(n < 0, num_buckets, 0)
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    exact = num_buckets // 2
    large = exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact)
                     / math.log(max_distance / exact) * (num_buckets - exact)).astype(jnp.int32)
    return offset + jnp.where(n < exact, n, jnp.minimum(large, num_buckets - 1))


def kerple_log_bias(distance, r1, r2):
    """KERPLE-log bias `[B, H, Tq, Tk]` = -r1[h] * log(1 + r2[h] * |distance|) with
    r1, r2 `[H]` > 0 (Chi et al. 2022, Eq. 9)."""
    d = jnp.abs(distance).astype(jnp.float32)[:, None]
    return -r1[None, :, None, None] * jnp.log1p(r2[None, :, None, None] * d)


def fire_inputs(q_positions, kv_positions, c, threshold):
    """FIRE's normalised distance `[B, Tq, Tk]`: psi(i - j) / psi(max(L, i)) with
    psi(x) = log(c x + 1), c > 0 and L = `threshold` learned (Li et al. 2023, Eq. 6);
    keys after the query get 0 (they are masked)."""
    def psi(x):
        return jnp.log(c * x + 1.0)

    distance = jnp.maximum(relative_distance(q_positions, kv_positions), 0).astype(jnp.float32)
    i = q_positions.astype(jnp.float32)[:, :, None]
    return psi(distance) / psi(jnp.maximum(threshold, i))


def sinusoidal_embedding(positions, dim, *, base=10000.0):
    """Sinusoidal position embeddings `[B, T, dim]` (Vaswani et al. 2017, Sec. 3.5):
    PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(p / base^(2i/dim))."""
    inv_freq = 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return pe.reshape(*positions.shape, -1)[..., :dim]


def logn_scale(positions, train_length):
    """Log-n query scale `[B, T, 1, 1]`: max(1, log(p + 1) / log(L)), so queries past the
    training length L sharpen as the number of visible tokens grows, and nothing changes
    at or below L (Chiang & Cholak 2022; Nakanishi 2025)."""
    n = positions.astype(jnp.float32) + 1.0
    return jnp.maximum(1.0, jnp.log(n) / math.log(train_length))[:, :, None, None]
