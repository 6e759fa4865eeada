"""Every Pallas kernel lowered for real targets from this CPU host, through the public ops.

Lowering (`jax.jit(f).trace(...).lower(lowering_platforms=...)`) runs the Triton lowering
for `cuda` and the Mosaic lowering for TPU, which refuse what the interpreter accepts:
block shapes a target cannot tile, kernels without their backend's compiler parameters
(JAX 0.10 sends a GPU kernel without Triton parameters to Mosaic GPU), ops a target
lacks. The TPU lowering asks for the chip generation, pinned here by an abstract device.
Each case lowers one function holding the forward and the backward kernels (attention,
ring-attention tiles in `shard_map`, the selective scan); the matrix
covers every feature and width class once per target, not their product.
"""

import contextlib

import jax
import jax.numpy as jnp
import pytest
from jax._src import mesh as mesh_lib
from jax.sharding import PartitionSpec as P

from longjax.ops.attention import dot_product_attention
from longjax.ops.selective_scan import selective_scan
from longjax.parallel.ring_attention import ring_attention

TPU_KINDS = {"v4": ("TPU v4", 2), "v5e": ("TPU v5 lite", 1), "v5p": ("TPU v5p", 2),
             "v6e": ("TPU v6 lite", 1)}
GPU_PLATFORMS = ("cuda", "rocm")
TARGETS = ("cuda",) + tuple(TPU_KINDS)


def _abstract_mesh(target, size=1, axis="x"):
    """A mesh of `size` devices of `target`: the TPU generation is the one the Mosaic
    lowering asks for (nothing to pin for a GPU)."""
    device = None
    if target not in GPU_PLATFORMS:
        kind, cores = TPU_KINDS[target]
        device = mesh_lib.AbstractDevice(device_kind=kind, num_cores=cores, platform="tpu")
    return jax.sharding.AbstractMesh((size,), (axis,), abstract_device=device)


@contextlib.contextmanager
def _target_device(target):
    with jax.sharding.use_abstract_mesh(_abstract_mesh(target)):
        yield


def lower(fn, args, target):
    """StableHLO text of `fn` lowered for `target` (a GPU platform or a TPU generation)."""
    platform = target if target in GPU_PLATFORMS else "tpu"
    with _target_device(target):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _kernel_calls(text, target):
    """How many kernels the lowered text calls: Triton kernels on cuda, Mosaic on TPU."""
    name = "__gpu$xla.gpu.triton" if target in GPU_PLATFORMS else "tpu_custom_call"
    return text.count(f"custom_call @{name}(")


def value_and_grads(op, num_diff):
    """`x -> (op(x), vjp of ones w.r.t. x[:num_diff])`: one forward and one backward."""
    def fn(*args):
        out, vjp = jax.vjp(lambda *diff: op(*diff, *args[num_diff:]), *args[:num_diff])
        return out, vjp(jnp.ones_like(out))

    return fn


S = jax.ShapeDtypeStruct
BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32

# (dtype, head_dim, q heads, kv heads, T, S, features): T and S not multiples of the blocks.
ATTENTION = {
    "mha_causal_bf16_d128": (BF16, 128, 4, 4, 200, 200, dict(causal=True)),
    "gqa_window_sinks_fp16_d64": (F16, 64, 4, 2, 300, 300,
                                  dict(causal=True, window=64, num_sinks=4)),
    "mqa_segments_fp32_d256": (F32, 256, 4, 1, 136, 136, dict(causal=True, segments=True)),
    "gqa_positions_alibi_bf16_d64": (BF16, 64, 4, 2, 150, 150,
                                     dict(causal=True, positions=True, alibi=True)),
    "cross_softcap_bf16_d96": (BF16, 96, 2, 2, 72, 190, dict(softcap=30.0)),  # GPU pads D
}


def _attention_case(name):
    dtype, D, H, K, T, Sk, features = ATTENTION[name]
    features = dict(features)
    segments, positions = features.pop("segments", False), features.pop("positions", False)
    alibi = features.pop("alibi", False)
    args = [S((1, T, H, D), dtype), S((1, Sk, K, D), dtype), S((1, Sk, K, D), dtype)]
    if segments:
        args += [S((1, T), jnp.int32), S((1, Sk), jnp.int32)]
    if positions:
        args += [S((1, T), jnp.int32), S((1, Sk), jnp.int32)]

    def op(q, k, v, *extra):
        kw = dict(features)
        extra = list(extra)
        if segments:
            kw.update(segment_ids=extra.pop(0), kv_segment_ids=extra.pop(0))
        if positions:
            kw.update(q_positions=extra.pop(0), kv_positions=extra.pop(0))
        if alibi:
            kw.update(alibi_slopes=jnp.linspace(0.5, 0.01, H))
        return dot_product_attention(q, k, v, impl="pallas", **kw)

    return value_and_grads(op, 3), args


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(ATTENTION))
def test_flash_attention_lowers(name, target):
    fn, args = _attention_case(name)
    text = lower(fn, args, target)
    assert _kernel_calls(text, target) == 3  # forward, dq, dk/dv


