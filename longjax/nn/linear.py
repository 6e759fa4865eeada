"""Linear-attention, gated-recurrence and sliding-window mixers, with decode caches.

Registered names: `"linear_attention"`, `"retention"`, `"gla"`, `"deltanet"`,
`"gated_deltanet"`, `"based"` (one `LinearAttentionMixer` each, configured as in its
paper), `"rglru"` (Griffin's recurrent block) and `"swa"` (sliding-window attention with a
rolling cache of `window` tokens). All follow the interface of `longjax.nn.registry`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from longjax.nn.attention import AttentionMixer
from longjax.nn.layers import RMSNorm, dense
from longjax.nn.registry import register_mixer
from longjax.ops import positions as positions_lib
from longjax.parallel import recurrent


class ShortConv(nn.Module):
    """Depthwise causal convolution over time that never mixes documents.

    x `[B, T, C]`; `cache` `{"x": [B, K-1, C], "seg": [B, K-1]}` holds the previous inputs
    and their segment ids. Returns y and the updated cache.
    """

    kernel_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, segment_ids, cache):
        K = self.kernel_size
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(
                nn.initializers.normal(stddev=K**-0.5), ("conv", "embed")),
            (K, x.shape[-1]), jnp.float32).astype(self.dtype)
        T = x.shape[1]
        xs = jnp.concatenate([cache["x"].astype(self.dtype), x.astype(self.dtype)], axis=1)
        ss = jnp.concatenate([cache["seg"], segment_ids], axis=1)
        y = jnp.zeros_like(x, dtype=self.dtype)
        for s in range(K):  # tap s reads token t - s
            same = (ss[:, K - 1 - s: K - 1 - s + T] == segment_ids)[..., None]
            y = y + jnp.where(same, xs[:, K - 1 - s: K - 1 - s + T], 0) * kernel[K - 1 - s]
        return y, {"x": xs[:, xs.shape[1] - (K - 1):], "seg": ss[:, ss.shape[1] - (K - 1):]}


def empty_conv_cache(batch_size, kernel_size, channels, dtype):
    return {"x": jnp.zeros((batch_size, kernel_size - 1, channels), dtype),
            "seg": jnp.full((batch_size, kernel_size - 1), -1, jnp.int32)}


def _segments(segment_ids, x):
    return (jnp.ones(x.shape[:2], jnp.int32) if segment_ids is None
            else segment_ids.astype(jnp.int32))


def _continued_state(cache, segment_ids):
    """The cached state, zeroed for rows whose first token starts a new document."""
    keep = cache["segment"] == segment_ids[:, 0]
    state = cache["state"]
    return jnp.where(keep.reshape((-1,) + (1,) * (state.ndim - 1)), state, 0.0), keep


# The options each kind reads beyond impl, chunk_size and conv_size.
KIND_OPTIONS = {"linear_attention": (), "retention": (), "gla": ("gate_rank",),
                "deltanet": (), "gated_deltanet": (), "based": ("feature_dim",)}
# The kinds with a short convolution on q, k, v by default, and its size.
CONV_SIZE = {"deltanet": 4, "gated_deltanet": 4}


class LinearAttentionMixer(nn.Module):
    """Multi-head linear attention with the per-paper trimmings selected by `kind`.

    kind: `"linear_attention"` (elu+1 features, normalised; Katharopoulos et al. 2020),
    `"retention"` (RoPE on q/k, fixed per-head decay, RMS-normed heads, swish output gate;
    Sun et al. 2023, with RoPE in place of xPos), `"gla"` (low-rank gate
    `logsigmoid(W2 W1 x) / 16` per key dim, normed heads, swish gate; Yang et al. 2024),
    `"deltanet"` (short conv + SiLU on q/k/v, L2-normalised q/k, `beta = sigmoid(W x)`,
    normed heads; Yang et al. 2024), `"gated_deltanet"` (as deltanet plus the Mamba-2 style
    decay `g = -exp(A_log) softplus(W x + dt_bias)` and a swish gate; Yang, Kautz &
    Hatamizadeh 2024), `"based"` (Taylor features of dimension `feature_dim`, normalised;
    Arora et al. 2024).

    Cache: `{"state": [B, H, Dk', Dv'] fp32, "conv": ShortConv cache, "segment": [B]
    (the last token's segment id, -1 when empty), "end": int32 (tokens seen)}`.
    """

    kind: str
    num_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"
    chunk_size: int = 64
    conv_size: int | None = None  # None: the kind's (CONV_SIZE, else no convolution)
    feature_dim: int = 16
    gate_rank: int = 16

    def _conv_size(self):
        return CONV_SIZE.get(self.kind, 0) if self.conv_size is None else self.conv_size

    def _key_dim(self):
        return self.feature_dim if self.kind == "based" else self.head_dim

    def _state_shape(self):
        dk, dv = self._key_dim(), self.head_dim
        if self.kind == "based":
            return (self.num_heads, 1 + dk + dk * dk, dv + 1)
        return (self.num_heads, dk, dv + (self.kind == "linear_attention"))

    def _conv_channels(self):
        return self.num_heads * (2 * self._key_dim() + self.head_dim)

    def init_cache(self, batch_size, max_length, dtype=None):
        dtype = dtype or self.dtype
        return {
            "state": jnp.zeros((batch_size,) + self._state_shape(), jnp.float32),
            "conv": empty_conv_cache(batch_size, max(self._conv_size(), 1),
                                     self._conv_channels(), dtype),
            "segment": jnp.full((batch_size,), -1, jnp.int32),
            "end": jnp.zeros((), jnp.int32),
        }

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        B, T, _ = x.shape
        H, dk, dv = self.num_heads, self._key_dim(), self.head_dim
        seg = _segments(segment_ids, x)
        fresh = self.init_cache(B, T) if cache is None else cache
        qkv = dense(self._conv_channels(), axes=("embed", "heads"), dtype=self.dtype,
                    name="qkv")(x)
        conv_cache = fresh["conv"]
        if self._conv_size():
            qkv, conv_cache = ShortConv(self._conv_size(), self.dtype, name="conv")(
                qkv, seg, fresh["conv"])
            qkv = nn.silu(qkv)
        q, k, v = jnp.split(qkv, [H * dk, 2 * H * dk], axis=-1)
        q, k, v = (t.reshape(B, T, H, -1) for t in (q, k, v))
        if self.kind == "retention":
            if positions is None:
                positions = jnp.broadcast_to(fresh["end"] + jnp.arange(T), (B, T))
            q, k = positions_lib.rope(q, positions), positions_lib.rope(k, positions)
        if self.kind in ("deltanet", "gated_deltanet"):
            q, k = _l2_normalize(q), _l2_normalize(k)
        initial_state = None if cache is None else _continued_state(cache, seg)[0]
        common = dict(segment_ids=segment_ids, initial_state=initial_state,
                      return_final_state=True, impl=self.impl, chunk_size=self.chunk_size)
        o, state = self._op(x, q, k, v, common)
        if self.kind in ("retention", "gla", "deltanet", "gated_deltanet"):
            o = RMSNorm(dtype=self.dtype, name="head_norm")(o)
        o = o.reshape(B, T, H * dv)
        if self.kind in ("retention", "gla", "gated_deltanet"):
            gate = dense(H * dv, axes=("embed", "heads"), dtype=self.dtype, name="gate")(x)
            o = o * nn.silu(gate)
        y = dense(x.shape[-1], axes=("heads", "embed"), dtype=self.dtype, name="out")(o)
        if cache is not None:
            cache = {"state": state, "conv": conv_cache, "segment": seg[:, -1],
                     "end": cache["end"] + T}
        return y, cache

    def _op(self, x, q, k, v, common):
        H = self.num_heads
        if self.kind == "linear_attention":
            return recurrent.linear("linear_attention", q, k, v, feature_map="elu+1",
                                    normalize=True, **common)
        if self.kind == "based":
            return recurrent.linear("based", q, k, v, **common)
        if self.kind == "retention":
            return recurrent.linear("retention", q, k, v, **common)
        if self.kind == "gla":
            low = dense(self.gate_rank, axes=("embed", None), dtype=self.dtype, name="gate_a")(x)
            logits = dense(H * self.head_dim, axes=(None, "heads"), dtype=self.dtype,
                           name="gate_b")(low)
            bias = self.param("gate_bias", nn.initializers.zeros, (H * self.head_dim,))
            g = jax.nn.log_sigmoid((logits + bias).astype(jnp.float32)) / 16.0
            return recurrent.linear("gla", q, k, v, g.reshape(q.shape), **common)
        beta = jax.nn.sigmoid(
            dense(H, axes=("embed", "heads"), dtype=self.dtype, name="beta")(x)
        ).astype(jnp.float32)
        if self.kind == "deltanet":
            return recurrent.linear("delta_rule", q, k, v, beta, **common)
        a_log = self.param("A_log", lambda key, s: jnp.log(
            jax.random.uniform(key, s, jnp.float32, 1.0, 16.0)), (H,))
        dt_bias = self.param("dt_bias", _dt_bias_init, (H,))
        dt = dense(H, axes=("embed", "heads"), dtype=self.dtype, name="dt")(x)
        g = -jnp.exp(a_log) * jax.nn.softplus(dt.astype(jnp.float32) + dt_bias)
        return recurrent.linear("gated_delta_rule", q, k, v, g, beta, **common)


def _l2_normalize(x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + 1e-6)).astype(x.dtype)


def _dt_bias_init(key, shape):
    """Inverse softplus of dt ~ logU[1e-3, 1e-1] (the Mamba-2 initialisation)."""
    dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(1e-3), math.log(1e-1)))
    return dt + jnp.log(-jnp.expm1(-dt))


class RGLRUMixer(nn.Module):
    """Griffin's recurrent block (De et al. 2024): `out(gelu(W_g x) * RG-LRU(conv(W_x x)))`.

    The RG-LRU gates are dense `width x width` maps (the paper uses block-diagonal ones).
    Cache: `{"state": [B, width] fp32, "conv": ShortConv cache, "segment": [B]}`.
    """

    width: int
    dtype: jnp.dtype = jnp.float32
    conv_size: int = 4
    impl: str = "auto"

    def init_cache(self, batch_size, max_length, dtype=None):
        return {
            "state": jnp.zeros((batch_size, self.width), jnp.float32),
            "conv": empty_conv_cache(batch_size, self.conv_size, self.width,
                                     dtype or self.dtype),
            "segment": jnp.full((batch_size,), -1, jnp.int32),
        }

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        B, T, _ = x.shape
        seg = _segments(segment_ids, x)
        fresh = self.init_cache(B, T) if cache is None else cache
        gate = nn.gelu(dense(self.width, axes=("embed", "mlp"), dtype=self.dtype,
                             name="gate")(x))
        h = dense(self.width, axes=("embed", "mlp"), dtype=self.dtype, name="input")(x)
        h, conv_cache = ShortConv(self.conv_size, self.dtype, name="conv")(h, seg, fresh["conv"])
        r = jax.nn.sigmoid(dense(self.width, axes=("mlp", None), dtype=self.dtype,
                                 name="gate_a")(h))
        i = jax.nn.sigmoid(dense(self.width, axes=("mlp", None), dtype=self.dtype,
                                 name="gate_x")(h))
        a_param = self.param("a_param", _rglru_a_init, (self.width,))
        if cache is None:
            initial_state, first_is_start = None, True
        else:
            initial_state, keep = _continued_state(cache, seg)
            first_is_start = ~keep
        h, state = recurrent.rg_lru(h, r, i, a_param, segment_ids=segment_ids,
                          initial_state=initial_state, first_is_start=first_is_start,
                          return_final_state=True, impl=self.impl)
        y = dense(x.shape[-1], axes=("mlp", "embed"), dtype=self.dtype, name="out")(h * gate)
        if cache is not None:
            cache = {"state": state, "conv": conv_cache, "segment": seg[:, -1]}
        return y, cache


def _rglru_a_init(key, shape):
    """Lambda with `sigmoid(Lambda) ** 8` uniform in [0.9, 0.999] (De et al. 2024)."""
    a8 = jax.random.uniform(key, shape, jnp.float32, 0.9, 0.999)
    a = a8 ** (1.0 / 8.0)
    return jnp.log(a) - jnp.log1p(-a)


class SlidingWindowMixer(AttentionMixer):
    """Causal attention over the last `window` tokens, with a rolling cache of that size:
    the attention mixer with `cache_mode="rolling"` and no sinks.

    Cache: `{"k", "v": [B, W, K, D], "segment_ids": [B, W] (0 = empty), "positions":
    [B, W] (-1 = empty), "end": int32}`, a ring: position p in slot `p % W`.
    """

    window: int | None = 128
    cache_mode: str = "rolling"


def _register_linear(kind, options):
    @register_mixer(kind, module=LinearAttentionMixer,
                    only=("impl", "chunk_size", "conv_size", *options))
    def build(model, options, **module_kwargs):
        return LinearAttentionMixer(
            kind=kind, num_heads=model.num_heads,
            head_dim=model.head_dim or model.d_model // model.num_heads,
            dtype=jnp.dtype(model.dtype), **options, **module_kwargs)

    return build


for _kind, _options in KIND_OPTIONS.items():
    _register_linear(_kind, _options)


@register_mixer("rglru", module=RGLRUMixer, extra={"width": None})
def build_rglru(model, options, **module_kwargs):
    options = dict(options)
    width = options.pop("width") or model.d_model
    return RGLRUMixer(width=width, dtype=jnp.dtype(model.dtype), **options, **module_kwargs)


@register_mixer("swa", module=SlidingWindowMixer,
                only=("impl", "window", "softcap", "rope_base", "rope_fraction"))
def build_swa(model, options, **module_kwargs):
    if not isinstance(options["window"], int) or options["window"] < 1:
        raise ValueError(f"config.model.mixer_options.swa.window must be a positive int; "
                         f"got {options['window']!r}")
    return SlidingWindowMixer(
        num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim or model.d_model // model.num_heads,
        dtype=jnp.dtype(model.dtype), **options, **module_kwargs)
