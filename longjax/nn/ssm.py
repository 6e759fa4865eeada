"""State-space mixers: S4D and S4 layers, the Mamba block and the Mamba-2 block.

Registered names: `"s4d"`, `"s4"`, `"mamba"`, `"mamba2"`, with the interface of
`longjax.nn.registry`. Caches hold the SSM state (fp32; complex64 for S4/S4D), the causal
convolution's last inputs (Mamba, Mamba-2) and the last token's segment id, so one call of
T tokens equals T calls of one token, across document borders too.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from longjax.nn.layers import RMSNorm, dense
from longjax.nn.linear import ShortConv, empty_conv_cache
from longjax.nn.registry import register_mixer
from longjax.ops import s4 as s4_lib
from longjax.parallel import recurrent
from longjax.parallel.mesh import sequence_mesh


def _segments(segment_ids, x):
    return (jnp.ones(x.shape[:2], jnp.int32) if segment_ids is None
            else segment_ids.astype(jnp.int32))


def _continued(state, cache_segment, seg):
    """The cached state, zeroed for rows whose first token starts a new document."""
    keep = cache_segment == seg[:, 0]
    return jnp.where(keep.reshape((-1,) + (1,) * (state.ndim - 1)), state, 0)


def _step_impl(impl, cache, T):
    """The scan impl for this call: one decode step (T = 1 through a cache) runs the plain
    recurrence, the same math with less machinery around one token than the chunked scan
    (selective scan on CPU, batch 4: 32 against 48 us at D=128, 0.16 against 0.24 ms at
    D=1536)."""
    return "reference" if cache is not None and T == 1 and impl in ("auto", "xla") else impl


def _log_uniform_dt(key, shape, dt_min, dt_max, floor=1e-4):
    dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max)))
    return jnp.maximum(dt, floor)


def _dt_bias_init(dt_min, dt_max):
    """Inverse softplus of dt ~ logU[dt_min, dt_max], so softplus(bias) starts there
    (Gu & Dao 2023, Section 3.6 and their reference code)."""

    def init(key, shape, dtype=jnp.float32):
        dt = _log_uniform_dt(key, shape, dt_min, dt_max)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def _param(module, name, init, shape, axes):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _conv(module, channels, x, seg, conv_cache, d_conv, dtype):
    """Causal depthwise convolution (never across documents), bias, SiLU."""
    y, conv_cache = ShortConv(d_conv, dtype, name="conv")(x, seg, conv_cache)
    bias = _param(module, "conv_bias", nn.initializers.zeros, (channels,), ("mlp",))
    return nn.silu(y + bias.astype(dtype)), conv_cache


class MambaMixer(nn.Module):
    """The Mamba block (Gu & Dao 2023, Figure 3): `out(SSM(silu(conv(W_x x))) * silu(W_z x))`
    with input-dependent `dt, B, C` (the selective scan), S4D-Real `A`, `D = 1`.

    Cache: `{"ssm": [B, E, N] fp32, "conv": ShortConv cache, "segment": [B]}`, E = expand d.

    Training-free options for evaluation beyond the training length (1 / None: off).
    Stuffed Mamba's mitigations of state collapse (Chen et al. 2024, arXiv 2410.07145v1,
    "forget more and remember less" and "state normalization"; the delta, A and B
    multipliers of the authors' analysis code): `delta_scale` multiplies the step size
    (decay and input both), `decay_scale` multiplies A (the decay exp(delta A) alone:
    > 1 forgets more), `input_scale` multiplies B (< 1 remembers less), and `state_norm`
    scales each channel's state `[N]` down to that L2 norm after every update (a
    token-by-token scan). `decimation = (K, R)` (DeciMamba, Ben-Kish et al. 2024, arXiv
    2406.14528): of the first T - R tokens only the K with the largest L2 norm of delta
    over the channels (the paper's "norm of delta_t", as in the authors' code) go on, in
    order, with the last R tokens; the call returns `(y [B, K + R, d], cache, kept
    [B, K + R])` and the LM gathers the rest of its stream (`longjax.nn.lm`). A call of
    at most K + R tokens (a decode step) is not decimated: the paper decimates the
    prompt only.
    """

    d_model: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    impl: str = "auto"
    chunk_size: int | None = None
    delta_scale: float = 1.0
    decay_scale: float = 1.0
    input_scale: float = 1.0
    state_norm: float | None = None
    decimation: tuple[int, int] | None = None
    dtype: jnp.dtype = jnp.float32

    @property
    def inner(self):
        return self.expand * self.d_model

    def init_cache(self, batch_size, max_length, dtype=None):
        return {"ssm": jnp.zeros((batch_size, self.inner, self.d_state), jnp.float32),
                "conv": empty_conv_cache(batch_size, self.d_conv, self.inner, dtype or self.dtype),
                "segment": jnp.full((batch_size,), -1, jnp.int32)}

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        _check_eval_options(self, "config.model.mixer_options.mamba")
        _check_decimation(self)
        B, T, _ = x.shape
        E, N = self.inner, self.d_state
        rank = math.ceil(self.d_model / 16) if self.dt_rank == "auto" else self.dt_rank
        seg = _segments(segment_ids, x)
        fresh = self.init_cache(B, T) if cache is None else cache
        xz = dense(2 * E, axes=("embed", "mlp"), dtype=self.dtype, name="in_proj")(x)
        u, z = jnp.split(xz, 2, axis=-1)
        u, conv_cache = _conv(self, E, u, seg, fresh["conv"], self.d_conv, self.dtype)
        dt_BC = dense(rank + 2 * N, axes=("mlp", "ssm_proj"), dtype=self.dtype, name="x_proj")(u)
        dt, Bm, Cm = jnp.split(dt_BC, [rank, rank + N], axis=-1)
        dt = dense(E, axes=("ssm_proj", "mlp"), dtype=self.dtype, name="dt_proj")(dt)
        dt_bias = _param(self, "dt_bias", _dt_bias_init(self.dt_min, self.dt_max), (E,),
                         ("mlp",))
        A_log = _param(self, "A_log", lambda k, s, d=jnp.float32: jnp.log(
            jnp.broadcast_to(jnp.arange(1, N + 1, dtype=d), s)), (E, N), ("mlp", "ssm_state"))
        D = _param(self, "D", nn.initializers.ones, (E,), ("mlp",))
        delta = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias) * self.delta_scale
        kept = None
        if self.decimation is not None and T > sum(self.decimation):
            kept = decimation_indices(delta, *self.decimation)
            u, delta, Bm, Cm, z, seg = (jnp.take_along_axis(
                v, kept.reshape(kept.shape + (1,) * (v.ndim - 2)), axis=1)
                for v in (u, delta, Bm, Cm, z, seg))
            segment_ids = None if segment_ids is None else seg
        initial = None if cache is None else _continued(cache["ssm"], cache["segment"], seg)
        y, state = recurrent.selective_scan(
            u, delta, -jnp.exp(A_log) * self.decay_scale, Bm * self.input_scale, Cm, D=D, z=z,
            initial_state=initial, return_final_state=True, segment_ids=segment_ids,
            impl=_step_impl(self.impl, cache, T), chunk_size=self.chunk_size,
            **({} if self.state_norm is None else {"state_norm": self.state_norm}))
        out = dense(self.d_model, axes=("mlp", "embed"), dtype=self.dtype, name="out_proj")(y)
        if cache is not None:
            cache = {"ssm": state, "conv": conv_cache, "segment": seg[:, -1]}
        return (out, cache) if self.decimation is None else (out, cache, kept)


def decimation_indices(delta, keep: int, keep_last: int):
    """DeciMamba's token choice (Ben-Kish et al. 2024): the indices `[B, K + R]`,
    ascending, of the `keep` (K) tokens of `delta` `[B, T, E]` (the step sizes after
    softplus) with the largest L2 norm over the channels among the first T - R, then the
    last `keep_last` (R) tokens."""
    T = delta.shape[1]
    score = jnp.sqrt(jnp.sum(jnp.square(delta[:, :T - keep_last]), axis=-1))
    _, top = jax.lax.top_k(score, keep)
    last = jnp.broadcast_to(jnp.arange(T - keep_last, T), (delta.shape[0], keep_last))
    return jnp.concatenate([jnp.sort(top, axis=-1), last], axis=-1).astype(jnp.int32)


def _check_eval_options(mixer, where: str) -> None:
    """ValueError naming the Mamba / Mamba-2 evaluation option (`where`: its config path)
    that is out of range."""
    for name in ("delta_scale", "decay_scale", "input_scale"):
        value = getattr(mixer, name)
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{where}.{name} must be a number > 0 (1: off); got {value!r}")
    if mixer.state_norm is not None and not (isinstance(mixer.state_norm, (int, float))
                                             and mixer.state_norm > 0):
        raise ValueError(f"{where}.state_norm must be a number > 0 or None (off); got "
                         f"{mixer.state_norm!r}")


def _check_decimation(mixer) -> None:
    d = mixer.decimation
    if d is not None and not (len(d) == 2 and all(isinstance(v, int) for v in d)
                              and d[0] >= 1 and d[1] >= 0):
        raise ValueError(f"MambaMixer.decimation must be None or (tokens kept >= 1, last "
                         f"tokens always kept >= 0); got {d!r}")


class Mamba2Mixer(nn.Module):
    """The Mamba-2 block (Dao & Gu 2024, Section 7): one input projection to `z, x, B, C, dt`,
    causal conv on `x, B, C`, SSD with scalar-per-head decay, gated RMSNorm
    `norm(y * silu(z))` (over all channels, or with `norm_per_group` over each of the
    `n_groups` slices as in the released code and transformers), output projection.

    Cache: `{"ssm": [B, H, P, N] fp32, "conv": ShortConv cache, "segment": [B]}`.

    Training-free options for evaluation beyond the training length (1 / None: off),
    Stuffed Mamba's mitigations of state collapse (Chen et al. 2024, arXiv 2410.07145v1,
    whose models are Mamba-2), in Mamba-2's terms (`h_t = exp(dt_t A) h_{t-1} +
    dt_t x_t B_t^T` per head): `delta_scale` multiplies each head's step size dt_t (after
    the softplus and dt_bias; the decay exp(dt A) and the input dt x B^T both),
    `decay_scale` multiplies each head's scalar A (the decay alone: > 1 forgets more),
    `input_scale` multiplies B_t of every group (the write alone: < 1 remembers less;
    C is unchanged), and `state_norm` scales each channel's state, the `[N]` row of one
    head's state `[P, N]` at one p, down to that L2 norm after every update (a
    token-by-token scan: `longjax.ops.ssd.ssd`'s `state_norm`). The same in the chunked
    path, the reference scan and decode steps (the options act before the scan).
    """

    d_model: int
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 64
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    A_init_max: float = 16.0
    impl: str = "auto"
    norm_per_group: bool = False
    norm_eps: float = 1e-6
    delta_scale: float = 1.0
    decay_scale: float = 1.0
    input_scale: float = 1.0
    state_norm: float | None = None
    dtype: jnp.dtype = jnp.float32

    def _dims(self):
        E = self.expand * self.d_model
        if E % self.head_dim:
            raise ValueError(f"config.model.mixer_options.mamba2.head_dim={self.head_dim} must "
                             f"divide expand * d_model = {E}")
        H = E // self.head_dim
        if H % self.n_groups:
            raise ValueError(f"config.model.mixer_options.mamba2.n_groups={self.n_groups} must "
                             f"divide the number of heads {H}")
        return E, H, E + 2 * self.n_groups * self.d_state

    def init_cache(self, batch_size, max_length, dtype=None):
        E, H, conv_channels = self._dims()
        return {"ssm": jnp.zeros((batch_size, H, self.head_dim, self.d_state), jnp.float32),
                "conv": empty_conv_cache(batch_size, self.d_conv, conv_channels,
                                         dtype or self.dtype),
                "segment": jnp.full((batch_size,), -1, jnp.int32)}

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        _check_eval_options(self, "config.model.mixer_options.mamba2")
        B, T, _ = x.shape
        E, H, conv_channels = self._dims()
        G, N, P = self.n_groups, self.d_state, self.head_dim
        seg = _segments(segment_ids, x)
        fresh = self.init_cache(B, T) if cache is None else cache
        proj = dense(E + conv_channels + H, axes=("embed", "mlp"), dtype=self.dtype,
                     name="in_proj")(x)
        z, xBC, dt = jnp.split(proj, [E, E + conv_channels], axis=-1)
        xBC, conv_cache = _conv(self, conv_channels, xBC, seg, fresh["conv"], self.d_conv,
                                self.dtype)
        u, Bm, Cm = jnp.split(xBC, [E, E + G * N], axis=-1)
        dt_bias = _param(self, "dt_bias", _dt_bias_init(self.dt_min, self.dt_max), (H,),
                         ("heads",))
        A_log = _param(self, "A_log", lambda k, s, d=jnp.float32: jnp.log(
            jax.random.uniform(k, s, d, 1.0, self.A_init_max)), (H,), ("heads",))
        D = _param(self, "D", nn.initializers.ones, (H,), ("heads",))
        dt = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias) * self.delta_scale
        initial = None if cache is None else _continued(cache["ssm"], cache["segment"], seg)
        y, state = recurrent.ssd(
            u.reshape(B, T, H, P), dt, -jnp.exp(A_log) * self.decay_scale,
            Bm.reshape(B, T, G, N) * self.input_scale, Cm.reshape(B, T, G, N),
            chunk_size=self.chunk_size, D=D, initial_state=initial, return_final_state=True,
            segment_ids=segment_ids, impl=_step_impl(self.impl, cache, T),
            **({} if self.state_norm is None else {"state_norm": self.state_norm}))
        y = y.reshape(B, T, E) * nn.silu(z)
        y = RMSNorm(self.norm_eps, self.dtype, G if self.norm_per_group else 1, name="norm")(y)
        out = dense(self.d_model, axes=("mlp", "embed"), dtype=self.dtype, name="out_proj")(y)
        if cache is not None:
            cache = {"ssm": state, "conv": conv_cache, "segment": seg[:, -1]}
        return out, cache


def _complex(v):
    return jax.lax.complex(v[..., 0], v[..., 1])


def _complex_init(values):
    """Initializer returning the fixed complex `values` `[H, n]` as `[H, n, 2]` reals."""

    def init(key, shape, dtype=jnp.float32):
        v = jnp.broadcast_to(jnp.asarray(values), shape[:-1])
        return jnp.stack([v.real, v.imag], -1).astype(dtype)

    return init


class S4Mixer(nn.Module):
    """An S4D (`variant="s4d"`) or S4 (`variant="s4"`, DPLR HiPPO-LegS) layer on each of the
    d_model channels: `out(gelu(SSM(x) + D x))` (Gu et al. 2022, the S4 block).
    `initialization` and `discretization` apply to S4D; S4 is HiPPO-LegS, bilinear.

    Without a cache it runs in convolution mode (kernel of length T, FFT; restarted at
    document borders, `s4_lib.segment_causal_conv`); with a cache, or with segments under
    a sequence mesh (`sequence_mesh`), in recurrent mode (the state resets at document
    borders).
    Cache: `{"ssm": complex64 [B, d_model, n], "segment": [B]}` (n = N/2 for S4D, N for S4).
    """

    d_model: int
    variant: str = "s4d"
    d_state: int = 64
    initialization: str = "lin"
    discretization: str = "zoh"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dtype: jnp.dtype = jnp.float32

    def _n(self):
        if self.variant not in ("s4d", "s4"):
            raise ValueError(f"S4Mixer: variant must be 's4d' or 's4'; got {self.variant!r}")
        if self.d_state % 2:
            raise ValueError(f"config.model.mixer_options.{self.variant}.d_state must be even; "
                             f"got {self.d_state}")
        return self.d_state // 2 if self.variant == "s4d" else self.d_state

    def init_cache(self, batch_size, max_length, dtype=None):
        return {"ssm": jnp.zeros((batch_size, self.d_model, self._n()), jnp.complex64),
                "segment": jnp.full((batch_size,), -1, jnp.int32)}

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        B, T, H = x.shape
        n = self._n()
        if self.variant == "s4d":
            Lambda0, B0 = s4_lib.s4d_init(self.d_state, self.initialization)
            p = None
        else:
            Lambda0, p0, B0 = s4_lib.dplr_legs(self.d_state)
            p = _complex(_param(self, "ssm_P", _complex_init(p0), (H, n, 2),
                                ("embed", "ssm_state", None)))
        axes = ("embed", "ssm_state")
        log_neg_re = _param(self, "Lambda_log_neg_re", lambda k, s, d=jnp.float32: jnp.broadcast_to(
            jnp.log(-Lambda0.real), s).astype(d), (H, n), axes)
        im = _param(self, "Lambda_im", lambda k, s, d=jnp.float32: jnp.broadcast_to(
            Lambda0.imag, s).astype(d), (H, n), axes)
        Lambda = jax.lax.complex(-jnp.exp(log_neg_re), im)
        Bc = _complex(_param(self, "ssm_B", _complex_init(B0), (H, n, 2), axes + (None,)))
        C = _complex(_param(self, "ssm_C", nn.initializers.normal(0.5**0.5), (H, n, 2),
                            axes + (None,)))
        log_dt = _param(self, "log_dt", lambda k, s, d=jnp.float32: jnp.log(
            _log_uniform_dt(k, s, self.dt_min, self.dt_max)), (H,), ("embed",))
        D = _param(self, "D", nn.initializers.ones, (H,), ("embed",))
        dt = jnp.exp(log_dt)
        seg = _segments(segment_ids, x)
        if cache is None and (segment_ids is None or sequence_mesh() is None):
            if p is None:
                K = s4_lib.s4d_kernel(Lambda, Bc, C, dt, T, self.discretization)
            else:
                K = s4_lib.s4_kernel(Lambda, p, Bc, C, dt, T)
            y = (s4_lib.causal_conv(x, K) if segment_ids is None
                 else s4_lib.segment_causal_conv(x, K, segment_ids))
            state = None
        else:
            initial = None if cache is None else _continued(cache["ssm"], cache["segment"], seg)
            if p is None:
                Ab, Bb = s4_lib.discretize(Lambda, Bc, dt, self.discretization)
                y, state = recurrent.s4d_recurrence(x, Ab, Bb, C, initial_state=initial,
                                                    segment_ids=segment_ids,
                                                    impl=_step_impl("auto", cache, T))
            else:
                Ab, Bb = s4_lib.s4_dense(Lambda, p, Bc, dt)
                y, state = recurrent.s4_recurrence(x, Ab, Bb, C, initial_state=initial,
                                                   segment_ids=segment_ids)
        y = nn.gelu(y + D * x.astype(jnp.float32)).astype(self.dtype)
        out = dense(self.d_model, axes=("mlp", "embed"), dtype=self.dtype, name="out_proj")(y)
        if cache is not None:
            cache = {"ssm": state, "segment": seg[:, -1]}
        return out, cache


# decimation is set per layer by the LM from config.model.decimation, not a mixer option
@register_mixer("mamba", module=MambaMixer, from_model=("decimation",))
def build_mamba(model, options, **module_kwargs):
    return MambaMixer(d_model=model.d_model, dtype=jnp.dtype(model.dtype), **options,
                      **module_kwargs)


@register_mixer("mamba2", module=Mamba2Mixer, from_model=("norm_eps",))
def build_mamba2(model, options, **module_kwargs):
    return Mamba2Mixer(d_model=model.d_model, norm_eps=model.norm_eps,
                       dtype=jnp.dtype(model.dtype), **options, **module_kwargs)


@register_mixer("s4d", module=S4Mixer, from_model=("variant",))
def build_s4d(model, options, **module_kwargs):
    return S4Mixer(d_model=model.d_model, variant="s4d", dtype=jnp.dtype(model.dtype),
                   **options, **module_kwargs)


@register_mixer("s4", module=S4Mixer, only=("d_state", "dt_min", "dt_max"))
def build_s4(model, options, **module_kwargs):
    return S4Mixer(d_model=model.d_model, variant="s4", dtype=jnp.dtype(model.dtype),
                   **options, **module_kwargs)
