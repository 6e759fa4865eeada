"""Chunked (`xla`) linear-attention ops against their token-by-token references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.ops import linear_attention as la
from longjax.ops.rglru import rg_lru

B, T, H, DK, DV = 2, 37, 2, 8, 6  # odd length: not a multiple of the chunk
SEGMENTS = jnp.array([[1] * 10 + [2] * 20 + [3] * 7, [1] * 5 + [0] * 4 + [1] * 28])


def _normal(rng, *shape):
    """Random inputs from numpy: JAX's RNG would compile once per shape, slowly."""
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _inputs(dtype):
    rng = np.random.default_rng(0)
    normal = functools.partial(_normal, rng)
    k = normal(B, T, H, DK)
    return {
        "q": normal(B, T, H, DK).astype(dtype),
        "k": (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype),
        "v": normal(B, T, H, DV).astype(dtype),
        "g": jax.nn.log_sigmoid(normal(B, T, H) + 2.0).astype(dtype),
        "g_dim": jax.nn.log_sigmoid(normal(B, T, H, DK) + 2.0).astype(dtype),
        "beta": jax.nn.sigmoid(normal(B, T, H)).astype(dtype),
        "state": normal(B, H, DK, DV),
    }


# name -> (the differentiable inputs, a call taking them and **kwargs)
OPS = {
    "linear_attention": (("q", "k", "v"), lambda q, k, v, **kw: la.linear_attention(
        q, k, v, feature_map="elu+1", **kw)),
    "linear_attention_normalized": (("q", "k", "v"), lambda q, k, v, **kw: la.linear_attention(
        q, k, v, feature_map="relu", normalize=True, **kw)),
    "retention": (("q", "k", "v"), la.retention),
    "gla": (("q", "k", "v", "g_dim"), la.gla),
    "delta_rule": (("q", "k", "v", "beta"), la.delta_rule),
    "gated_delta_rule": (("q", "k", "v", "g", "beta"), la.gated_delta_rule),
    # Based's feature dimension grows as F^2: a small F keeps the test quick.
    "based": (("q", "k", "v"), lambda q, k, v, **kw: la.based(q[..., :4], k[..., :4], v, **kw)),
}


def _state_shape(name):
    if name == "based":
        return (B, H, 1 + 4 + 4 * 4, DV + 1)
    return (B, H, DK, DV + (name == "linear_attention_normalized"))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _run(name, x, impl, state, segment_ids):
    names, fn = OPS[name]
    return fn(*(x[n] for n in names), impl=impl, initial_state=state, segment_ids=segment_ids,
              return_final_state=True, chunk_size=8)


