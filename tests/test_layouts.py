"""Token layouts for sequence parallelism: permutations and per-shard positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.parallel import LAYOUTS, from_layout, layout_order, shard_positions, to_layout


def test_zigzag_gives_shard_r_chunks_r_and_2p_minus_1_minus_r():
    order = layout_order(16, "zigzag", 4).reshape(4, 2, 2)  # [shard, chunk, token]
    for r in range(4):
        np.testing.assert_array_equal(order[r, 0], [2 * r, 2 * r + 1])
        np.testing.assert_array_equal(order[r, 1], [2 * (7 - r), 2 * (7 - r) + 1])


def test_striped_puts_token_i_on_shard_i_mod_p():
    order = layout_order(12, "striped", 4).reshape(4, 3)
    for r in range(4):
        np.testing.assert_array_equal(order[r] % 4, r)
        np.testing.assert_array_equal(np.diff(order[r]), 4)


def test_contiguous_is_identity():
    np.testing.assert_array_equal(layout_order(12, "contiguous", 3), np.arange(12))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_and_shard_positions(layout):
    P, T = 4, 24
    x = jnp.arange(T)[None, :, None] * 10 + jnp.arange(2 * 3).reshape(2, 1, 3)
    laid = to_layout(x, layout, P)
    np.testing.assert_array_equal(from_layout(laid, layout, P), x)
    order = layout_order(T, layout, P)
    assert sorted(order.tolist()) == list(range(T))
    np.testing.assert_array_equal(laid[:, :, 0] // 10, np.broadcast_to(order, (2, T)))
    for r in range(P):
        np.testing.assert_array_equal(shard_positions(T // P, layout, P, r),
                                      order[r * T // P:(r + 1) * T // P])


def test_to_layout_on_other_axis():
    x = jnp.arange(8 * 5).reshape(8, 5)
    np.testing.assert_array_equal(to_layout(x, "striped", 2, axis=0)[:, 0], [0, 10, 20, 30, 5,
                                                                             15, 25, 35])


@pytest.mark.parametrize("layout,length,shards,needed", [
    ("zigzag", 12, 4, 8), ("contiguous", 10, 4, 4), ("striped", 6, 4, 4)])
def test_length_must_divide(layout, length, shards, needed):
    with pytest.raises(ValueError, match=f"divisible by {needed} for layout='{layout}'"):
        layout_order(length, layout, shards)


def test_unknown_layout():
    with pytest.raises(ValueError, match="layout must be one of"):
        to_layout(jnp.zeros((1, 8)), "spiral", 2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vjp_is_the_inverse_permutation(layout):
    x = jnp.arange(2 * 16 * 3, dtype=jnp.float32).reshape(2, 16, 3)
    g = x[::-1] * 0.5
    _, vjp = jax.vjp(lambda x: to_layout(x, layout, 4), x)
    np.testing.assert_array_equal(vjp(g)[0], jnp.take(g, np.argsort(layout_order(16, layout, 4)),
                                                       axis=1))
    _, vjp = jax.vjp(lambda x: from_layout(x, layout, 4), x)
    np.testing.assert_array_equal(vjp(g)[0], to_layout(g, layout, 4))
