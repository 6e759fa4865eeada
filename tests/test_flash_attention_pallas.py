"""Pallas flash-attention kernels (GPU and TPU) through the interpreter, against the reference."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.ops.attention import dot_product_attention, reference_attention
from longjax.ops.masks import EMPTY, MaskSpec
from pallas_kernels import flash_attention
from pallas_kernels.flash_attention import common

TOL = {jnp.float32: (2e-5, 1e-4), jnp.bfloat16: (3e-2, 1.5e-1)}  # (out and lse, grads)


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
    out, lse = flash_attention.forward(q, k, v, **blocks, **kw)
    dq, dk, dv, dslopes = flash_attention.backward(q, k, v, out, lse, do, **blocks, **kw)

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


SPECS = [MaskSpec(c, w, n) for c in (False, True) for w in (None, 0, 3, 9) for n in (0, 2, 5)
         if w is not None or n == 0]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("segments", [False, True])
def test_block_ranges_cover_exactly_the_visible_tiles(spec, segments):
    """kv_blocks / q_blocks visit every non-empty tile, only FULL ones unmasked, and
    (sink blocks aside) no empty ones."""
    for T, S, bq, bk in itertools.product((1, 13, 32), (7, 40), (4, 8), (4, 16)):
        st = common.Static(spec=spec, T=T, S=S, bq=bq, bk=bk, H=1, K=1, D=8, scale=1.0,
                           softcap=None, has_positions=False, has_segments=segments,
                           has_alibi=False)
        tiles = spec.tile_map(T, S, bq, bk, has_segments=segments)
        sink = np.arange(st.nk) < st.sink_blocks
        # Unmasked tiles: every real query sees every (real) key; padded rows don't matter.
        seen = np.ones((st.Tp, st.Sp), bool)
        seen[:, S:] = False
        seen[:T, :S] = spec.visible(np.arange(T)[:, None], np.arange(S)[None])
        full = seen.reshape(st.nq, bq, st.nk, bk).all((1, 3)) & (not segments)
        for i in range(st.nq):
            sink_hi, lo, full_lo, full_hi, hi = (int(x) for x in common.kv_blocks(st, i))
            band = np.zeros(st.nk, bool)
            band[lo:hi] = True
            visited = band | (np.arange(st.nk) < sink_hi)
            assert (visited >= (tiles[i] != EMPTY)).all()
            np.testing.assert_array_equal(band, (tiles[i] != EMPTY) & ~sink)
            assert full[i, full_lo:full_hi].all()
        for j in range(st.nk):
            lo, full_lo, full_hi, hi = (int(x) for x in common.q_blocks(st, j))
            visited = np.zeros(st.nq, bool)
            visited[lo:hi] = True
            assert (visited >= (tiles[:, j] != EMPTY)).all()
            if not sink[j]:
                np.testing.assert_array_equal(visited, tiles[:, j] != EMPTY)
            assert full[full_lo:full_hi, j].all()


def test_bad_backend_and_bias_raise():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="backend must be one of"):
        flash_attention.forward(q, q, q, backend="cpu", causal=True, window=None, num_sinks=0,
                                segment_ids=None, kv_segment_ids=None, q_positions=None,
                                kv_positions=None, alibi_slopes=None, softcap=None, scale=None)
    with pytest.raises(ValueError, match="bias is not supported"):
        dot_product_attention(q, q, q, bias=jnp.zeros((8, 8)), impl="pallas_interpret")
