"""dot_product_attention: "xla" (blockwise, custom VJP) against the reference oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longjax.ops.attention import (
    attention_backward,
    attention_forward,
    dot_product_attention,
    reference_attention,
)

# Tolerances (max abs error, inputs ~N(0, 1)): fp32 blockwise vs materialised softmax
# differ by summation order only; bf16 differs by the rounding of p and of the outputs.
TOL = {jnp.float32: dict(out=2e-5, grad=1e-4), jnp.bfloat16: dict(out=3e-2, grad=1.5e-1)}

MASKS = {
    "bidirectional": dict(),
    "causal": dict(causal=True),
    "causal_window": dict(causal=True, window=5),
    "lambda": dict(causal=True, window=6, num_sinks=3),
    "segments": dict(causal=True, segments=True),
    "window_segments_softcap": dict(window=9, segments=True, softcap=2.0),
    "alibi": dict(causal=True, alibi=True),
    "positions": dict(causal=True, window=8, positions=True),
}


def _inputs(seed, B, T, S, H, K, D, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), dtype)
    k = jax.random.normal(ks[1], (B, S, K, D), dtype)
    v = jax.random.normal(ks[2], (B, S, K, D), dtype)
    do = jax.random.normal(ks[3], (B, T, H, D), dtype)
    return q, k, v, do


def _mask_kwargs(kind, B, T, S, H, seed=0):
    kw = dict(MASKS[kind])
    rng = np.random.default_rng(seed)
    if kw.pop("segments", False):
        seg = np.sort(rng.integers(0, 4, (B, T)), axis=1)  # 0 = padding at the start
        kw["segment_ids"] = jnp.asarray(seg, jnp.int32)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = jnp.asarray(2.0 ** -np.arange(1, H + 1), jnp.float32)
    if kw.pop("positions", False):  # a KV cache: queries at slots S - T .. S - 1
        kw["q_positions"] = jnp.broadcast_to(S - T + jnp.arange(T), (B, T))
        kw["kv_positions"] = jnp.broadcast_to(jnp.arange(S), (B, S))
    return kw


def _loss_grads(impl, q, k, v, do, dlse, kw, diff_extra=()):
    """Output, lse and the gradients of <out, do> + <lse, dlse> wrt q, k, v (+ extras)."""
    extras = {name: kw[name] for name in diff_extra}
    rest = {n: x for n, x in kw.items() if n not in extras}

    def f(q, k, v, extras):
        if impl == "reference":
            out, lse = reference_attention(q, k, v, return_lse=True, **rest, **extras)
        else:
            out, lse = dot_product_attention(q, k, v, return_lse=True, impl=impl, block_q=8,
                                             block_k=16, **rest, **extras)
        loss = (out.astype(jnp.float32) * do.astype(jnp.float32)).sum()
        return loss + jnp.where(jnp.isfinite(lse), lse * dlse, 0.0).sum(), (out, lse)

    grads, (out, lse) = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True))(
        q, k, v, extras)
    return out, lse, grads


def _assert_close(a, b, tol, what):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a) == np.isfinite(b)), what
    finite = np.isfinite(b)
    np.testing.assert_allclose(a[finite], b[finite], atol=tol, rtol=tol, err_msg=what)


def _reference_vjp(q, k, v, do, kw):
    """Gradients of <reference(q, k, v), do>, compiled as one program."""

    @jax.jit
    def grads(q, k, v, do):
        return jax.vjp(lambda q, k, v: reference_attention(q, k, v, **kw), q, k, v)[1](do)

    return grads(q, k, v, do)


def _compare(kind, B, T, S, H, K, D, dtype=jnp.float32, seed=0, diff_extra=(), impl="xla",
             kw=None):
    q, k, v, do = _inputs(seed, B, T, S, H, K, D, dtype)
    dlse = jax.random.normal(jax.random.PRNGKey(seed + 1), (B, H, T))
    kw = _mask_kwargs(kind, B, T, S, H, seed) if kw is None else kw
    got = _loss_grads(impl, q, k, v, do, dlse, kw, diff_extra)
    # The oracle sees the same (rounded) inputs and computes in fp32.
    up = [x.astype(jnp.float32) for x in (q, k, v, do)]
    want = _loss_grads("reference", *up, dlse, kw, diff_extra)
    tol = TOL[dtype]
    _assert_close(got[0], want[0], tol["out"], "out")
    _assert_close(got[1], want[1], tol["out"], "lse")
    for name, a, b in zip(("dq", "dk", "dv"), got[2][:3], want[2][:3], strict=True):
        assert a.dtype == dtype, name
        _assert_close(a, b, tol["grad"], name)
    for name in diff_extra:
        _assert_close(got[2][3][name], want[2][3][name], tol["grad"], name)


@pytest.mark.parametrize(
    "kind, H, K, D, T, S",
    [
        ("bidirectional", 4, 4, 64, 37, 37),
        ("causal", 4, 2, 64, 37, 37),
        ("causal_window", 8, 1, 128, 33, 33),
        ("lambda", 4, 1, 64, 37, 37),
        ("segments", 4, 2, 64, 37, 37),
        ("window_segments_softcap", 8, 2, 64, 37, 37),
        ("alibi", 4, 2, 64, 37, 37),
        ("positions", 4, 1, 64, 5, 37),
    ],
)
def test_xla_matches_reference_fp32(kind, H, K, D, T, S):
    extra = ("alibi_slopes",) if kind == "alibi" else ()
    _compare(kind, B=2, T=T, S=S, H=H, K=K, D=D, diff_extra=extra)


@pytest.mark.parametrize("kind", ["lambda", "segments"])
def test_xla_matches_reference_bf16(kind):
    _compare(kind, B=1, T=45, S=45, H=4, K=2, D=64, dtype=jnp.bfloat16)


def test_bias_gradient(monkeypatch):
    B, T, H = 2, 21, 4
    bias = jax.random.normal(jax.random.PRNGKey(3), (1, H, T, T))  # broadcast over batch
    monkeypatch.setitem(MASKS, "bias", dict(causal=True, bias=bias))
    _compare("bias", B=B, T=T, S=T, H=H, K=2, D=16, diff_extra=("bias",))


def test_fully_masked_rows_are_zero_with_finite_gradients():
    B, T, H, D = 1, 12, 2, 8
    q, k, v, do = _inputs(0, B, T, T, H, H, D)
    seg = jnp.array([[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
    for kw in (dict(segment_ids=seg, causal=True), dict(window=0)):
        def f(q, k, v, kw=kw):
            out, lse = dot_product_attention(q, k, v, return_lse=True, impl="xla", block_q=8,
                                             block_k=8, **kw)
            return (out * do).sum(), (out, lse)

        grads, (out, lse) = jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        empty = np.isneginf(np.asarray(lse)).transpose(0, 2, 1)  # [B, T, H]
        assert empty.any()
        np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)
        assert all(bool(jnp.isfinite(g).all()) for g in grads)


def test_forward_backward_api_matches_autodiff():
    """The per-block API ring attention builds on: (out, lse) and FA-2 gradients."""
    q, k, v, do = _inputs(1, 1, 29, 29, 4, 2, 16)
    kw = dict(causal=True, window=11, num_sinks=2)
    out, lse = attention_forward(q, k, v, block_q=8, block_k=8, **kw)
    ref_out, ref_lse = reference_attention(q, k, v, return_lse=True, **kw)
    _assert_close(out, ref_out, 2e-5, "out")
    _assert_close(lse, ref_lse, 2e-5, "lse")
    dq, dk, dv = attention_backward(q, k, v, out, lse, do, block_q=8, block_k=8, **kw)
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), _reference_vjp(q, k, v, do, kw),
                          strict=True):
        _assert_close(a, b, 1e-4, name)


@settings(max_examples=4, deadline=None)
@given(
    B=st.integers(1, 2), T=st.integers(1, 40), S=st.integers(1, 40),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (8, 2)]), D=st.sampled_from([8, 16]),
    causal=st.booleans(), window=st.one_of(st.none(), st.integers(0, 12)),
    num_sinks=st.integers(0, 3), segments=st.booleans(), seed=st.integers(0, 2**16),
)
def test_xla_hypothesis(B, T, S, heads, D, causal, window, num_sinks, segments, seed):
    H, K = heads
    q, k, v, do = _inputs(seed, B, T, S, H, K, D)
    kw = dict(causal=causal, window=window, num_sinks=num_sinks)
    if segments:
        rng = np.random.default_rng(seed)
        kw["segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), 1), jnp.int32)
        kw["kv_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), 1), jnp.int32)
    out, lse = attention_forward(q, k, v, block_q=8, block_k=8, **kw)
    ref_out, ref_lse = reference_attention(q, k, v, return_lse=True, **kw)
    _assert_close(out, ref_out, 2e-5, "out")
    _assert_close(lse, ref_lse, 2e-5, "lse")
    grads = attention_backward(q, k, v, out, lse, do, block_q=8, block_k=8, **kw)
    for name, a, b in zip(("dq", "dk", "dv"), grads, _reference_vjp(q, k, v, do, kw),
                          strict=True):
        _assert_close(a, b, 1e-4, name)


@pytest.mark.parametrize("T, options, dtype", [
    (1, dict(), jnp.float32),
    (1, dict(window=100, num_sinks=4, softcap=3.0), jnp.float32),
    (3, dict(alibi=True), jnp.float32),
    (1, dict(), jnp.bfloat16),
])
def test_split_kv_decode_matches_reference(T, options, dtype):
    """The decode path: T queries at the end of a cache of 301 slots (the last 30 empty,
    one row's first 60 padding) in splits of 16 keys; output, lse and gradients."""
    B, S, H = 2, 301, 4
    options = dict(options)
    kv_seg = np.ones((B, S), np.int32)
    kv_seg[:, -30:], kv_seg[1, :60] = 0, 0
    kw = dict(causal=True, q_positions=jnp.broadcast_to(S - 30 - T + jnp.arange(T), (B, T)),
              kv_positions=jnp.broadcast_to(jnp.arange(S), (B, S)),
              segment_ids=jnp.ones((B, T), jnp.int32), kv_segment_ids=jnp.asarray(kv_seg))
    if options.pop("alibi", False):
        kw["alibi_slopes"] = jnp.asarray(2.0 ** -np.arange(1, H + 1), jnp.float32)
    _compare(None, B, T, S, H, 2, 16, dtype, impl="split_kv", kw={**kw, **options})


def test_impls_agree_through_dispatcher():
    q, k, v, _ = _inputs(2, 1, 20, 20, 2, 2, 16)
    ref = dot_product_attention(q, k, v, causal=True, impl="reference")
    for impl in ("auto", "xla", "pallas_interpret"):
        out = dot_product_attention(q, k, v, causal=True, impl=impl, block_q=16, block_k=16)
        _assert_close(out, ref, 2e-5, impl)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=jnp.zeros((1, 8, 2, 8))), "head_dim differ"),
        (dict(q=jnp.zeros((1, 8, 3, 16))), "multiple of key/value heads"),
        (dict(window=-1), "window must be"),
        (dict(num_sinks=-2), "num_sinks must be"),
        (dict(impl="flash"), "impl must be one of"),
        (dict(impl="cudnn"), "cudnn"),
        (dict(q=jnp.zeros((1, 8, 2, 16), jnp.int32)), "supports q/k/v dtypes"),
        (dict(segment_ids=jnp.ones((1, 7), jnp.int32)), "segment_ids must be"),
        (dict(q_positions=jnp.zeros((1, 8), jnp.int32)), "given together"),
        (dict(bias=jnp.zeros((3, 8, 8))), "bias must broadcast"),
        (dict(alibi_slopes=jnp.zeros((3,))), "alibi_slopes must be"),
        (dict(bias=jnp.zeros((8, 8)), impl="pallas_interpret"), "bias is not supported"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    args = dict(q=jnp.zeros((1, 8, 2, 16)), k=jnp.zeros((1, 8, 2, 16)),
                v=jnp.zeros((1, 8, 2, 16)), impl="xla")
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    if q.dtype == jnp.int32:
        k, v = k.astype(jnp.int32), v.astype(jnp.int32)
    with pytest.raises(ValueError, match=message):
        dot_product_attention(q, k, v, **args)
