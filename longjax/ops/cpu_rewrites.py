"""Rewrites that pay only on XLA's CPU backend, chosen by the platform lowered for.

Each function computes plain math. Its portable form is the plain JAX one (what GPU and
TPU lower); on CPU it runs a rewrite that XLA's CPU backend runs faster. The choice
follows the platform the code is lowered for (`jax.lax.platform_dependent`), not the
host's default backend, as kernels are chosen. Inside `portable()` every call takes the
portable form (tests check it against the references; benchmarks time it). Timings:
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import operator
import string

import jax
import jax.numpy as jnp

_PORTABLE = contextvars.ContextVar("longjax_portable", default=False)


@contextlib.contextmanager
def portable():
    """Functions traced inside take the portable form on every platform."""
    token = _PORTABLE.set(True)
    try:
        yield
    finally:
        _PORTABLE.reset(token)


def _by_platform(cpu, plain, *args):
    if _PORTABLE.get():
        return plain(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=plain)


# ------------------------------------------------------------------------ axis_sum

def axis_sum(x, axis):
    """`x.sum(axis)` for a small axis (state sizes, heads per group).

    CPU: additions of the slices, which fuse into the surrounding loop; XLA's CPU backend
    runs a sum over a non-minor axis as a library reduction call."""
    return _by_platform(functools.partial(_slice_sum, axis=axis),
                        functools.partial(jnp.sum, axis=axis), x)


def _slice_sum(x, axis):
    axis = axis % x.ndim
    slices = (jax.lax.index_in_dim(x, i, axis, keepdims=False) for i in range(x.shape[axis]))
    return functools.reduce(operator.add, slices)


# ------------------------------------------------------------------------ cumsum

def cumsum(x, axis):
    """`jnp.cumsum(x, axis)` in fp32.

    CPU: a matmul with a lower-triangular matrix of ones, whose output layout XLA's CPU
    backend keeps plain (its reduce-window cumsum does not)."""
    return _by_platform(functools.partial(_triangular_cumsum, axis=axis),
                        functools.partial(jnp.cumsum, axis=axis), x)


def _triangular_cumsum(x, axis):
    axis = axis % x.ndim
    n = x.shape[axis]
    src = string.ascii_letters[:x.ndim]
    dst = src[:axis] + "Z" + src[axis + 1:]
    ones = jnp.tril(jnp.ones((n, n), bool)).astype(x.dtype)
    return jnp.einsum(f"Z{src[axis]},{src}->{dst}", ones, x,
                      precision=jax.lax.Precision.HIGHEST)


# ------------------------------------------------------------------------ broadcast_axis

def broadcast_axis(v, axis, size):
    """`v` with a new axis of `size` at `axis` (a broadcast; its gradient sums that axis).

    CPU: a custom VJP summing the gradient by `axis_sum`; autodiff's reduction over a
    middle axis is a slow library call there."""
    return _by_platform(functools.partial(_broadcast_summed_by_slices, axis=axis, size=size),
                        functools.partial(_broadcast, axis=axis, size=size), v)


def _broadcast(v, axis, size):
    v = jnp.expand_dims(v, axis)
    return jnp.broadcast_to(v, v.shape[:axis] + (size,) + v.shape[axis + 1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _broadcast_summed_by_slices(v, axis, size):
    return _broadcast(v, axis, size)


def _broadcast_fwd(v, axis, size):
    return _broadcast(v, axis, size), None


def _broadcast_bwd(axis, size, _, grad):
    return (_slice_sum(grad, axis),)


_broadcast_summed_by_slices.defvjp(_broadcast_fwd, _broadcast_bwd)


# ------------------------------------------------------------------------ decayed_scores

def decayed_scores(q, k, b, visible):
    """`S_ij = sum_d q_id k_jd exp(b_id - b_jd)` for `visible` pairs, else 0, through the
    `[C, C, Dk]` decays. q, k, b `[..., C, Dk]`, visible `[..., C, C]` bool.

    CPU: a custom VJP whose dq and dk are contractions over j or i and db = q dq - k dk
    (the identity flash-linear-attention uses for GLA's gate); autodiff reduces the
    `[C, C, Dk]` product over the minor Dk axis, slow there."""
    return _by_platform(_decayed_scores_cpu, _decayed_scores, q, k, b, visible)


def _decays(b, visible):
    """`exp(b_i - b_j)` `[..., C, C, Dk]` where `visible [..., C, C]`, else 0."""
    diff = b[..., :, None, :] - b[..., None, :, :]
    return jnp.exp(jnp.where(visible[..., None], diff, -jnp.inf))


def _decayed_scores(q, k, b, visible):
    return jnp.einsum("...ijd,...jd->...ij", q[..., :, None, :] * _decays(b, visible), k)


@jax.custom_vjp
def _decayed_scores_cpu(q, k, b, visible):
    return _decayed_scores(q, k, b, visible)


def _scores_fwd(q, k, b, visible):
    return _decayed_scores(q, k, b, visible), (q, k, b, visible)


def _scores_bwd(res, dS):
    q, k, b, visible = res
    weighted = dS[..., None] * _decays(b, visible)  # [..., C, C, Dk]
    dq = jnp.einsum("...ijd,...jd->...id", weighted, k)
    dk = jnp.einsum("...ijd,...id->...jd", weighted, q)
    return dq, dk, q * dq - k * dk, None


_decayed_scores_cpu.defvjp(_scores_fwd, _scores_bwd)


# ------------------------------------------------------------------------ unit_lower_solve

def unit_lower_solve(L, B):
    """`(I + L)^{-1} B` for strictly lower-triangular `L [..., C, C]`, `B [..., C, M]`.

    CPU: blocked forward substitution (matmuls) with a VJP that solves the transposed
    system the same way; XLA's CPU triangular solve is far slower."""
    return _by_platform(_substitution_solve, _triangular_solve, L, B)


def _triangular_solve(L, B):
    return jax.scipy.linalg.solve_triangular(L, B, lower=True, unit_diagonal=True)


def _forward_substitution(L, B):
    """X with `(I + L) X = B` for strictly lower-triangular `L [..., C, C]`, row by row."""

    def row(i, X):
        return X.at[..., i, :].set(B[..., i, :] - jnp.einsum("...j,...jm->...m", L[..., i, :], X))

    return jax.lax.fori_loop(0, L.shape[-1], row, jnp.zeros_like(B))


def _blocked_substitution(L, B, block=16):
    """`_forward_substitution` in blocks: the inverses of all diagonal `block x block` blocks
    at once (`block` row steps), then one matmul step per block row, so `C / block + block`
    sequential steps instead of C."""
    C = L.shape[-1]
    if C <= block or C % block:
        return _forward_substitution(L, B)
    n = C // block
    blocks = L.reshape(L.shape[:-2] + (n, block, n, block))
    diagonal = jnp.stack([blocks[..., i, :, i, :] for i in range(n)], axis=-3)
    eye = jnp.broadcast_to(jnp.eye(block, dtype=L.dtype), diagonal.shape)
    inverses = _forward_substitution(diagonal, eye)  # [..., n, block, block]
    rows = []
    for i in range(n):
        rhs = B[..., i * block:(i + 1) * block, :]
        if i:
            rhs = rhs - jnp.einsum("...ij,...jm->...im", L[..., i * block:(i + 1) * block,
                                                         :i * block], jnp.concatenate(rows, -2))
        rows.append(jnp.einsum("...ij,...jm->...im", inverses[..., i, :, :], rhs))
    return jnp.concatenate(rows, -2)


@jax.custom_vjp
def _substitution_solve(L, B):
    return _blocked_substitution(L, B)


def _solve_fwd(L, B):
    X = _blocked_substitution(L, B)
    return X, (L, X)


def _solve_bwd(res, dX):
    L, X = res
    # (I + L)^T dB = dX: reversing the rows and columns makes L^T strictly lower again.
    upper_flipped = jnp.flip(jnp.swapaxes(L, -1, -2), (-2, -1))
    dB = jnp.flip(_blocked_substitution(upper_flipped, jnp.flip(dX, -2)), -2)
    dL = -jnp.tril(jnp.einsum("...im,...jm->...ij", dB, X), -1)
    return dL, dB


_substitution_solve.defvjp(_solve_fwd, _solve_bwd)
