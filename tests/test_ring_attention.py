"""Ring attention on 8 simulated devices equals single-device reference attention."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from longjax.ops.attention import attention_mask, reference_attention
from longjax.parallel import (
    layout_order,
    ring_attention,
    sequence_parallel_attention,
    to_layout,
)
from longjax.parallel.mesh import make_mesh

# Every case has packed documents (crossing shard borders, with padding) and GQA (4 q heads,
# 2 kv heads).
CASES = {
    "causal": dict(causal=True),
    "noncausal": dict(causal=False),
    "window": dict(causal=True, window=5, num_sinks=2, softcap=20.0),
    "noncausal_window": dict(causal=False, window=7),
}
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}  # max |error| / max |reference|


def make_inputs(dtype, B=2, T=32, H=4, K=2, D=8):
    kq, kk, kv, kd = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (B, T, H, D), dtype)
    k = jax.random.normal(kk, (B, T, K, D), dtype)
    v = jax.random.normal(kv, (B, T, K, D), dtype)
    dout = jax.random.normal(kd, (B, T, H, D), dtype)
    docs = [[1] * 10 + [2] * (T - 13) + [0] * 3, [1] * 3 + [2] * (T - 3)]
    segment_ids = jnp.asarray(docs[:B], jnp.int32)
    return q, k, v, dout, segment_ids


def check_strategy(strategy, layout, case, dtype, mesh_sizes, mesh=None, *, presharded=False,
                   set_mesh=False, **strategy_options):
    """Output and dq/dk/dv of `strategy` on `mesh_sizes` (or `mesh`) match reference
    attention. `presharded`: q, k, v arrive sharded over the mesh's batch and sequence
    axes; `set_mesh`: the mesh is the current one (`jax.set_mesh`), not an argument."""
    q, k, v, dout, segment_ids = make_inputs(dtype)
    mesh = make_mesh(mesh_sizes) if mesh is None else mesh
    options = dict(segment_ids=segment_ids, **CASES[case])

    def value_and_grads(attend, q, k, v):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, *vjp(dout)

    attend = functools.partial(sequence_parallel_attention, mesh=None if set_mesh else mesh,
                               strategy=strategy, layout=layout, **options, **strategy_options)
    inputs = (q, k, v)
    if presharded:
        batch = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
        sharding = NamedSharding(mesh, PartitionSpec(batch, "sequence"))
        inputs = tuple(jax.device_put(x, sharding) for x in inputs)
    sharded = jax.jit(functools.partial(value_and_grads, attend))
    with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
        sharded = sharded(*inputs)
    expected = value_and_grads(functools.partial(reference_attention, **options), q, k, v)
    for name, got, want in zip(("out", "dq", "dk", "dv"), sharded, expected, strict=True):
        assert got.dtype == want.dtype, name
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err}"


# Each layout meets causal and non-causal masks, windows (with sinks and soft-capping) and
# packed GQA inputs in fp32; bf16 also runs with the batch split over `data`.
@pytest.mark.parametrize("layout,case", [
    ("contiguous", "noncausal"), ("contiguous", "window"), ("zigzag", "causal"),
    ("zigzag", "noncausal_window"), ("striped", "causal"), ("striped", "window")])
def test_ring_fp32_matches_reference(layout, case):
    check_strategy("ring", layout, case, jnp.float32, {"sequence": 8})


@pytest.mark.parametrize("layout,case", [("zigzag", "window"), ("striped", "noncausal")])
def test_ring_bf16_matches_reference(layout, case):
    check_strategy("ring", layout, case, jnp.bfloat16, {"data": 2, "sequence": 4})


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
@pytest.mark.parametrize("presharded,set_mesh", [(False, False), (True, False), (True, True)])
def test_ring_under_jit_on_explicit_and_auto_meshes(axis_type, presharded, set_mesh):
    """jax.make_mesh's default mesh (explicit axes) and an auto one, with inputs already
    sharded over the sequence and the mesh passed or set with `jax.set_mesh`."""
    types = {"explicit": jax.sharding.AxisType.Explicit, "auto": jax.sharding.AxisType.Auto}
    mesh = jax.make_mesh((2, 4), ("data", "sequence"), axis_types=(types[axis_type],) * 2)
    check_strategy("ring", "zigzag", "causal", jnp.float32, None, mesh=mesh,
                   presharded=presharded, set_mesh=set_mesh)


def test_ring_with_heads_over_tensor_axis():
    check_strategy("ring", "zigzag", "causal", jnp.float32, {"tensor": 2, "sequence": 4})


def expected_tiles(layout, P, T, block, window):
    """Tiles with an unmasked (query, key) pair, per device: counted on the global mask."""
    order = layout_order(T, layout, P)
    mask = np.asarray(attention_mask(T, T, causal=True, window=window)[0, 0])
    local = T // P
    counts = []
    for r in range(P):
        rows = order[r * local:(r + 1) * local].reshape(-1, block)
        cols = order.reshape(-1, block)
        counts.append(sum(bool(mask[np.ix_(qi, kj)].any()) for qi in rows for kj in cols))
    return counts


@pytest.mark.parametrize("layout,window", [
    ("contiguous", None), ("zigzag", None), ("striped", None), ("zigzag", 6)])
def test_causal_tile_count_is_exactly_the_unmasked_tiles(layout, window):
    P, T, block = 4, 64, 4
    q, k, v, _, _ = make_inputs(jnp.float32, B=1, T=T, H=2, K=1, D=4)
    mesh = make_mesh({"data": 2, "sequence": P})
    spec = PartitionSpec(None, "sequence")

    def local(q, k, v):
        _, count = ring_attention(q, k, v, axis_name="sequence", causal=True, window=window,
                                  layout=layout, block_size=block, return_tile_count=True)
        return count[None]

    sharded = jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=PartitionSpec("sequence"),
                            check_vma=False)
    counts = jax.jit(sharded)(*(to_layout(x, layout, P) for x in (q, k, v)))
    expected = expected_tiles(layout, P, T, block, window)
    np.testing.assert_array_equal(np.asarray(counts), expected)
    if layout == "contiguous":
        assert max(expected) > min(expected) + 1  # the imbalance zigzag and striped remove
    elif window is None:
        assert max(expected) - min(expected) <= 1
    assert sum(expected) < P * (T // P // block) * (T // block)  # masked tiles were skipped


def test_errors():
    q, k, v, _, _ = make_inputs(jnp.float32)
    mesh = make_mesh({"sequence": 8})
    attend = functools.partial(sequence_parallel_attention, mesh=mesh, causal=True)
    with pytest.raises(ValueError, match="divisible by 16 for layout='zigzag'"):
        attend(q[:, :24], k[:, :24], v[:, :24], layout="zigzag")
    with pytest.raises(ValueError, match="divisible by 8 for layout='contiguous'"):
        attend(q[:, :12], k[:, :12], v[:, :12], layout="contiguous")
    with pytest.raises(ValueError, match="axis_name 'seq' is not an axis of the mesh"):
        attend(q, k, v, axis_name="seq")
    with pytest.raises(ValueError, match="strategy must be one of"):
        attend(q, k, v, strategy="tree")
    with pytest.raises(ValueError, match="block_size must divide"):
        attend(q, k, v, block_size=3)
    with pytest.raises(ValueError, match="impl must be one of"):
        attend(q, k, v, impl="reference")
    with pytest.raises(ValueError, match="batch size 2 must be divisible"):
        sequence_parallel_attention(q, k, v, mesh=make_mesh({"data": 4, "sequence": 2}))
    spec = PartitionSpec(None, "sequence")
    unbound = jax.shard_map(lambda q, k, v: ring_attention(q, k, v, axis_name="ring"),
                            mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    with pytest.raises(ValueError, match="axis_name 'ring' is not a mesh axis bound"):
        unbound(q, k, v)


def test_ring_inside_a_differentiated_layer_scan_keeps_no_per_tile_residuals():
    """A layer scan (`model.scan_layers`) over ring attention, differentiated: the ring's
    custom VJP recomputes from q, k, v, out and lse, so no value holds one entry per tile
    (n * n = 256 tiles of 4 tokens here; a fori_loop over tiles stored each tile's block)."""
    P, T, block = 2, 128, 4
    tiles = (T // P // block) ** 2
    q, k, v, _, _ = make_inputs(jnp.float32, B=1, T=T, H=2, K=1, D=4)
    mesh = make_mesh({"data": 4, "sequence": P})
    spec = PartitionSpec(None, "sequence")
    ring = jax.shard_map(functools.partial(ring_attention, axis_name="sequence", causal=True,
                                           block_size=block),
                         mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)

    def loss(w):
        def layer(x, w_l):
            return jax.checkpoint(ring)(x * w_l, k, v), None
        return jax.lax.scan(layer, q, w)[0].sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(jnp.ones((2, 1, 1, 2, 4))))
    assert f"[{tiles}," not in jaxpr
