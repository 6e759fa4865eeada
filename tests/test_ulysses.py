"""Ulysses and all-gather sequence parallelism equal single-device reference attention."""

import jax.numpy as jnp
import pytest
from test_ring_attention import check_strategy, make_inputs

from longjax.parallel import sequence_parallel_attention
from longjax.parallel.mesh import make_mesh

MESH = {"data": 2, "sequence": 4}  # 4 heads split over 4 devices for Ulysses


@pytest.mark.parametrize("strategy", ["ulysses", "all_gather"])
@pytest.mark.parametrize("layout,case", [
    ("zigzag", "causal"), ("contiguous", "noncausal"), ("striped", "window")])
def test_fp32_matches_reference(strategy, layout, case):
    check_strategy(strategy, layout, case, jnp.float32, MESH)


@pytest.mark.parametrize("strategy", ["ulysses", "all_gather"])
def test_bf16_matches_reference(strategy):
    check_strategy(strategy, "zigzag", "noncausal_window", jnp.bfloat16, MESH)


def test_ulysses_with_fewer_kv_heads_than_devices():
    mesh = {"data": 2, "tensor": 2, "sequence": 2}  # 1 kv head per device, repeated to 2
    check_strategy("ulysses", "zigzag", "causal", jnp.float32, mesh)


def test_ulysses_heads_must_divide():
    q, k, v, _, _ = make_inputs(jnp.float32)  # 4 heads
    with pytest.raises(ValueError, match="number of heads \\(4 on this device\\) must be "
                                         "divisible by the 8 devices of each all-to-all "
                                         "group of axis 'sequence'"):
        sequence_parallel_attention(q, k, v, mesh=make_mesh({"sequence": 8}),
                                    strategy="ulysses")
