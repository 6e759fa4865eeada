"""USP (Ulysses groups joined by a ring) equals single-device reference attention, and the
in-shard_map relayout and group collectives equal their global definitions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from test_ring_attention import check_strategy, make_inputs

from longjax.parallel import sequence_parallel_attention, to_layout
from longjax.parallel.layouts import shard_from_layout, shard_to_layout
from longjax.parallel.mesh import make_mesh
from longjax.parallel.ulysses import group_all_gather, group_all_to_all


# 4 query heads, 2 KV heads: degree 4 repeats K/V heads; sequence=8 with degree 2 is a
# head count Ulysses alone cannot split (4 % 8).
@pytest.mark.parametrize("mesh_sizes,degree,layout,case", [
    ({"data": 2, "sequence": 4}, 2, "zigzag", "causal"),
    ({"data": 2, "sequence": 4}, 4, "zigzag", "window"),
    ({"sequence": 8}, 2, "contiguous", "noncausal"),
    ({"sequence": 8}, 4, "zigzag", "noncausal_window"),
    ({"data": 2, "sequence": 4}, 1, "zigzag", "causal"),
])
def test_usp_fp32_matches_reference(mesh_sizes, degree, layout, case):
    check_strategy("usp", layout, case, jnp.float32, mesh_sizes, ulysses_degree=degree)


def test_usp_bf16_on_explicit_mesh_with_sharded_inputs():
    mesh = jax.make_mesh((2, 4), ("data", "sequence"))
    check_strategy("usp", "zigzag", "window", jnp.bfloat16, None, mesh=mesh, presharded=True,
                   set_mesh=True, ulysses_degree=2)


@pytest.mark.parametrize("strategy", ["all_gather", "ulysses"])
def test_strategies_on_explicit_mesh_with_sharded_inputs(strategy):
    mesh = jax.make_mesh((2, 4), ("data", "sequence"))
    check_strategy(strategy, "striped", "causal", jnp.float32, None, mesh=mesh,
                   presharded=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="usp"), "ulysses_degree is required by strategy='usp'"),
    (dict(strategy="ring", ulysses_degree=2), "ulysses_degree is required by strategy='usp'"),
    (dict(strategy="usp", ulysses_degree=3), "ulysses_degree must be a positive int dividing"),
    (dict(strategy="usp", ulysses_degree=8), "must be divisible by the 8 devices of each"),
    (dict(strategy="usp", ulysses_degree=2, layout="striped"),
     "layout='striped' cannot be split into groups"),
])
def test_usp_bad_arguments(kwargs, match):
    q, k, v, _, _ = make_inputs(jnp.float32)  # 4 heads, T = 32
    with pytest.raises(ValueError, match=match):
        sequence_parallel_attention(q, k, v, mesh=make_mesh({"sequence": 8}), **kwargs)


def _on_axis(fn, mesh_sizes, x):
    mesh = make_mesh(mesh_sizes)
    spec = PartitionSpec(None, "sequence")
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec))(x)


@pytest.mark.parametrize("layout,ring_size", [
    ("zigzag", None), ("zigzag", 4), ("zigzag", 2), ("striped", None), ("contiguous", 2),
    ("striped", "uneven")])
def test_shard_to_layout_equals_the_global_reordering(layout, ring_size):
    """Contiguous shards in, `to_layout`'s order over `ring_size` shards out, and back;
    the VJP is the inverse permutation. "uneven": 4 local tokens over 8 shards."""
    T = 32 if ring_size == "uneven" else 64
    ring_size = None if ring_size == "uneven" else ring_size
    x = jnp.arange(2 * T * 3, dtype=jnp.float32).reshape(2, T, 3)
    go = functools.partial(shard_to_layout, layout=layout, axis_name="sequence",
                           ring_size=ring_size)
    back = functools.partial(shard_from_layout, layout=layout, axis_name="sequence",
                             ring_size=ring_size)
    laid = _on_axis(go, {"sequence": 8}, x)
    np.testing.assert_array_equal(laid, to_layout(x, layout, ring_size or 8))
    np.testing.assert_array_equal(_on_axis(back, {"sequence": 8}, laid), x)
    grad = jax.grad(lambda x: (_on_axis(go, {"sequence": 8}, x) * laid).sum())(x)
    np.testing.assert_array_equal(grad, x)  # <to_layout(x), to_layout(x)>' = x


@pytest.mark.parametrize("group_size", [1, 2, 4, 8])
def test_group_collectives_equal_their_definition(group_size):
    """Device p of a group of U sends chunk u of its heads to member u; each member ends
    with the group's tokens (in member order) for its heads; gathers likewise."""
    P, U, L = 8, group_size, 4
    x = jnp.arange(P * L * U * 2, dtype=jnp.float32).reshape(1, P * L, U * 2)  # [1, T, heads]
    got = _on_axis(lambda s: group_all_to_all(s, "sequence", U, 2, 1), {"sequence": 8}, x)
    shards = np.asarray(x).reshape(P, L, U, 2)  # [device, token, head chunk, 2]
    want = [np.concatenate([shards[p - p % U + m, :, p % U] for m in range(U)], 0)
            for p in range(P)]
    np.testing.assert_array_equal(got, np.concatenate(want, 0)[None])
    gathered = _on_axis(lambda s: group_all_gather(s, "sequence", U, 1), {"sequence": 8},
                        x[..., 0])
    want = [np.asarray(x[0, (p - p % U) * L:(p - p % U + U) * L, 0]) for p in range(P)]
    np.testing.assert_array_equal(gathered, np.concatenate(want)[None])