@pytest.mark.parametrize("name", sorted(OPS))
def test_xla_matches_reference_fp32_with_grads(name):
    x = _inputs(jnp.float32)
    rng = np.random.default_rng(1)
    state = _normal(rng, *_state_shape(name)) * 0.5
    names = OPS[name][0]
    ct_o = _normal(rng, B, T, H, DV)
    ct_s = _normal(rng, *state.shape)

    def loss(impl, diff, state):
        o, s = _run(name, {**x, **diff}, impl, state, SEGMENTS)
        return jnp.sum(o * ct_o) + jnp.sum(s * ct_s), (o, s)

    diff = {n: x[n] for n in names}
    results = {
        impl: jax.jit(jax.value_and_grad(loss, argnums=(1, 2), has_aux=True),
                      static_argnums=0)(impl, diff, state)
        for impl in ("reference", "xla")
    }
    (_, (o_ref, s_ref)), grads_ref = results["reference"]
    (_, (o_xla, s_xla)), grads_xla = results["xla"]
    np.testing.assert_allclose(o_xla, o_ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(s_xla, s_ref, atol=2e-5, rtol=1e-4)
    for (path, g_ref), g_xla in zip(jax.tree_util.tree_leaves_with_path(grads_ref),
                                    jax.tree.leaves(grads_xla), strict=True):
        np.testing.assert_allclose(g_xla, g_ref, atol=1e-4, rtol=1e-3, err_msg=str(path))


@pytest.mark.parametrize("chunk_size", [12, 32, 64])  # halved to odd blocks of 3; to single
def test_gla_chunk_sizes_with_strong_decays(chunk_size):  # tokens; one odd chunk of all T
    """GLA's recursive secondary chunking at other chunk sizes, with log decays down to -20
    per token: `exp(-b)` of a whole chunk would overflow, the factored scores must not."""
    x = _inputs(jnp.float32)
    state = _normal(np.random.default_rng(1), B, H, DK, DV)
    g = x["g_dim"] * 10

    def loss(impl, q, k, v, g):
        o, s = la.gla(q, k, v, g, impl=impl, initial_state=state, segment_ids=SEGMENTS,
                      return_final_state=True, chunk_size=chunk_size)
        return jnp.sum(o * x["v"]) + jnp.sum(s), (o, s)

    results = [jax.jit(jax.value_and_grad(loss, (1, 2, 3, 4), has_aux=True),
                       static_argnums=0)(impl, x["q"], x["k"], x["v"], g)
               for impl in ("reference", "xla")]
    (_, want), want_grads = results[0]
    (_, got), got_grads = results[1]
    for a, b in zip(jax.tree.leaves((got, got_grads)), jax.tree.leaves((want, want_grads)),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("C", [48, 20])  # blocked (3 blocks of 16), and row by row
def test_unit_lower_solve_and_its_gradient(C):
    """`(I + L)^{-1} B` and its VJP against a dense solve of the delta rules' system."""
    rng = np.random.default_rng(2)
    L = jnp.tril(_normal(rng, 3, C, C), -1) * 0.3
    rhs, ct = _normal(rng, 3, C, 5), _normal(rng, 3, C, 5)
    dense = lambda L, rhs: jnp.linalg.solve(jnp.eye(C) + L, rhs)
    np.testing.assert_allclose(la.unit_lower_solve(L, rhs), dense(L, rhs), atol=1e-4, rtol=1e-4)
    grads = [jax.grad(lambda L, rhs, f=f: jnp.sum(f(L, rhs) * ct), (0, 1))(L, rhs)
             for f in (la.unit_lower_solve, dense)]
    np.testing.assert_allclose(grads[0][0], jnp.tril(grads[1][0], -1), atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(grads[0][1], grads[1][1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["gla", "gated_delta_rule"])
def test_xla_matches_reference_bf16(name):
    """bf16 inputs, fp32 states: the impls agree to bf16 output rounding (and grads too)."""
    x = _inputs(jnp.bfloat16)
    names = OPS[name][0]

    def loss(impl, diff):
        o, s = _run(name, {**x, **diff}, impl, None, None)
        return jnp.sum(o.astype(jnp.float32)), (o, s)

    diff = {n: x[n] for n in names}
    grad_fn = jax.jit(jax.value_and_grad(loss, 1, has_aux=True), static_argnums=0)
    (_, (o_ref, s_ref)), g_ref = grad_fn("reference", diff)
    (_, (o_xla, s_xla)), g_xla = grad_fn("xla", diff)
    assert o_xla.dtype == jnp.bfloat16 and s_xla.dtype == jnp.float32
    np.testing.assert_allclose(o_xla.astype(jnp.float32), o_ref.astype(jnp.float32),
                               atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(s_xla, s_ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(jax.tree.leaves(g_xla), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32),
                                   atol=0.1, rtol=5e-2)


@pytest.mark.parametrize("name", ["retention", "gated_delta_rule"])
def test_split_sequence_continues_through_state(name):
    """Two calls chained by the final state equal one call over the whole sequence."""
    x = _inputs(jnp.float32)
    o, s = _run(name, x, "xla", None, None)
    first = {n: a[:, :20] for n, a in x.items() if n in ("q", "k", "v", "g", "beta")}
    rest = {n: a[:, 20:] for n, a in x.items() if n in ("q", "k", "v", "g", "beta")}
    o1, s1 = _run(name, first, "xla", None, None)
    o2, s2 = _run(name, rest, "reference", s1, None)
    np.testing.assert_allclose(jnp.concatenate([o1, o2], 1), o, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(s2, s, atol=2e-5, rtol=1e-4)


def test_segments_do_not_leak():
    """Changing one document leaves the outputs of the other documents unchanged."""
    x = _inputs(jnp.float32)
    o, _ = _run("gated_delta_rule", x, "xla", None, SEGMENTS)
    o2, _ = _run("gated_delta_rule", {**x, "v": x["v"].at[0, :10].add(1.0)}, "xla", None,
                 SEGMENTS)
    np.testing.assert_allclose(o2[0, 10:], o[0, 10:], atol=1e-6)
    assert not np.allclose(o2[0, :10], o[0, :10])


def test_linear_attention_matches_quadratic_form():
    """Identity feature map, no decay: the causal `(q k^T * mask) v` of Katharopoulos 2020."""
    x = _inputs(jnp.float32)
    scores = jnp.einsum("bthd,bshd->bhts", x["q"], x["k"]) * DK**-0.5
    want = jnp.einsum("bhts,bshd->bthd", jnp.tril(scores), x["v"])
    got = jax.jit(la.linear_attention, static_argnames="chunk_size")(
        x["q"], x["k"], x["v"], chunk_size=8)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_taylor_feature_map_kernel():
    x = _inputs(jnp.float32)
    q, k = x["q"][0, 0, 0], x["q"][0, 1, 0]
    s = 0.3
    dot = la.taylor_feature_map(q, s) @ la.taylor_feature_map(k, s)
    np.testing.assert_allclose(dot, 1 + s * (q @ k) + (s * (q @ k)) ** 2 / 2, rtol=1e-5)


def test_retention_decays():
    np.testing.assert_allclose(jnp.exp(la.retention_log_decays(3)),
                               [1 - 2**-5, 1 - 2**-6, 1 - 2**-7], rtol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda x: la.gla(x["q"], x["k"], x["v"], x["g"]), "g must have shape"),
    (lambda x: la.delta_rule(x["q"], x["k"], x["v"], x["g_dim"]), "beta must have shape"),
    (lambda x: la.retention(x["q"], x["k"], x["v"], impl="pallas_gpu"), "impl must be one of"),
    (lambda x: la.retention(x["q"], x["k"][:, :, :1], x["v"]), "q and k must have equal"),
    (lambda x: la.retention(x["q"], x["k"], x["v"], segment_ids=x["g"]), "segment_ids must"),
    (lambda x: la.retention(x["q"], x["k"], x["v"], initial_state=x["v"]), "initial_state must"),
    (lambda x: la.retention(x["q"], x["k"], x["v"], chunk_size=0), "chunk_size must"),
    (lambda x: la.retention(x["q"], x["k"], x["v"], log_decay=jnp.zeros(5)), "log_decay must"),
    (lambda x: la.linear_attention(x["q"], x["k"], x["v"], feature_map="exp"), "feature_map"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call(_inputs(jnp.float32))


def _rglru_loop(x, r, i, a_param, segment_ids, h):
    """RG-LRU written out token by token, as in De et al. 2024 (eq. 1-4)."""
    a = jax.nn.sigmoid(a_param) ** (8.0 * r)
    ys = []
    for t in range(x.shape[1]):
        start = (segment_ids[:, t] != segment_ids[:, t - 1]) if t else np.array([h is None] * 2)
        start = jnp.asarray(start)[:, None]
        prev = jnp.zeros_like(x[:, 0]) if h is None else h
        h = jnp.where(start, i[:, t] * x[:, t],
                      a[:, t] * prev + jnp.sqrt(1 - a[:, t] ** 2) * i[:, t] * x[:, t])
        ys.append(h)
    return jnp.stack(ys, 1), h


def test_rglru_matches_its_definition_with_grads():
    """With an initial state, and a document start inside (where the input is not scaled)."""
    rng = np.random.default_rng(2)
    x = _normal(rng, B, T, 5)
    r, i = jax.nn.sigmoid(_normal(rng, B, T, 5)), jax.nn.sigmoid(_normal(rng, B, T, 5))
    a_param = _normal(rng, 5) + 2.0
    h0 = _normal(rng, B, 5)
    want, want_h = jax.jit(_rglru_loop)(x, r, i, a_param, SEGMENTS, h0)

    def run(impl, x, r, i, a_param):
        return rg_lru(x, r, i, a_param, segment_ids=SEGMENTS, initial_state=h0,
                      return_final_state=True, impl=impl)

    got, got_h = jax.jit(run, static_argnums=0)("auto", x, r, i, a_param)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_h, want_h, atol=1e-5, rtol=1e-5)
    grads = {impl: jax.jit(jax.grad(lambda *a, impl=impl: run(impl, *a)[0].sum(),
                                    argnums=(0, 1, 2, 3)))(x, r, i, a_param)
             for impl in ("reference", "auto")}
    for a, b in zip(grads["auto"], grads["reference"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_rglru_bad_input_raises():
    x = jnp.zeros((B, T, 5))
    with pytest.raises(ValueError, match="a_param must have shape"):
        rg_lru(x, x, x, jnp.zeros(4))
    with pytest.raises(ValueError, match="r and i must have"):
        rg_lru(x, x[..., :2], x, jnp.zeros(5))
