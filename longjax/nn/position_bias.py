"""Learned relative-position score biases for the attention mixer and absolute position
embeddings for the LM; the math is in `longjax.ops.positions`.

Each bias module maps query positions `[B, Tq]` and key positions `[B, Tk]` to an
additive fp32 score bias `[B, H, Tq, Tk]`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from longjax.ops import positions as positions_lib

ABSOLUTE_EMBEDDINGS = ("none", "sinusoidal", "learned")


def _inverse_softplus(y):
    return math.log(math.expm1(y))


class T5Bias(nn.Module):
    """A learned scalar per head and relative-position bucket (Raffel et al. 2020)."""

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128

    @nn.compact
    def __call__(self, q_positions, kv_positions):
        table = self.param("table", nn.initializers.zeros, (self.num_buckets, self.num_heads))
        buckets = positions_lib.t5_buckets(
            positions_lib.relative_distance(q_positions, kv_positions),
            num_buckets=self.num_buckets, max_distance=self.max_distance)
        return jnp.moveaxis(table[buckets], -1, 1)


class KerpleLogBias(nn.Module):
    """KERPLE-log: -r1 log(1 + r2 |i - j|) with r1, r2 > 0 per head through a softplus,
    both starting at 1 (Chi et al. 2022)."""

    num_heads: int

    @nn.compact
    def __call__(self, q_positions, kv_positions):
        init = nn.initializers.constant(_inverse_softplus(1.0))
        r1 = jax.nn.softplus(self.param("r1", init, (self.num_heads,)))
        r2 = jax.nn.softplus(self.param("r2", init, (self.num_heads,)))
        return positions_lib.kerple_log_bias(
            positions_lib.relative_distance(q_positions, kv_positions), r1, r2)


class FireBias(nn.Module):
    """FIRE: an MLP (1 -> `hidden` ReLU -> heads) of the log-normalised distance, with the
    log scale c and the threshold L learned (Li et al. 2023, Sec. 3; c starts at 1 and L
    at `threshold_init`). The MLP's input is a scalar per (query, key), so it is summed
    one hidden unit at a time: memory `[B, Tq, Tk, H]`, never `[B, Tq, Tk, hidden]`."""

    num_heads: int
    hidden: int = 32
    threshold_init: float = 512.0

    @nn.compact
    def __call__(self, q_positions, kv_positions):
        c = jax.nn.softplus(self.param("c", nn.initializers.constant(_inverse_softplus(1.0)),
                                       ()))
        threshold = jnp.abs(self.param("threshold",
                                       nn.initializers.constant(self.threshold_init), ()))
        u = positions_lib.fire_inputs(q_positions, kv_positions, c, threshold)
        first, second = nn.Dense(self.hidden, name="hidden"), nn.Dense(self.num_heads, name="out")
        second(first(jnp.zeros((1, 1))))  # creates (or binds) both layers' parameters
        w1, b1 = first.variables["params"]["kernel"][0], first.variables["params"]["bias"]
        w2, b2 = second.variables["params"]["kernel"], second.variables["params"]["bias"]

        def add_unit(k, acc):
            return acc + nn.relu(w1[k] * u + b1[k])[..., None] * w2[k]

        out = jax.lax.fori_loop(0, self.hidden, add_unit,
                                jnp.broadcast_to(b2, (*u.shape, self.num_heads)))
        return jnp.moveaxis(out, -1, 1)


class AbsolutePositions(nn.Module):
    """Position embeddings `[B, T, d_model]` added to the token embeddings: `sinusoidal`
    (Vaswani et al. 2017) or a `learned` table of `max_position` rows (Radford et al.
    2018). Positions outside the table are a ValueError when they are known (not traced)
    and NaN rows under jit, never a silently clamped row."""

    kind: str
    d_model: int
    max_position: int = 0

    @nn.compact
    def __call__(self, positions):
        if self.kind == "sinusoidal":
            return positions_lib.sinusoidal_embedding(positions, self.d_model)
        table = self.param("table", nn.initializers.normal(0.02),
                           (self.max_position, self.d_model))
        try:
            lowest, highest = int(jnp.min(positions)), int(jnp.max(positions))
        except jax.errors.ConcretizationTypeError:  # traced: NaN rows below
            lowest, highest = 0, 0
        if lowest < 0 or highest >= self.max_position:
            raise ValueError(f"positions {lowest}..{highest} fall outside the learned position "
                             f"table of config.model.max_position={self.max_position} rows")
        return table.at[positions].get(mode="fill", fill_value=jnp.nan)
