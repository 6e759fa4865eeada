"""Diagonal linear scan: every impl equals the sequential reference (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.ops.scan import linear_scan


def _inputs(T=13, B=2, D=3, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.uniform(0.5, 1.0, size=(B, T, D, 1)), dtype)
    b = jnp.asarray(rng.normal(size=(B, T, D, 4)), dtype)
    h0 = jnp.asarray(rng.normal(size=(B, D, 4)), jnp.float32)
    seg = jnp.asarray(np.sort(rng.integers(0, 3, size=(B, T)), axis=1), jnp.int32)
    return a, b, h0, seg


def _numpy_scan(a, b, h0, seg, reverse):
    a, b = np.broadcast_to(np.asarray(a, np.float64), b.shape), np.asarray(b, np.float64)
    seg = np.asarray(seg)
    order = range(b.shape[1] - 1, -1, -1) if reverse else range(b.shape[1])
    h, prev, out = np.asarray(h0, np.float64), None, np.zeros_like(b)
    for t in order:
        keep = np.ones(len(seg)) if prev is None else (seg[:, t] == seg[:, prev]).astype(float)
        h = a[:, t] * h * keep.reshape(-1, 1, 1) + b[:, t]
        out[:, t], prev = h, t
    return out, h


@pytest.mark.parametrize("reverse", [False, True])
def test_reference_matches_numpy_loop(reverse):
    a, b, h0, seg = _inputs()
    h, last = linear_scan(a, b, initial_state=h0, segment_ids=seg, reverse=reverse,
                          return_final_state=True, impl="reference")
    want, want_last = _numpy_scan(a, b, h0, seg, reverse)
    np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, want_last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,dtype,tol,reverse", [
    ("associative", jnp.float32, 1e-5, False),
    ("chunked", jnp.float32, 1e-5, False),
    ("chunked", jnp.float32, 1e-5, True),
    ("chunked", jnp.bfloat16, 2e-2, False),
])
def test_impl_matches_reference(impl, dtype, tol, reverse):
    a, b, h0, seg = _inputs(T=37, dtype=dtype)

    def loss(impl, a, b, h0):
        h, last = linear_scan(a, b, initial_state=h0, segment_ids=seg, reverse=reverse,
                              return_final_state=True, impl=impl, chunk_size=8)
        w = jnp.cos(jnp.arange(h.size, dtype=jnp.float32)).reshape(h.shape)
        return jnp.sum(h.astype(jnp.float32) * w) + jnp.sum(jnp.sin(last)), (h, last)

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)
    (ga, gb, gh), (h, last) = grad(impl, a, b, h0)
    (ra, rb, rh), (rh_out, rlast) = grad("reference", a, b, h0)
    scale = lambda x: tol * (1 + float(jnp.max(jnp.abs(x.astype(jnp.float32)))))
    for got, want in [(h, rh_out), (last, rlast), (ga, ra), (gb, rb), (gh, rh)]:
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=scale(want), rtol=tol)


def test_bad_inputs():
    a, b, h0, seg = _inputs()
    with pytest.raises(ValueError, match="impl"):
        linear_scan(a, b, impl="fast")
    with pytest.raises(ValueError, match="broadcast"):
        linear_scan(a[:, :, :2], b)
    with pytest.raises(ValueError, match="segment_ids"):
        linear_scan(a, b, segment_ids=seg[:, :5])
    with pytest.raises(ValueError, match="initial_state"):
        linear_scan(a, b, initial_state=h0[:, :1])