# (d_inner, state N, dtype, T, z, D, initial state): Mamba's widths (d_inner 768 .. 5120).
SCAN = {
    "d768_n16_z_D_fp16": (768, 16, F16, 100, True, True, False),
    "d1536_n32_h0_bf16": (1536, 32, BF16, 64, False, False, True),
    "d2560_n64_z_D_h0": (2560, 64, F32, 130, True, True, True),
    "d5120_n16_bf16": (5120, 16, BF16, 40, False, False, False),
}


def _scan_case(name):
    E, N, dtype, T, z, D, h0 = SCAN[name]
    args = [S((1, T, E), dtype), S((1, T, E), dtype), S((E, N), F32), S((1, T, N), dtype),
            S((1, T, N), dtype)]
    extra = dict(D=S((E,), F32) if D else None, z=S((1, T, E), dtype) if z else None,
                 initial_state=S((1, E, N), F32) if h0 else None)
    names = [k for k, v in extra.items() if v is not None]

    def op(u, delta, A, B, C, *rest):
        return selective_scan(u, delta, A, B, C, delta_softplus=True, impl="pallas",
                              **dict(zip(names, rest, strict=True)))

    return value_and_grads(op, 5), args + [extra[k] for k in names]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(SCAN))
def test_selective_scan_lowers(name, target):
    fn, args = _scan_case(name)
    text = lower(fn, args, target)
    assert _kernel_calls(text, target) == 2  # forward, backward


@pytest.mark.parametrize("target", ["cuda", "rocm", "v5e", "v6e"])
def test_forward_alone_lowers(target):
    """Inference: the forward kernel alone (and ROCm, which takes the Triton kernels)."""
    for case, name in ((_attention_case, "mha_causal_bf16_d128"),
                       (_scan_case, "d5120_n16_bf16")):
        fn, args = case(name)
        assert _kernel_calls(lower(lambda *a, fn=fn: fn(*a)[0], args, target), target) == 1


def test_one_jitted_function_lowers_for_gpu_and_tpu():
    """The kernel follows the platform being lowered for, not this host's backend."""
    fn, args = _attention_case("mha_causal_bf16_d128")
    gpu_text, tpu_text = lower(fn, args, "cuda"), lower(fn, args, "v5e")
    assert (_kernel_calls(gpu_text, "cuda"), _kernel_calls(gpu_text, "v5e")) == (3, 0)
    assert (_kernel_calls(tpu_text, "cuda"), _kernel_calls(tpu_text, "v5e")) == (0, 3)


def _scan_args(E, N, T=40):
    return [S((1, T, E), F32), S((1, T, E), F32), S((E, N), F32), S((1, T, N), F32),
            S((1, T, N), F32)]


def test_kernel_limits_refuse_only_their_platform():
    """State N=256 is past the GPU kernel's register budget: lowering for cuda raises the
    limit, lowering for TPU still takes the TPU kernel."""
    fn = value_and_grads(lambda *a: selective_scan(*a, impl="pallas"), 5)
    args = _scan_args(768, 256)
    with pytest.raises(ValueError, match="state size N must be at most 128"):
        lower(fn, args, "cuda")
    assert _kernel_calls(lower(fn, args, "v5e"), "v5e") == 2


def test_kernel_limits_on_both_platforms_raise_at_trace():
    fn = lambda *a: selective_scan(*a, impl="pallas", chunk_size=48)  # noqa: E731
    with pytest.raises(ValueError, match="chunk_size must be in 1..32.*multiple of 128"):
        jax.jit(fn).trace(*_scan_args(768, 16))


@pytest.mark.parametrize("target", ["cuda", "v5e"])
def test_ring_attention_tiles_lower(target):
    """Ring attention's Pallas tiles inside `shard_map` over 4 sequence shards."""
    mesh = _abstract_mesh(target, size=4, axis="sequence")
    ring = jax.shard_map(
        lambda q, k, v: ring_attention(q, k, v, axis_name="sequence", causal=True,
                                       impl="pallas"),
        mesh=mesh, in_specs=P(None, "sequence"), out_specs=P(None, "sequence"),
        check_vma=False)
    platform = target if target in GPU_PLATFORMS else "tpu"
    args = [S((1, 512, 4, 64), BF16), S((1, 512, 2, 64), BF16), S((1, 512, 2, 64), BF16)]
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(value_and_grads(ring, 3)).trace(*args).lower(
            lowering_platforms=(platform,)).as_text()
    assert _kernel_calls(text, target) == 6  # forward, dq, dk/dv; for PARTIAL and FULL tiles
