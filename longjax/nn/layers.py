"""Building blocks shared by the LM and the mixers: norms, MLPs, projections."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# Parameter names the optimizer never decays (besides every parameter with ndim < 2):
# SSM dynamics as in Gu & Dao 2023, who exempt them from weight decay.
NO_WEIGHT_DECAY: tuple[str, ...] = ()


def dense(features, *, axes, dtype, name=None, use_bias=False, kernel_init=None):
    """A `DenseGeneral` whose kernel carries logical axis names (for sharding rules)."""
    init = kernel_init or nn.initializers.lecun_normal()
    return nn.DenseGeneral(
        features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(init, axes), name=name,
    )


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
