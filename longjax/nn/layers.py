"""Building blocks shared by the LM and the mixers: norms, MLPs, projections."""

from __future__ import annotations

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
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]
    num_input_dims: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, features = self.num_input_dims, tuple(self.features)
        in_axes = tuple(range(n))
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=in_axes,
            out_axis=tuple(range(n, n + len(features))))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                            x.shape[-n:] + features, jnp.float32)
        return jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n)


def dense(features, *, axes, dtype, name=None, num_input_dims=1):
    """A bias-free `Projection` to `features` (an int or a tuple of ints)."""
    features = (features,) if isinstance(features, int) else tuple(features)
    return Projection(features, tuple(axes), num_input_dims, dtype, name=name)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), statistics in fp32."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],), jnp.float32,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


class SwiGLU(nn.Module):
    """Gated MLP `W2 (silu(W1 x) * W3 x)` (Shazeer 2020)."""

    hidden_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        gate = dense(self.hidden_dim, axes=("embed", "mlp"), dtype=self.dtype, name="gate")(x)
        up = dense(self.hidden_dim, axes=("embed", "mlp"), dtype=self.dtype, name="up")(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(x.shape[-1], axes=("mlp", "embed"), dtype=self.dtype, name="down")(h)
