"""Sequence-parallel recurrences on 8 simulated devices equal their unsharded versions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from longjax.ops import s4
from longjax.ops.scan import linear_scan
from longjax.ops.selective_scan import selective_scan
from longjax.ops.ssd import ssd
from longjax.parallel.mesh import make_mesh
from longjax.parallel.sequence_scan import (
    sequence_parallel_linear_scan,
    sequence_parallel_s4_recurrence,
    sequence_parallel_s4d_recurrence,
    sequence_parallel_selective_scan,
    sequence_parallel_ssd,
)
from longjax.parallel.state_passing import incoming_states

N_SHARDS = 8


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"sequence": N_SHARDS})


def _expected_incoming(As, bs, h0, matmul):
    h, entering = h0, []
    for A, b in zip(As, bs, strict=True):
        entering.append(h)
        h = matmul(A, h) + b
    return np.stack(entering), h


@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("with_initial", [True, False])
def test_incoming_states(mesh, diagonal, with_initial):
    rng = np.random.default_rng(0)
    batch, S, R = 2, 3, 4
    bs = rng.normal(size=(N_SHARDS, batch, S, R)).astype(np.float32)
    if diagonal:
        As = rng.uniform(0.2, 1.0, size=(N_SHARDS, batch, 1, R)).astype(np.float32)
        matmul = lambda A, h: A * h
    else:
        As = (0.5 * rng.normal(size=(N_SHARDS, batch, S, S))).astype(np.float32)
        matmul = lambda A, h: A @ h
    h0 = rng.normal(size=(batch, S, R)).astype(np.float32) if with_initial else None

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("sequence"), P("sequence"), P()),
                       out_specs=(P("sequence"), P()), check_vma=False)
    def run(A, b, init):
        h_in, h_final = incoming_states(A[0], b[0], axis_name="sequence",
                                        initial_state=init if with_initial else None,
                                        diagonal=diagonal)
        return h_in[None], h_final

    init = jnp.zeros((batch, S, R)) if h0 is None else h0
    got_in, got_final = run(As, bs, init)
    want_in, want_final = _expected_incoming(As, bs, np.zeros_like(bs[0]) if h0 is None else h0,
                                             matmul)
    np.testing.assert_allclose(got_in, want_in, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_final, want_final, rtol=1e-5, atol=1e-5)


def test_incoming_states_bad_shapes():
    with pytest.raises(ValueError, match="diagonal A"):
        incoming_states(jnp.ones((3, 5)), jnp.ones((3, 4)), axis_name="sequence")
    with pytest.raises(ValueError, match="matrix A"):
        incoming_states(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)), axis_name="sequence",
                        diagonal=False)
    with pytest.raises(ValueError, match="initial_state"):
        incoming_states(jnp.ones((3, 4)), jnp.ones((3, 4)), axis_name="sequence",
                        initial_state=jnp.ones((4,)))


def _segments(rng, B, T):
    return jnp.asarray(np.sort(rng.integers(0, 4, size=(B, T)), axis=1), jnp.int32)


def test_sequence_parallel_linear_scan(mesh):
    rng = np.random.default_rng(1)
    B, T, D = 2, 8 * 5, 3
    a = jnp.asarray(rng.uniform(0.5, 1.0, size=(B, T, D, 1)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(B, T, D, 2)), jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(B, D, 2)), jnp.float32)
    seg = _segments(rng, B, T)
    got, got_last = sequence_parallel_linear_scan(a, b, mesh=mesh, initial_state=h0,
                                                  segment_ids=seg, return_final_state=True)
    want, want_last = linear_scan(a, b, initial_state=h0, segment_ids=seg,
                                  return_final_state=True, impl="reference")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_last, want_last, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        sequence_parallel_linear_scan(a[:, :9], b[:, :9], mesh=mesh)


def test_sequence_parallel_selective_scan(mesh):
    rng = np.random.default_rng(2)
    B, T, D, N, G = 2, 8 * 3, 4, 3, 2
    x = dict(u=rng.normal(size=(B, T, D)), delta=rng.normal(size=(B, T, D)),
             A=-rng.uniform(0.5, 2.0, size=(D, N)), B=rng.normal(size=(B, T, G, N)),
             C=rng.normal(size=(B, T, G, N)), D=rng.normal(size=(D,)),
             z=rng.normal(size=(B, T, D)), delta_bias=rng.normal(size=(D,)),
             initial_state=rng.normal(size=(B, D, N)))
    x = {k: jnp.asarray(v, jnp.float32) for k, v in x.items()}
    seg = _segments(rng, B, T)
    got, got_last = sequence_parallel_selective_scan(
        **x, delta_softplus=True, mesh=mesh, segment_ids=seg, return_final_state=True)
    want, want_last = selective_scan(**x, delta_softplus=True, segment_ids=seg,
                                     return_final_state=True, impl="reference")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_last, want_last, rtol=1e-4, atol=1e-4)


def test_sequence_parallel_ssd(mesh):
    rng = np.random.default_rng(3)
    B, T, H, P, G, N = 2, 8 * 6, 4, 2, 2, 3
    x = dict(x=rng.normal(size=(B, T, H, P)), dt=rng.uniform(0.05, 0.5, size=(B, T, H)),
             A=-rng.uniform(0.5, 2.0, size=(H,)), B=rng.normal(size=(B, T, G, N)),
             C=rng.normal(size=(B, T, G, N)), D=rng.normal(size=(H,)),
             initial_state=rng.normal(size=(B, H, P, N)))
    x = {k: jnp.asarray(v, jnp.float32) for k, v in x.items()}
    seg = _segments(rng, B, T)
    got, got_last = sequence_parallel_ssd(**x, mesh=mesh, chunk_size=4, segment_ids=seg,
                                          return_final_state=True)
    want, want_last = ssd(**x, segment_ids=seg, return_final_state=True, impl="reference")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_last, want_last, rtol=1e-4, atol=1e-4)


def _numpy_ssm(u, Ab, Bb, C, x0, segment_ids, diagonal):
    """S4 / S4D recurrent mode written from the papers, in complex128: x_t = Ab x_{t-1} +
    Bb u_t (state zeroed where a new document starts), y_t = Re(C x_t); S4D keeps one of
    each conjugate pair, so its output is 2 Re(C x_t)."""
    Bsz, T, H = u.shape
    x, ys = np.array(x0, np.complex128), np.zeros((Bsz, T, H))
    for t in range(T):
        new_doc = segment_ids[:, t] != segment_ids[:, t - 1] if t else np.zeros(Bsz, bool)
        x = np.where(new_doc[:, None, None], 0, x)
        x = (Ab * x if diagonal else np.einsum("hnm,bhm->bhn", Ab, x)) + u[:, t, :, None] * Bb
        ys[:, t] = (2 if diagonal else 1) * np.einsum("hn,bhn->bh", C, x).real
    return ys, x


@pytest.mark.parametrize("kind", ["s4d", "s4"])
def test_sequence_parallel_s4_recurrences(mesh, kind):
    """S4D (diagonal, ZOH) and S4 (dense DPLR, bilinear) split over 8 devices equal the
    unsharded op and the recurrence from the papers, packed documents and an initial
    state included."""
    rng = np.random.default_rng(4)
    Bsz, T, H, N = 2, 8 * 3, 3, 4
    dt = jnp.asarray(rng.uniform(0.05, 0.3, H), jnp.float32)
    if kind == "s4d":
        Lambda, B = (jnp.asarray(np.tile(v, (H, 1)), jnp.complex64) for v in s4.s4d_init(N))
        Ab, Bb = s4.discretize(Lambda, B, dt, "zoh")
        op, sharded, n = s4.s4d_recurrence, sequence_parallel_s4d_recurrence, N // 2
    else:
        Lambda, p, B = (jnp.asarray(np.tile(v, (H, 1)), jnp.complex64) for v in s4.dplr_legs(N))
        Ab, Bb = s4.s4_dense(Lambda, p, B, dt)
        op, sharded, n = s4.s4_recurrence, sequence_parallel_s4_recurrence, N
    C = jnp.asarray(rng.normal(size=(H, n)) + 1j * rng.normal(size=(H, n)), jnp.complex64)
    u = jnp.asarray(rng.normal(size=(Bsz, T, H)), jnp.float32)
    x0 = jnp.asarray(rng.normal(size=(Bsz, H, n)) + 1j * rng.normal(size=(Bsz, H, n)),
                     jnp.complex64)
    seg = _segments(rng, Bsz, T)
    got = sharded(u, Ab, Bb, C, mesh=mesh, initial_state=x0, segment_ids=seg)
    want = op(u, Ab, Bb, C, initial_state=x0, segment_ids=seg)
    paper = _numpy_ssm(*(np.asarray(a) for a in (u, Ab, Bb, C, x0, seg)), kind == "s4d")
    for g, w, r in zip(got, want, paper, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
