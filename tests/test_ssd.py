"""Mamba-2 SSD: the chunked impl equals the sequential reference (values and gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.ops.ssd import ssd


def _inputs(T=13, Bsz=2, H=4, P=3, G=2, N=4, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    cast = lambda v: jnp.asarray(v, dtype)
    return dict(
        x=cast(rng.normal(size=(Bsz, T, H, P))),
        dt=cast(rng.uniform(0.05, 0.5, size=(Bsz, T, H))),
        A=-jnp.asarray(rng.uniform(0.5, 2.0, size=(H,)), jnp.float32),
        B=cast(rng.normal(size=(Bsz, T, G, N))), C=cast(rng.normal(size=(Bsz, T, G, N))),
        D=jnp.asarray(rng.normal(size=(H,)), jnp.float32),
        initial_state=jnp.asarray(rng.normal(size=(Bsz, H, P, N)), jnp.float32),
    ), jnp.asarray(np.sort(rng.integers(0, 3, size=(Bsz, T)), axis=1), jnp.int32)


def test_reference_matches_numpy_loop():
    x, seg = _inputs(T=6)
    y, last = ssd(**x, segment_ids=seg, return_final_state=True, impl="reference")
    f = lambda k: np.asarray(x[k], np.float64)
    X, dt, A, B, C = f("x"), f("dt"), f("A"), f("B").repeat(2, 2), f("C").repeat(2, 2)
    h, want, seg = f("initial_state"), np.zeros_like(X), np.asarray(seg)
    for t in range(X.shape[1]):
        keep = np.ones(len(X)) if t == 0 else (seg[:, t] == seg[:, t - 1]).astype(float)
        decay = np.exp(dt[:, t] * A) * keep[:, None]
        h = decay[..., None, None] * h + np.einsum("bhp,bhn->bhpn", dt[:, t, :, None] * X[:, t],
                                                   B[:, t])
        want[:, t] = np.einsum("bhpn,bhn->bhp", h, C[:, t]) + f("D")[:, None] * X[:, t]
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(last, h, rtol=1e-4, atol=1e-4)


@functools.partial(jax.jit, static_argnames=("impl",))
def _value_and_grads(x, seg, impl):
    def loss(x):
        y, last = ssd(**x, segment_ids=seg, return_final_state=True, impl=impl, chunk_size=4)
        w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(y.astype(jnp.float32) * w) + jnp.sum(jnp.sin(last)), (y, last)

    return jax.grad(loss, has_aux=True)(x)


@pytest.mark.parametrize("dtype,tol,segments", [(jnp.float32, 1e-4, True),
                                               (jnp.float32, 1e-4, False),
                                               (jnp.bfloat16, 2e-2, True)])
def test_chunked_matches_reference(dtype, tol, segments):
    x, seg = _inputs(dtype=dtype)
    seg = seg if segments else None
    got, want = _value_and_grads(x, seg, "xla"), _value_and_grads(x, seg, "reference")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * (1 + np.abs(w).max()))


def test_bf16_long_sequence_is_finite_and_close():
    """T = 16k in bf16 through "xla": finite, within 3% (max-normalised) of fp32 reference."""
    x, _ = _inputs(T=16384, Bsz=1, H=2, P=2, G=1, N=4, seed=1)
    y32 = ssd(**x, impl="reference")
    x16 = {k: v.astype(jnp.bfloat16) if k in ("x", "dt", "B", "C") else v for k, v in x.items()}
    y16 = jax.jit(functools.partial(ssd, impl="xla", chunk_size=64))(**x16)
    assert bool(jnp.all(jnp.isfinite(y16)))
    err = jnp.max(jnp.abs(y16.astype(jnp.float32) - y32)) / jnp.max(jnp.abs(y32))
    assert float(err) < 3e-2


def test_bad_inputs():
    x, seg = _inputs()
    with pytest.raises(ValueError, match="impl"):
        ssd(**x, impl="pallas")
    with pytest.raises(ValueError, match="dt must"):
        ssd(**{**x, "dt": x["dt"][..., :1]})
    with pytest.raises(ValueError, match="G dividing"):
        ssd(**{**x, "B": x["B"][:, :, :1].repeat(3, 2), "C": x["C"][:, :, :1].repeat(3, 2)})
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(**x, chunk_size=0)
    with pytest.raises(ValueError, match="initial_state"):
        ssd(**{**x, "initial_state": x["initial_state"][:, :1]})
