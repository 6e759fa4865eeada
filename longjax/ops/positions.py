"""Position encodings: pure functions, no parameters (the learned ones take them as inputs).

Rotary (applied to q and k):
- RoPE, Su et al. 2021 "RoFormer", with partial rotary and the context-extension
  scalings of `ROPE_SCALINGS`: `linear` (Position Interpolation, Chen et al. 2023), `ntk`
  (NTK-aware base change, bloc97 2023), `dynamic_ntk` (the NTK base grown with the
  current length only beyond the training length), `yarn` (Peng et al. 2023, ramp over
  dimensions + attention temperature), `llama3` (Meta 2024, wavelength bands),
  `longrope` (Ding et al. 2024, per-pair factors), as `transformers.modeling_rope_utils`
  computes them (with their `params`), and angles exact at any int32 position.
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
import numpy as np

ROPE_SCALINGS = ("none", "linear", "ntk", "dynamic_ntk", "yarn", "llama3", "longrope",
                 "truncated")
# The `params` each scaling accepts, with transformers' field names (its
# `rope_parameters`), and their defaults (None: computed, or required).
ROPE_SCALING_PARAMS = {
    "none": {}, "linear": {}, "ntk": {}, "dynamic_ntk": {},
    # YaRN's ramp bounds in rotations per training length (Peng et al. 2023, Sec. 3.2:
    # alpha = beta_slow = 1, beta = beta_fast = 32 for LLaMA); mscale / mscale_all_dim
    # (DeepSeek) or attention_factor set the temperature; truncate rounds the ramp's
    # dimension bounds outwards, as YaRN's released code does.
    "yarn": {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": None, "mscale_all_dim": None,
             "attention_factor": None, "truncate": True},
    # Llama 3.1's wavelength bands: wavelengths above L / low_freq_factor are divided by
    # the factor, below L / high_freq_factor kept.
    "llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0},
    # LongRoPE (Ding et al. 2024): per-pair rescale factors `[R/2]` for lengths up to the
    # training length (short) and beyond it (long).
    "longrope": {"short_factor": None, "long_factor": None, "attention_factor": None},
    # Giraffe's truncated basis (Pal et al. 2023, Sec. 3.3): frequencies >= b kept, those
    # in (a, b) set to rho, those <= a to 0 (radians per position, 0 <= a <= b; see
    # `giraffe_params`).
    "truncated": {"a": None, "b": None, "rho": None},
}
_REQUIRED = {"longrope": ("short_factor", "long_factor"), "truncated": ("a", "b", "rho")}
_NEEDS_LENGTH = ("dynamic_ntk", "yarn", "llama3", "longrope")
XPOS_GAMMA, XPOS_SCALE_BASE = 0.4, 512.0


def rope_scaling_params(scaling, params=None, *, where="rope_scaling_params"):
    """`params` (a mapping or (name, value) pairs) over the defaults of `scaling`'s
    `ROPE_SCALING_PARAMS`; ValueError naming `where`, the key and the allowed keys for an
    unknown key or a missing required one (longrope's factor lists)."""
    allowed = ROPE_SCALING_PARAMS[scaling]
    given = dict(params or {})
    for name in given:
        if name not in allowed:
            raise ValueError(f"{where}: {name!r} is not a parameter of rope_scaling="
                             f"{scaling!r}; allowed: {sorted(allowed)}")
    out = {**allowed, **given}
    for name in _REQUIRED.get(scaling, ()):
        if out[name] is None:
            raise ValueError(f"{where}: rope_scaling={scaling!r} needs {name!r}; give "
                             f"{list(_REQUIRED[scaling])}")
    if scaling == "truncated" and not (0 <= out["a"] <= out["b"] and out["rho"] >= 0):
        raise ValueError(f"{where}: rope_scaling='truncated' needs 0 <= a <= b and rho >= 0; "
                         f"got a={out['a']!r}, b={out['b']!r}, rho={out['rho']!r}")
    if scaling == "yarn":
        for name in ("beta_fast", "beta_slow"):
            if not (isinstance(out[name], int | float) and out[name] > 0):
                raise ValueError(f"{where}: {name}={out[name]!r} must be a number > 0")
    return out


def canonical_rope_params(params):
    """`params` (a mapping, ConfigDict, or (name, value) pairs) as sorted (name, value)
    pairs with list values as tuples: hashable, for a module field."""
    if hasattr(params, "items"):
        pairs = params.items()
    else:
        try:
            pairs = [(name, value) for name, value in params]
        except (TypeError, ValueError) as e:
            raise ValueError(f"rope_scaling_params must be a mapping or (name, value) pairs; "
                             f"got {params!r}") from e
    return tuple(sorted((str(name), tuple(value) if isinstance(value, list | tuple) else value)
                        for name, value in pairs))


def check_rope_scaling(scaling, factor, original_length, *, params=None, where="rope",
                       length_field="original_length"):
    """Raises ValueError naming `where` for an unknown scaling, a factor <= 0, a missing
    training length (`length_field`) for the scalings that need one, or bad `params`."""
    if scaling not in ROPE_SCALINGS:
        raise ValueError(f"{where}_scaling={scaling!r}; allowed: {list(ROPE_SCALINGS)}")
    if not (isinstance(factor, int | float) and not isinstance(factor, bool) and factor > 0):
        raise ValueError(f"{where}_scaling_factor must be a number > 0; got {factor!r}")
    if scaling in _NEEDS_LENGTH and not (isinstance(original_length, int)
                                         and original_length > 0):
        raise ValueError(f"{where}_scaling={scaling!r} needs the training length "
                         f"({length_field}, a positive int); got {original_length!r}")
    rope_scaling_params(scaling, params, where=f"{where}_scaling_params")


def _is_static(value):
    return value is None or isinstance(value, int | float | np.integer | np.floating)


def rope_frequencies(head_dim, *, base=10000.0, fraction=1.0, scaling="none", factor=1.0,
                     original_length=None, length=None, params=None):
    """Inverse frequencies `[rotary_dim // 2]` (radians per position) for the first
    `fraction` of `head_dim`, scaled by `scaling` with `factor` s for a model trained at
    `original_length` L (transformers' `original_max_position_embeddings`; for
    `dynamic_ntk` its `max_position_embeddings`); `length` is the current sequence
    length (the largest position + 1) for `dynamic_ntk` and `longrope`; `params` the
    scaling's `ROPE_SCALING_PARAMS` (transformers' names). As transformers'
    `ROPE_INIT_FUNCTIONS` compute them, in float64: a numpy array, or a float32 jax
    array when `length` is traced.

    - linear (Position Interpolation): theta / s.
    - ntk: base * s^(R / (R - 2)) with R the rotary dim.
    - dynamic_ntk: ntk with s' = max(1, s * length / L - (s - 1)), so unchanged up to L.
    - yarn: pair i keeps theta_i below the pair index where theta turns `beta_fast` times
      over L and takes theta_i / s above the one where it turns `beta_slow` times, with a
      linear ramp over pair indices in between (YaRN's released code).
    - llama3: wavelengths above L / low_freq_factor divided by s, below
      L / high_freq_factor kept, in between interpolated with
      smooth = (L / wavelength - low) / (high - low).
    - longrope: theta_i / long_factor[i] when length > L, else / short_factor[i].
    - truncated (Giraffe): theta_i if theta_i >= b, rho if a < theta_i < b, else 0.
    """
    check_rope_scaling(scaling, factor, original_length, params=params)
    p = rope_scaling_params(scaling, params)
    rotary_dim = int(head_dim * fraction) // 2 * 2
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    if scaling == "ntk":
        base = base * factor ** (rotary_dim / (rotary_dim - 2))
    inv_freq = 1.0 / base ** exponents
    if scaling == "linear":
        return inv_freq / factor
    if scaling == "dynamic_ntk" and length is not None:
        # base' = base s'^(R / (R - 2)), so theta'_i = theta_i s'^(-2i / (R - 2)).
        grown = factor * length / original_length - (factor - 1)
        power = -exponents * rotary_dim / (rotary_dim - 2)
        if _is_static(length):
            return inv_freq * max(1.0, grown) ** power
        return (jnp.asarray(inv_freq, jnp.float32)
                * jnp.maximum(1.0, jnp.asarray(grown, jnp.float32)) ** power)
    if scaling == "yarn":
        keep = 1.0 - _yarn_ramp(rotary_dim, base, original_length, p)
        return (1 - keep) * inv_freq / factor + keep * inv_freq
    if scaling == "llama3":
        low, high = p["low_freq_factor"], p["high_freq_factor"]
        rotations = original_length * inv_freq / (2 * math.pi)  # L / wavelength
        keep = np.clip((rotations - low) / (high - low), 0.0, 1.0)
        return (1 - keep) * inv_freq / factor + keep * inv_freq
    if scaling == "longrope":
        short, long = (np.asarray(p[n], np.float64) for n in ("short_factor", "long_factor"))
        for name, f in (("short_factor", short), ("long_factor", long)):
            if f.shape != inv_freq.shape:
                raise ValueError(f"rope_scaling_params: longrope's {name} has {f.size} "
                                 f"entries; the rotary dim {rotary_dim} needs {inv_freq.size}")
        if length is None or _is_static(length):
            return inv_freq / (long if length is not None and length > original_length
                               else short)
        return jnp.where(length > original_length, jnp.asarray(inv_freq / long, jnp.float32),
                         jnp.asarray(inv_freq / short, jnp.float32))
    if scaling == "truncated":
        return np.where(inv_freq >= p["b"], inv_freq, np.where(inv_freq > p["a"], p["rho"], 0.0))
    return inv_freq


def giraffe_params(train_length, target_length):
    """Truncated-basis parameters for a model trained at L = `train_length` and run at
    N = `target_length` (our choice; Pal et al. 2023 tune a, b, rho per model): b = 2 pi / L
    keeps the pairs that turn at least once within L, a = rho = 2 pi / N zeroes those that
    never turn once within N and gives the band between one frequency that turns once
    over N."""
    return {"a": 2 * math.pi / target_length, "b": 2 * math.pi / train_length,
            "rho": 2 * math.pi / target_length}


def _yarn_ramp(rotary_dim, base, original_length, p):
    """YaRN's interpolation weight per pair `[R/2]`: 0 up to the (real-valued) pair index
    where theta turns `beta_fast` times over L, 1 from the one where it turns `beta_slow`
    times, linear in the pair index in between (bounds floored / ceiled with `truncate`).
    Pair i turns L theta_i / 2pi times, so that index is R ln(L / (2 pi turns)) / (2 ln base).
    """
    def pair_index(turns):
        return rotary_dim * math.log(original_length / (turns * 2 * math.pi)) / (
            2 * math.log(base))

    low, high = pair_index(p["beta_fast"]), pair_index(p["beta_slow"])
    if p["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # as the released code: no division by zero
    return np.clip((np.arange(rotary_dim // 2) - low) / (high - low), 0.0, 1.0)


def rope_attention_factor(scaling, factor, *, original_length=None, params=None):
    """The factor q and k (their rotated dims: transformers multiplies cos and sin) are
    scaled by, so the logits by its square (transformers' `attention_scaling`):

    - yarn: `attention_factor` if given, else mscale(s, mscale) / mscale(s, mscale_all_dim)
      when both are given, else mscale(s, 1), with mscale(s, m) = 0.1 m ln(s) + 1 for
      s > 1 and 1 otherwise (Peng et al. 2023, Eq. 22: sqrt(1/t) = 0.1 ln(s) + 1).
    - longrope: `attention_factor` if given, else sqrt(1 + ln(s) / ln(L)) for s > 1.
    - otherwise 1.
    """
    p = rope_scaling_params(scaling, params)

    def mscale(m):
        return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0

    if scaling == "yarn":
        if p["attention_factor"] is not None:
            return float(p["attention_factor"])
        if p["mscale"] and p["mscale_all_dim"]:
            return mscale(p["mscale"]) / mscale(p["mscale_all_dim"])
        return mscale(1.0)
    if scaling == "longrope":
        if p["attention_factor"] is not None:
            return float(p["attention_factor"])
        return math.sqrt(1 + math.log(factor) / math.log(original_length)) if factor > 1 else 1.0
    return 1.0


def rope_angles(positions, inv_freq):
    """cos and sin of `positions[b, t] * inv_freq`, each `[B, T, R/2]` float32.

    With numpy (float64) `inv_freq` the angle is exact to ~1e-6 rad at any int32 position:
    in turns (theta / 2pi), the position splits into 11-bit limbs p = a 2^22 + b 2^11 + c,
    and each limb weight's fractional turns frac(w theta / 2pi) into a 13-bit head, whose
    product with a limb is exact in float32, and a small tail. (The plain float32 product
    is off by ~0.03 rad at 4e5, where float32 itself is spaced 0.03 apart.) A traced
    (jax) `inv_freq` or fractional positions take the float32 product.
    """
    if not isinstance(inv_freq, np.ndarray) or not jnp.issubdtype(jnp.asarray(
            positions).dtype, jnp.integer):
        angles = positions[..., None].astype(jnp.float32) * inv_freq
        return jnp.cos(angles), jnp.sin(angles)
    turns = inv_freq / (2 * np.pi)
    p = positions.astype(jnp.int32)[..., None]
    total = jnp.zeros((), jnp.float32)
    for shift, limb in ((22, p >> 22), (11, (p >> 11) & 2047), (0, p & 2047)):
        frac = np.mod(turns * 2.0 ** shift, 1.0)
        head = np.round(frac * 2.0 ** 13) / 2.0 ** 13
        product = limb.astype(jnp.float32) * jnp.asarray(head, jnp.float32)
        total = total + (product - jnp.floor(product)) + limb.astype(
            jnp.float32) * jnp.asarray(frac - head, jnp.float32)
    angles = (2 * np.pi) * (total - jnp.floor(total))
    return jnp.cos(angles), jnp.sin(angles)


def rope(x, positions, *, base=10000.0, fraction=1.0, scaling="none", factor=1.0,
         original_length=None, length=None, params=None, inv_freq=None,
         attention_factor=None):
    """Rotate `x` `[B, T, H, D]` by angles `positions[b, t] * inv_freq` (half-split pairs),
    the rotated dims times `attention_factor` (default: `rope_attention_factor`).

    Only the first `fraction * D` dims rotate (partial rotary); the rest pass through.
    The frequencies are `rope_frequencies(D, base=..., fraction=..., scaling=...,
    factor=..., original_length=..., length=..., params=...)` unless `inv_freq` gives
    them (then `attention_factor` defaults to 1).
    """
    if inv_freq is None:
        inv_freq = rope_frequencies(x.shape[-1], base=base, fraction=fraction, scaling=scaling,
                                    factor=factor, original_length=original_length,
                                    length=length, params=params)
        if attention_factor is None:
            attention_factor = rope_attention_factor(scaling, factor,
                                                     original_length=original_length,
                                                     params=params)
    rotary_dim = 2 * inv_freq.shape[0]
    cos, sin = (a[:, :, None] for a in rope_angles(positions, inv_freq))
    if attention_factor not in (None, 1.0):
        cos, sin = cos * attention_factor, sin * attention_factor
    rot, rest = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
    x1, x2 = jnp.split(rot, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)


def xpos_scale(rotary_dim, positions, *, key, offset=0, gamma=XPOS_GAMMA,
               scale_base=XPOS_SCALE_BASE):
    """xPos scale `[B, T, 1, rotary_dim]`: zeta_i^((n - offset) / scale_base) for queries
    and its inverse for keys, zeta_i = (2i / R + gamma) / (1 + gamma) shared by both halves
    of a rotation pair; q.k then decays as zeta^((m - n) / scale_base) (Sun et al. 2022,
    Eq. 9) whatever the common `offset` (a scalar or `[B, 1]`). Centring the offset on
    the positions of one call keeps both factors finite in float32 for a span of up to
    `XPOS_MAX_SPAN` positions, however far the positions themselves go."""
    zeta = (np.arange(0, rotary_dim, 2) / rotary_dim + gamma) / (1 + gamma)
    shifted = (positions - offset).astype(jnp.float32)[..., None]
    power = shifted / scale_base * (-1.0 if key else 1.0)
    scale = jnp.exp(power * jnp.asarray(np.log(zeta), jnp.float32))  # [B, T, R/2]
    return jnp.concatenate([scale, scale], axis=-1)[:, :, None]


# The widest span of positions one xPos call may hold around its offset: both factors
# stay within exp(+-80) (float32 overflows past exp(88.7)) for the fastest-decaying pair.
XPOS_MAX_SPAN = 2 * int(80 * XPOS_SCALE_BASE / -math.log(XPOS_GAMMA / (1 + XPOS_GAMMA)))


def xpos(x, positions, *, key, inv_freq, offset=0, attention_factor=None):
    """RoPE with `inv_freq` (and `attention_factor`), then xPos's decay scale relative to
    `offset` on the rotated dims (queries `key=False` scaled up with position, keys down)."""
    rotary_dim = 2 * inv_freq.shape[0]
    rotated = rope(x, positions, inv_freq=inv_freq, attention_factor=attention_factor)
    scaled = rotated[..., :rotary_dim] * xpos_scale(rotary_dim, positions, key=key,
                                                    offset=offset)
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
    PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(p / base^(2i/dim)), the angles
    exact at any position (`rope_angles`)."""
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    cos, sin = rope_angles(positions, inv_freq)
    pe = jnp.stack([sin, cos], axis=-1)
    return pe.reshape(*positions.shape, -1)[..., :dim]


def logn_scale(positions, train_length):
    """Log-n query scale `[B, T, 1, 1]`: max(1, log(p + 1) / log(L)), so queries past the
    training length L sharpen as the number of visible tokens grows, and nothing changes
    at or below L (Chiang & Cholak 2022; Nakanishi 2025)."""
    n = positions.astype(jnp.float32) + 1.0
    return jnp.maximum(1.0, jnp.log(n) / math.log(train_length))[:, :, None, None]
