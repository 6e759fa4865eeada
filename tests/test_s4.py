"""S4D / S4: kernels against direct powers, convolution mode (whole rows and packed
rows) against recurrent mode and a numpy recurrence per document."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.ops import s4

H, N, L = 3, 8, 37


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    dt = jnp.asarray(np.exp(rng.uniform(np.log(1e-2), np.log(1e-1), H)), jnp.float32)
    u = jnp.asarray(rng.normal(size=(2, L, H)), jnp.float32)
    C = rng.normal(size=(H, N)) + 1j * rng.normal(size=(H, N))
    seg = jnp.asarray(np.sort(rng.integers(0, 3, size=(2, L)), axis=1), jnp.int32)
    return dt, u, C, seg


def _tile(v):
    return jnp.asarray(np.tile(v, (H, 1)), jnp.complex64)


def test_dplr_legs_has_the_spectrum_of_hippo():
    A, _ = s4.hippo_legs(N)
    Lambda, p, _ = s4.dplr_legs(N)
    dplr = np.diag(Lambda) - np.outer(p, p.conj())
    got = np.sort_complex(np.linalg.eigvals(dplr))
    np.testing.assert_allclose(got, np.sort_complex(np.linalg.eigvals(A)), atol=1e-6)


@pytest.mark.parametrize("kind,method", [("lin", "zoh"), ("inv", "bilinear"), ("legs", "zoh")])
def test_s4d_convolution_equals_recurrence(kind, method):
    dt, u, C, seg = _setup()
    Lambda, B = (_tile(v) for v in s4.s4d_init(N, kind))
    C = jnp.asarray(C[:, : N // 2], jnp.complex64)
    Ab, Bb = s4.discretize(Lambda, B, dt, method)
    K = jax.jit(s4.s4d_kernel, static_argnums=(4, 5))(Lambda, B, C, dt, L, method)
    direct = np.stack([2 * np.real(np.sum(C * Bb * Ab**l, -1)) for l in range(L)], -1)
    np.testing.assert_allclose(K, direct, rtol=1e-4, atol=1e-5)
    y_conv = s4.causal_conv(u, K)
    recurrence = jax.jit(s4.s4d_recurrence)
    y_rec, _ = recurrence(u, Ab, Bb, C)
    np.testing.assert_allclose(y_conv, y_rec, rtol=1e-4, atol=1e-5)
    # resets: each document equals a fresh run on that document alone
    y_seg, _ = recurrence(u, Ab, Bb, C, segment_ids=seg)
    first = int(np.argmax(np.asarray(seg[0]) != np.asarray(seg[0, 0])))
    if first:
        y_doc, _ = recurrence(u[:, first:], Ab, Bb, C, segment_ids=seg[:, first:])
        np.testing.assert_allclose(y_seg[0, first:], y_doc[0], rtol=1e-4, atol=1e-5)


def test_s4_cauchy_kernel_equals_powers_and_recurrence():
    dt, u, C, _ = _setup(1)
    Lambda, p, B = (_tile(v) for v in s4.dplr_legs(N))
    C = jnp.asarray(C, jnp.complex64)
    K = jax.jit(s4.s4_kernel, static_argnums=5)(Lambda, p, B, C, dt, L)
    Ab, Bb = (np.asarray(v, np.complex128) for v in s4.s4_dense(Lambda, p, B, dt))
    direct = np.stack([np.real(np.einsum("hn,hnm,hm->h", C, np.stack(
        [np.linalg.matrix_power(a, l) for a in Ab]), Bb)) for l in range(L)], -1)
    np.testing.assert_allclose(K, direct, rtol=1e-4, atol=1e-5)
    y_rec, _ = jax.jit(s4.s4_recurrence)(u, *s4.s4_dense(Lambda, p, B, dt), C)
    np.testing.assert_allclose(s4.causal_conv(u, K), y_rec, rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="kind"):
        s4.s4d_init(N, "fourier")
    with pytest.raises(ValueError, match="method"):
        s4.discretize(jnp.ones((1, 2)), jnp.ones((1, 2)), jnp.ones((1,)), "euler")


def _documentwise_s4(u, Ab, Bb, C, seg):
    """numpy float64: S4's discrete recurrence (Gu et al. 2022, eq. 3) `x_k = Ab x_{k-1} +
    Bb u_k`, `y_k = Re(C x_k)`, from `x = 0` at each document start; Ab `[H, N, N]`."""
    Bsz, T, H = u.shape
    y = np.zeros((Bsz, T, H))
    for b in range(Bsz):
        x = np.zeros((H, Ab.shape[-1]), complex)
        for t in range(T):
            x = (t > 0 and seg[b, t] == seg[b, t - 1]) * np.einsum("hnm,hm->hn", Ab, x)
            x = x + Bb * u[b, t][:, None]
            y[b, t] = np.real(np.sum(C * x, -1))
    return y


def test_segment_convolution_equals_the_recurrence_per_document():
    """Packed rows: S4's kernel computed once over the row, convolved per document."""
    dt, u, C, _ = _setup(3)
    seg = np.repeat(np.array([[1, 2, 3, 4], [5, 5, 0, 0]]), [3, 10, 1, 23], axis=1)
    Lambda, p, B = (_tile(v) for v in s4.dplr_legs(N))
    C = jnp.asarray(C, jnp.complex64)
    K = jax.jit(s4.s4_kernel, static_argnums=5)(Lambda, p, B, C, dt, L)
    Ab, Bb = s4.s4_dense(Lambda, p, B, dt)
    want = _documentwise_s4(np.asarray(u, np.float64), np.asarray(Ab, np.complex128),
                            np.asarray(Bb, np.complex128), np.asarray(C, np.complex128), seg)
    conv = jax.jit(s4.segment_causal_conv, static_argnames="block_size")
    for block_size in (None, 4, 64):  # default 8: borders inside and on block edges
        np.testing.assert_allclose(conv(u, K, seg, block_size=block_size), want,
                                   rtol=1e-4, atol=1e-5)
    y_rec, _ = jax.jit(s4.s4_recurrence)(u, Ab, Bb, C, segment_ids=seg)
    np.testing.assert_allclose(y_rec, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="segment_ids must be"):
        s4.segment_causal_conv(u, K, seg[:, 1:])


@pytest.mark.parametrize("packed", [False, True])
def test_s4d_convolution_and_recurrence_gradients_agree(packed):
    dt, u, C, seg = _setup(2)
    seg = seg if packed else None
    Lambda, B = (_tile(v) for v in s4.s4d_init(N, "inv"))
    C = jnp.asarray(C[:, : N // 2], jnp.complex64)
    w = jnp.cos(jnp.arange(u.size, dtype=jnp.float32)).reshape(u.shape)

    def loss(mode, Lambda, B, C, dt, u):
        if mode == "conv":
            K = s4.s4d_kernel(Lambda, B, C, dt, L)
            y = s4.causal_conv(u, K) if seg is None else s4.segment_causal_conv(u, K, seg)
        else:
            y = s4.s4d_recurrence(u, *s4.discretize(Lambda, B, dt), C, segment_ids=seg)[0]
        return jnp.sum(y * w)

    grads = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4, 5)), static_argnums=0)
    for got, want in zip(grads("conv", Lambda, B, C, dt, u), grads("rec", Lambda, B, C, dt, u),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * (1 + np.abs(want).max()))
