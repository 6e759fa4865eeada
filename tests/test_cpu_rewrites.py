"""The CPU rewrites and their portable forms against dense numpy definitions, the ops run
with every rewrite off against their references, and the choice following the platform
lowered for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.ops import cpu_rewrites as cr
from longjax.ops.linear_attention import gated_delta_rule
from longjax.ops.ssd import ssd

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((3, 5, 7)), jnp.float32)
Q, K, G = (jnp.asarray(RNG.standard_normal((2, 6, 4)), jnp.float32) for _ in range(3))
VISIBLE = jnp.asarray(np.tril(np.ones((6, 6), bool)))
L_STRICT = jnp.asarray(np.tril(RNG.standard_normal((2, 20, 20)), -1) * 0.3, jnp.float32)
RHS = jnp.asarray(RNG.standard_normal((2, 20, 5)), jnp.float32)


def _decayed_scores_np(q, k, b, visible):
    decay = np.exp(b[..., :, None, :] - b[..., None, :, :])  # [..., i, j, d]
    return np.where(visible, np.einsum("...id,...jd,...ijd->...ij", q, k, decay), 0.0)


# name -> (function, its differentiable arguments, a dense numpy definition)
CASES = {
    "axis_sum": (lambda x: cr.axis_sum(x, -2), (X,), lambda x: x.sum(-2)),
    "cumsum": (lambda x: cr.cumsum(x, 1), (X,), lambda x: np.cumsum(x, 1)),
    "broadcast_axis": (lambda x: cr.broadcast_axis(x, 1, 3), (X,),
                       lambda x: np.repeat(x[:, None], 3, 1)),
    "decayed_scores": (lambda q, k, b: cr.decayed_scores(q, k, b, VISIBLE), (Q, K, G),
                       lambda q, k, b: _decayed_scores_np(q, k, b, np.asarray(VISIBLE))),
    "unit_lower_solve": (cr.unit_lower_solve, (L_STRICT, RHS),
                         lambda L, B: np.linalg.solve(np.eye(20) + L, B)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rewrite_and_portable_form_equal_the_definition(name):
    """Values of both forms against numpy; the rewrite's gradient against autodiff of the
    portable form (a cotangent of ones; the solve's gradient on L's strict lower part)."""
    f, args, dense = CASES[name]
    want = dense(*map(np.asarray, args))
    loss = lambda *a: jnp.sum(jnp.tanh(f(*a)))
    rewrite = jax.jit(jax.value_and_grad(loss, range(len(args))))
    with cr.portable():
        portable_value = jax.jit(lambda *a: f(*a))(*args)
        portable = jax.jit(jax.value_and_grad(loss, range(len(args))))(*args)
    np.testing.assert_allclose(jax.jit(f)(*args), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(portable_value, want, rtol=1e-4, atol=1e-4)
    got = rewrite(*args)
    if name == "unit_lower_solve":  # only L's strict lower part is read
        got = (got[0], (jnp.tril(got[1][0], -1), got[1][1]))
        portable = (portable[0], (jnp.tril(portable[1][0], -1), portable[1][1]))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(portable), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("axis", [0, 1, 2, -2])
def test_axis_sum_over_any_axis(axis):
    f = jax.jit(lambda x: cr.axis_sum(x, axis))
    np.testing.assert_allclose(f(X), np.asarray(X).sum(axis), rtol=1e-6, atol=1e-6)


def _normal(*shape):
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def _ssd_args(T=12):
    x, dt = _normal(1, T, 4, 2), jax.nn.softplus(_normal(1, T, 4))
    return (x, dt, -jnp.exp(_normal(4)), _normal(1, T, 2, 3), _normal(1, T, 2, 3))


def _delta_args(T=12):
    q, k, v = _normal(1, T, 2, 8), _normal(1, T, 2, 8), _normal(1, T, 2, 4)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    g = jax.nn.log_sigmoid(_normal(1, T, 2) + 2.0)
    return (q, k, v, g, jax.nn.sigmoid(_normal(1, T, 2)))


OPS = {
    "ssd": (lambda *a, impl: ssd(*a, chunk_size=4, impl=impl), _ssd_args),
    "gated_delta_rule": (lambda *a, impl: gated_delta_rule(*a, chunk_size=4, impl=impl),
                         _delta_args),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_ops_with_the_rewrites_off_equal_their_references(name):
    """The portable `xla` paths (what GPU and TPU run without kernels), forward and
    gradients, against the `reference` recurrences. (The rewrites of the selective scan
    and GLA alone, `axis_sum` and `decayed_scores`, are checked above: the rewrites'
    gradients equal the portable ones, and the ops' tests check the rewrites.)"""
    op, make_args = OPS[name]
    args = make_args()

    def value_and_grads(impl):
        loss = lambda *a: jnp.sum(jnp.tanh(op(*a, impl=impl)))
        return jax.jit(jax.value_and_grad(loss, range(len(args))))(*args)

    want = value_and_grads("reference")
    with cr.portable():
        got = value_and_grads("xla")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_the_form_follows_the_platform_lowered_for():
    """Lowered for CPU the solve is blocked substitution (no triangular-solve op); lowered
    for GPU or TPU from this CPU host, the portable triangular solve."""
    f = jax.jit(jax.grad(lambda L, B: jnp.sum(cr.unit_lower_solve(L, B)), (0, 1)))
    for platform, has_solve in (("cpu", False), ("cuda", True), ("tpu", True)):
        text = f.trace(L_STRICT, RHS).lower(lowering_platforms=(platform,)).as_text()
        assert ("triangular_solve" in text) == has_solve, platform
