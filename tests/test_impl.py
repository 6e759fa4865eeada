"""`longjax.ops.impl`: the table `impl="auto"` follows, and dispatch by lowering platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.ops import impl
from longjax.ops.attention import dot_product_attention
from longjax.ops.selective_scan import selective_scan


def test_table_without_measured_kernels():
    """Nothing is measured on an accelerator: cuDNN where it serves, else "xla"; one query
    decodes through the split cache. Never a Pallas kernel."""
    for platform in impl.PLATFORMS:
        assert impl.choose("attention", platform, query_length=1) == "split_kv"
        assert impl.choose("attention", platform, query_length=512) == "xla"
        for op in impl.OPS[1:]:
            assert impl.choose(op, platform) == "xla"


def test_cudnn_on_cuda_only_where_it_serves(monkeypatch):
    monkeypatch.setattr(impl, "cudnn_available", lambda: True)
    table = impl.choices("attention", query_length=512, cudnn_supported=True)
    assert table == {"cpu": "xla", "cuda": "cudnn", "rocm": "xla", "tpu": "xla"}
    assert impl.choose("attention", "cuda", query_length=512, cudnn_supported=False) == "xla"
    assert impl.choose("attention", "cuda", query_length=1, cudnn_supported=True) == "split_kv"


def test_cudnn_not_chosen_without_the_library():
    assert not impl.cudnn_available()  # this CPU host
    assert impl.choose("attention", "cuda", query_length=512, cudnn_supported=True) == "xla"


def test_bad_op_and_platform_raise():
    with pytest.raises(ValueError, match="op must be one of"):
        impl.choose("convolution", "cpu")
    with pytest.raises(ValueError, match="platform must be one of"):
        impl.choose("attention", "gpu")


def test_dispatch_runs_the_lowering_platforms_choice():
    fns = {"cpu": jnp.sin, "cuda": jnp.cos, "rocm": jnp.cos, "tpu": jnp.tanh}
    x = jnp.float32(0.5)
    out = jax.jit(lambda x: impl.dispatch(fns, lambda name: name(x)))(x)
    np.testing.assert_allclose(out, np.sin(0.5), rtol=1e-6)
    calls = []
    impl.dispatch(dict.fromkeys(impl.PLATFORMS, "xla"), calls.append)
    assert calls == ["xla"]  # one choice: a plain call, nothing staged


def _kernel_calls(fn, *args, platform):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return text.count("custom_call @__gpu$xla.gpu.triton(") + text.count(
        "custom_call @tpu_custom_call(")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_auto_calls_no_kernel_on_accelerators(platform):
    q = jax.ShapeDtypeStruct((1, 64, 2, 32), jnp.bfloat16)
    attention = lambda q: dot_product_attention(q, q, q, causal=True)  # noqa: E731
    assert _kernel_calls(attention, q, platform=platform) == 0
    u = jax.ShapeDtypeStruct((1, 16, 64), jnp.float32)
    A, B = jax.ShapeDtypeStruct((64, 8), jnp.float32), jax.ShapeDtypeStruct((1, 16, 8),
                                                                              jnp.float32)
    scan = lambda u, A, B: selective_scan(u, u, A, B, B)  # noqa: E731
    assert _kernel_calls(scan, u, A, B, platform=platform) == 0


def test_auto_one_query_is_the_split_cache_path():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 1, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 37, 2, 16)), jnp.float32)
    auto = dot_product_attention(q, k, k, impl="auto")
    ref = dot_product_attention(q, k, k, impl="reference")
    np.testing.assert_allclose(auto, ref, rtol=1e-5, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda q, k: dot_product_attention(q, k, k))(q, k))
    assert "split_kv_attention" in jaxpr
