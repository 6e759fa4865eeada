"""Pallas flash-attention kernels (GPU and TPU) through the interpreter, against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.ops.attention import dot_product_attention, make_spec, reference_attention
from pallas_kernels import flash_attention

# (out and lse, grads)
TOL = {jnp.float32: (2e-5, 1e-4), jnp.float16: (4e-3, 2e-2), jnp.bfloat16: (3e-2, 1.5e-1)}


def _case(kind, B, T, S, H, K, D, dtype):
    ks = jax.random.split(jax.random.PRNGKey(T * S + H), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), dtype)
    k = jax.random.normal(ks[1], (B, S, K, D), dtype)
    v = jax.random.normal(ks[2], (B, S, K, D), dtype)
    do = jax.random.normal(ks[3], (B, T, H, D), dtype)
    kw = dict(causal=False, window=None, num_sinks=0, segment_ids=None, kv_segment_ids=None,
              q_positions=None, kv_positions=None, alibi_slopes=None, softcap=None, scale=None)
    seg = jnp.asarray(np.sort(np.random.default_rng(T).integers(0, 3, (B, T)), 1), jnp.int32)
    if kind == "causal_segments":
        kw.update(causal=True, segment_ids=seg)
    elif kind == "lambda_alibi_softcap":
        kw.update(causal=True, window=9, num_sinks=3, softcap=3.0,
                  alibi_slopes=jnp.asarray(2.0 ** -np.arange(1, H + 1), jnp.float32))
    elif kind == "window_bidirectional":
        kw.update(window=7)
    elif kind == "kv_cache_positions":
        kw.update(causal=True, window=12, q_positions=S - T + jnp.arange(T)[None],
                  kv_positions=jnp.arange(S)[None])
    else:
        raise ValueError(kind)
    return (q, k, v, do), kw


def _check_kernel(backend, kind, B, T, S, H, K, D, dtype, block_q, block_k):
    (q, k, v, do), kw = _case(kind, B, T, S, H, K, D, dtype)
    blocks = dict(block_q=block_q, block_k=block_k, backend=backend, interpret=True)
    spec, side = make_spec(q, k, v, **kw)
    out, lse = flash_attention.forward(spec, q, k, v, side, **blocks)
    dq, dk, dv, dslopes = flash_attention.backward(spec, q, k, v, side, out, lse, do, **blocks)

    up = [x.astype(jnp.float32) for x in (q, k, v, do)]
    slopes = kw.pop("alibi_slopes")

    def ref(q, k, v, slopes):
        return reference_attention(q, k, v, return_lse=True, alibi_slopes=slopes, **kw)

    (ref_out, ref_lse), vjp = jax.vjp(ref, *up[:3], slopes)
    ref_grads = vjp((up[3], jnp.zeros_like(ref_lse)))
    tol_out, tol_grad = TOL[dtype]
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite],
                               atol=tol_out, rtol=tol_out)
    pairs = [("out", out, ref_out), ("dq", dq, ref_grads[0]), ("dk", dk, ref_grads[1]),
             ("dv", dv, ref_grads[2])]
    if slopes is not None:
        pairs.append(("dslopes", dslopes, ref_grads[3]))
    for name, a, b in pairs:
        tol = tol_out if name == "out" else tol_grad
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=tol, rtol=tol, err_msg=f"{backend} {kind} {name}")


@pytest.mark.parametrize(
    "kind, B, T, S, H, K, D, dtype, block_q, block_k",
    [
        ("causal_segments", 2, 37, 37, 4, 1, 64, jnp.float32, 16, 16),
        ("lambda_alibi_softcap", 1, 45, 45, 2, 1, 32, jnp.float32, 16, 8),
        ("window_bidirectional", 1, 30, 41, 8, 1, 16, jnp.bfloat16, 16, 16),
        ("kv_cache_positions", 1, 5, 37, 2, 2, 128, jnp.float32, 16, 16),
        ("causal_segments", 1, 20, 20, 2, 1, 24, jnp.float32, 16, 16),  # head dim padded
    ],
)
def test_gpu_kernel_interpret(kind, B, T, S, H, K, D, dtype, block_q, block_k):
    _check_kernel("gpu", kind, B, T, S, H, K, D, dtype, block_q, block_k)


@pytest.mark.parametrize(
    "kind, B, T, S, H, K, D, dtype, block_q, block_k",
    [
        ("causal_segments", 1, 27, 27, 2, 1, 64, jnp.float32, 16, 16),
        ("lambda_alibi_softcap", 1, 30, 30, 2, 2, 32, jnp.float32, 16, 16),
        ("kv_cache_positions", 1, 3, 20, 4, 1, 16, jnp.bfloat16, 8, 16),
        ("causal_segments", 1, 27, 27, 2, 1, 64, jnp.float16, 16, 16),  # read as fp32
    ],
)
def test_tpu_kernel_interpret(kind, B, T, S, H, K, D, dtype, block_q, block_k):
    _check_kernel("tpu", kind, B, T, S, H, K, D, dtype, block_q, block_k)


def test_dot_product_attention_pallas_interpret_gradients():
    (q, k, v, do), _ = _case("window_bidirectional", 1, 24, 24, 2, 1, 16, jnp.float32)

    def loss(impl, q, k, v):
        out = dot_product_attention(q, k, v, causal=True, window=10, impl=impl, block_q=16,
                                    block_k=16)
        return (out * do).sum()

    got = jax.grad(lambda *a: loss("pallas_interpret", *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_bad_backend_and_bias_raise():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="backend must be one of"):
        spec, side = make_spec(q, q, q, causal=True)
        flash_attention.forward(spec, q, q, q, side, backend="cpu")
    with pytest.raises(ValueError, match="bias is not supported"):
        dot_product_attention(q, q, q, bias=jnp.zeros((8, 8)), impl="pallas_interpret")
