"""Building blocks shared by the LM and the mixers: norms, MLPs, projections."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

# Parameter names the optimizer never decays (besides every parameter with ndim < 2):
# SSM dynamics as in Gu & Dao 2023, who exempt them from weight decay.
NO_WEIGHT_DECAY: tuple[str, ...] = ()
NO_WEIGHT_DECAY += ("A_log", "dt_bias", "D", "conv_bias", "log_dt", "Lambda_log_neg_re", "Lambda_im", "ssm_B", "ssm_P")  # noqa: E501  SSM mixers (longjax.nn.ssm)


class Projection(nn.Module):
    """`x[..., *in] @ W[*in, *features]` over the last `num_input_dims` axes of x.

    The kernel carries logical axis names `axes` (one per kernel dimension) for the
    sharding rules, and is initialised with fan-in scaling over all input dimensions.
    With `use_bias`, a bias `[*features]` (zeros at init) is added.
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]
    num_input_dims: int = 1
    dtype: jnp.dtype = jnp.float32
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        n, features = self.num_input_dims, tuple(self.features)
        in_axes = tuple(range(n))
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=in_axes,
            out_axis=tuple(range(n, n + len(features))))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                            x.shape[-n:] + features, jnp.float32)
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, self.axes[n:]), features, jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def dense(features, *, axes, dtype, name=None, num_input_dims=1, use_bias=False):
    """A `Projection` to `features` (an int or a tuple of ints), bias-free by default."""
    features = (features,) if isinstance(features, int) else tuple(features)
    return Projection(features, tuple(axes), num_input_dims, dtype, use_bias, name=name)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), statistics in fp32; with
    `groups` > 1 each of that many equal slices of the channels is normalised on its own
    (Mamba-2's gated norm, whose groups are its B/C groups)."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    groups: int = 1

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],), jnp.float32,
        )
        x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, -1)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y.reshape(x.shape) * scale).astype(self.dtype)


# Gated MLPs by `config.model.mlp` name: the activation of the gate (GeGLU with the tanh
# approximation of GELU, as Gemma's `gelu_pytorch_tanh`). "none": blocks without an MLP.
GATED_MLPS = {"swiglu": nn.silu, "geglu": functools.partial(nn.gelu, approximate=True)}
MLPS = (*GATED_MLPS, "none")


class GatedMLP(nn.Module):
    """Gated MLP `W2 (act(W1 x) * W3 x)` (Shazeer 2020), `kind` a `GATED_MLPS` name."""

    hidden_dim: int
    dtype: jnp.dtype = jnp.float32
    kind: str = "swiglu"

    @nn.compact
    def __call__(self, x):
        gate = dense(self.hidden_dim, axes=("embed", "mlp"), dtype=self.dtype, name="gate")(x)
        up = dense(self.hidden_dim, axes=("embed", "mlp"), dtype=self.dtype, name="up")(x)
        h = nn.with_logical_constraint(GATED_MLPS[self.kind](gate) * up,
                                       ("batch", "length", "mlp"))
        return dense(x.shape[-1], axes=("mlp", "embed"), dtype=self.dtype, name="down")(h)
