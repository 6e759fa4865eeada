"""Sequence-parallel linear-attention ops and RG-LRU (sequence=8, simulated) == unsharded."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.ops import linear_attention as la
from longjax.ops.rglru import rg_lru
from longjax.parallel.mesh import make_mesh
from longjax.parallel.sequence_linear import (
    OPS,
    sequence_parallel_linear,
    sequence_parallel_rg_lru,
)

B, T, H, DK, DV = 2, 48, 2, 4, 3  # 8 shards of 6 tokens, chunks of 4 (the last one short)
# Borders inside a shard, exactly on a shard border (token 24) and a padding run.
SEGMENTS = jnp.array([[1] * 10 + [2] * 14 + [3] * 24, [1] * 30 + [0] * 6 + [4] * 12])


@functools.cache
def _mesh():
    return make_mesh({"sequence": 8})


def _arrays():
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    k = normal(B, T, H, DK)
    return {
        "q": normal(B, T, H, DK), "k": k / jnp.linalg.norm(k, axis=-1, keepdims=True),
        "v": normal(B, T, H, DV),
        "g": jax.nn.log_sigmoid(normal(B, T, H) + 2.0),
        "beta": jax.nn.sigmoid(normal(B, T, H)),
        "state": normal(B, H, DK, DV) * 0.5,
    }


@pytest.mark.parametrize("op", sorted(OPS))
def test_sharded_equals_unsharded(op):
    x = _arrays()
    fn, names = OPS[op]
    if op == "gla":
        x["g"] = jnp.repeat(x["g"][..., None], DK, -1) * jnp.linspace(0.5, 1.5, DK)
    if op == "based":
        state = None  # its state is [B, H, 1 + F + F^2, Dv + 1]; covered by the others
    elif op == "linear_attention":
        state = jnp.concatenate([x["state"], jnp.ones((B, H, DK, 1))], -1)
    else:
        state = x["state"]
    kwargs = {"normalize": True} if op == "linear_attention" else {}
    args = [x[n] for n in names]
    want, want_state = jax.jit(lambda *a: fn(
        *a, segment_ids=SEGMENTS, initial_state=state, return_final_state=True, impl="xla",
        chunk_size=4, **kwargs))(*args)
    got, got_state = sequence_parallel_linear(
        op, *args, mesh=_mesh(), segment_ids=SEGMENTS, initial_state=state,
        return_final_state=True, chunk_size=4, **kwargs)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(got_state, want_state, atol=2e-5, rtol=1e-4)


def test_sharded_gradients_equal_unsharded():
    x = _arrays()
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])

    def loss(sharded, *args):
        if sharded:
            o = sequence_parallel_linear("gated_delta_rule", *args, mesh=_mesh(),
                                         segment_ids=SEGMENTS, chunk_size=4)
        else:
            o = la.gated_delta_rule(*args, segment_ids=SEGMENTS, chunk_size=4)
        return jnp.sum(o * jnp.sin(jnp.arange(DV)))

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4, 5)), static_argnums=0)
    for a, b in zip(grad(True, *args), grad(False, *args), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("with_state", [False, True])
def test_sharded_rg_lru_equals_unsharded(with_state):
    rng = np.random.default_rng(1)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    x, r, i = normal(B, T, 5), jax.nn.sigmoid(normal(B, T, 5)), jax.nn.sigmoid(normal(B, T, 5))
    a_param, h0 = normal(5) + 2.0, normal(B, 5) if with_state else None
    want, want_h = jax.jit(lambda *a: rg_lru(*a, segment_ids=SEGMENTS, initial_state=h0,
                                             return_final_state=True))(x, r, i, a_param)
    got, got_h = sequence_parallel_rg_lru(x, r, i, a_param, mesh=_mesh(), segment_ids=SEGMENTS,
                                          initial_state=h0, return_final_state=True)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_h, want_h, atol=1e-5, rtol=1e-5)


def test_bad_input_raises():
    x = _arrays()
    with pytest.raises(ValueError, match="op must be one of"):
        sequence_parallel_linear("mamba", x["q"], x["k"], x["v"], mesh=_mesh())
    with pytest.raises(ValueError, match="takes the per-token arrays"):
        sequence_parallel_linear("gla", x["q"], x["k"], x["v"], mesh=_mesh())
    with pytest.raises(ValueError, match="must be divisible by the 'sequence' mesh axis"):
        sequence_parallel_linear("retention", x["q"][:, :44], x["k"][:, :44], x["v"][:, :44],
                                 mesh=_mesh())
