"""Sequence-parallel linear recurrences: the diagonal scan, Mamba's selective scan, Mamba-2 SSD.

Each shard of the `sequence` mesh axis scans its tokens from a zero state, the shards'
summaries (`h_out = A h_in + b`) are combined across devices by
`longjax.parallel.state_passing.incoming_states`, and each shard corrects its local outputs
with the contribution of its incoming state (the recurrences are linear in the state). The
`sharded_*` functions run inside `jax.shard_map`; the `sequence_parallel_*` ones take global
arrays and a mesh. Document borders (`segment_ids`) that fall on shard borders are seen
through the previous shard's last id.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from longjax.ops import s4 as s4_lib
from longjax.ops import selective_scan as selective_scan_lib
from longjax.ops.scan import linear_scan, segment_keep
from longjax.ops.ssd import initial_state_output, ssd
from longjax.parallel.mesh import batch_axes
from longjax.parallel.state_passing import incoming_states


def _continues_from_previous_shard(segment_ids, axis_name):
    """`[B]` fp32: 1 where this shard's first token is in the previous shard's last document."""
    if segment_ids is None:
        return None
    n = jax.lax.axis_size(axis_name)
    previous_last = jax.lax.ppermute(segment_ids[:, -1], axis_name,
                                     [(i, i + 1) for i in range(n - 1)])
    first_shard = jax.lax.axis_index(axis_name) == 0
    return jnp.where(first_shard, True, segment_ids[:, 0] == previous_last).astype(jnp.float32)


def _leading(x, ndim):
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def sharded_linear_scan(a, b, *, axis_name, initial_state=None, segment_ids=None,
                        return_final_state=False, impl="auto"):
    """`longjax.ops.scan.linear_scan` (forward) on this shard's part of the time axis."""
    state_dtype = jnp.promote_types(b.dtype, jnp.float32)  # fp32, or complex64 (S4D)
    h_local = linear_scan(a, b, segment_ids=segment_ids, impl=impl).astype(state_dtype)
    # decay from the shard's start to each token: the same recurrence on b = 0, h_0 = 1
    decay = linear_scan(a, jnp.zeros(a.shape, a.dtype), segment_ids=segment_ids,
                        initial_state=jnp.ones((a.shape[0],) + a.shape[2:], a.dtype),
                        impl=impl)
    keep0 = _continues_from_previous_shard(segment_ids, axis_name)
    if keep0 is not None:
        decay = decay * _leading(keep0, decay.ndim)
    h_in, h_final = incoming_states(decay[:, -1], h_local[:, -1], axis_name=axis_name,
                                    initial_state=initial_state)
    h = (h_local + decay * h_in[:, None]).astype(b.dtype)
    return (h, h_final) if return_final_state else h


def _run_sharded(fn, mesh, axis_name, seq_args, replicated_args, return_final_state):
    """shard_map of `fn(**seq_args, **replicated_args)`: `seq_args` `[B, T, ...]` with the
    batch over the mesh's batch axes and time over `axis_name`; `replicated_args` whole,
    except their `initial_state` (`[B, ...]`), split over the batch like the final state
    that comes back."""
    n = mesh.shape[axis_name]
    batch_size = next(x for x in seq_args.values() if x is not None).shape[0]
    batch = batch_axes(mesh, batch_size, exclude=(axis_name,))
    for name, x in seq_args.items():
        if x is not None and x.shape[1] % n:
            raise ValueError(f"{name}: sequence length {x.shape[1]} must be divisible by the "
                             f"'{axis_name}' mesh axis size {n}")
    given = {k: v for k, v in {**seq_args, **replicated_args}.items() if v is not None}
    names, values = list(given), list(given.values())
    seq_spec = P(batch, axis_name)
    spec = {**{k: seq_spec for k in seq_args}, "initial_state": P(batch)}
    in_specs = tuple(spec.get(k, P()) for k in names)
    out_specs = (seq_spec, P(batch)) if return_final_state else seq_spec

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)
    def run(*args):
        return fn(**dict(zip(names, args, strict=True)))

    return run(*values)


def sequence_parallel_linear_scan(a, b, *, mesh, axis_name="sequence", initial_state=None,
                                  segment_ids=None, return_final_state=False, impl="auto"):
    """`linear_scan` on global `[B, T, ...]` arrays with T split over `axis_name` of `mesh`.

    `a` must have `b`'s shape except for trailing broadcast axes of size 1.
    """
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"a: must be [B, T, ...] like b {b.shape[:2]}; got {a.shape}")
    fn = functools.partial(sharded_linear_scan, axis_name=axis_name,
                           return_final_state=return_final_state, impl=impl)
    return _run_sharded(fn, mesh, axis_name, {"a": a, "b": b, "segment_ids": segment_ids},
                        {"initial_state": initial_state}, return_final_state)


def sequence_parallel_s4d_recurrence(u, Ab, Bb, C, *, mesh, axis_name="sequence",
                                     initial_state=None, segment_ids=None, impl="auto"):
    """`longjax.ops.s4.s4d_recurrence` on global arrays with T split over `axis_name`:
    `(y [B, T, H] fp32, final state [B, H, N/2] complex64)`."""

    def fn(u, Ab, Bb, C, initial_state=None, segment_ids=None):
        b = s4_lib.s4d_inputs(u, Bb)
        x, last = sharded_linear_scan(jnp.broadcast_to(Ab, b.shape), b, axis_name=axis_name,
                                      initial_state=initial_state, segment_ids=segment_ids,
                                      return_final_state=True, impl=impl)
        return s4_lib.s4d_readout(C, x), last

    return _run_sharded(fn, mesh, axis_name, {"u": u, "segment_ids": segment_ids},
                        {"Ab": Ab, "Bb": Bb, "C": C, "initial_state": initial_state}, True)


def sequence_parallel_s4_recurrence(u, Ab, Bb, C, *, mesh, axis_name="sequence",
                                    initial_state=None, segment_ids=None):
    """`longjax.ops.s4.s4_recurrence` (dense `Ab [H, N, N]`) on global arrays with T split
    over `axis_name`: each shard's transition is `Ab^T` (zero past a document border), the
    states are passed as matrices, and the incoming state's outputs come from a second
    pass from it. `(y [B, T, H] fp32, final state [B, H, N] complex64)`."""

    def fn(u, Ab, Bb, C, initial_state=None, segment_ids=None):
        Bsz, T, _ = u.shape
        y, x_local = s4_lib.s4_recurrence(u, Ab, Bb, C, segment_ids=segment_ids)
        keep0 = _continues_from_previous_shard(segment_ids, axis_name)
        through = _through(_keep(segment_ids, (Bsz, T)), keep0)
        transition = jnp.linalg.matrix_power(Ab, T)[None] * through[:, None, None, None]
        h_in, h_final = incoming_states(transition, x_local, axis_name=axis_name,
                                        initial_state=initial_state, diagonal=False)
        if keep0 is not None:
            h_in = h_in * keep0[:, None, None]
        y_in, _ = s4_lib.s4_recurrence(jnp.zeros_like(u), Ab, Bb, C, initial_state=h_in,
                                       segment_ids=segment_ids)
        return y + y_in, h_final

    return _run_sharded(fn, mesh, axis_name, {"u": u, "segment_ids": segment_ids},
                        {"Ab": Ab, "Bb": Bb, "C": C, "initial_state": initial_state}, True)


def _keep(segment_ids, shape):
    return jnp.ones(shape, jnp.float32) if segment_ids is None else segment_keep(segment_ids)


def _through(keep, keep0):
    """`[B]`: 1 where the state entering the shard survives to its end (no border inside)."""
    alive = jnp.prod(keep, axis=1)
    return alive if keep0 is None else alive * keep0


def sharded_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, *, axis_name, initial_state=None,
                           segment_ids=None, return_final_state=False, impl="auto",
                           chunk_size=None):
    """`longjax.ops.selective_scan.selective_scan` on this shard's part of the time axis.

    The incoming state's contribution is a second scan of this shard with `u = 0` started
    from it (the same cost as the first: Mamba's decay is per channel and state index).
    """
    impl = "xla" if impl == "auto" else impl
    Bsz, T, Dch = u.shape
    u_g, dt_g, A_g, B_g, C_g, h0 = selective_scan_lib.prepare(
        u, delta, A, B, C, delta_bias, delta_softplus, initial_state)
    keep = _keep(segment_ids, (Bsz, T))
    core = functools.partial(selective_scan_lib.selective_scan_core, A=A_g, B=B_g, C=C_g,
                             keep=keep, impl=impl, chunk_size=chunk_size)
    y, h_local = core(u_g, dt_g, h0=jnp.zeros_like(h0))
    keep0 = _continues_from_previous_shard(segment_ids, axis_name)
    through = _through(keep, keep0)[:, None, None, None]
    decay = jnp.exp(A_g * jnp.sum(dt_g, axis=1)[..., None]) * through
    h_in, h_final = incoming_states(decay, h_local, axis_name=axis_name, initial_state=h0)
    if keep0 is not None:
        h_in = h_in * keep0[:, None, None, None]
    y = y + core(jnp.zeros_like(u_g), dt_g, h0=h_in)[0]
    y = selective_scan_lib.finish(y.reshape(Bsz, T, Dch), u, D, z)
    return (y, h_final.reshape(Bsz, Dch, -1)) if return_final_state else y


def sequence_parallel_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                                     delta_softplus=False, *, mesh, axis_name="sequence",
                                     initial_state=None, segment_ids=None,
                                     return_final_state=False, impl="auto", chunk_size=None):
    """`selective_scan` on global arrays with T split over `axis_name` of `mesh`."""
    fn = functools.partial(sharded_selective_scan, delta_softplus=delta_softplus,
                           axis_name=axis_name, return_final_state=return_final_state,
                           impl=impl, chunk_size=chunk_size)
    seq = {"u": u, "delta": delta, "B": B, "C": C, "z": z, "segment_ids": segment_ids}
    rep = {"A": A, "D": D, "delta_bias": delta_bias, "initial_state": initial_state}
    return _run_sharded(fn, mesh, axis_name, seq, rep, return_final_state)


def sharded_ssd(x, dt, A, B, C, *, axis_name, chunk_size=64, D=None, initial_state=None,
                segment_ids=None, return_final_state=False, impl="auto"):
    """`longjax.ops.ssd.ssd` on this shard's part of the time axis."""
    Bsz, T, H, P = x.shape
    y, h_local = ssd(x, dt, A, B, C, chunk_size=chunk_size, segment_ids=segment_ids,
                     return_final_state=True, impl=impl)
    keep = _keep(segment_ids, (Bsz, T))
    keep0 = _continues_from_previous_shard(segment_ids, axis_name)
    dtA = dt.astype(jnp.float32) * A.astype(jnp.float32)
    decay = jnp.exp(jnp.sum(dtA, axis=1)) * _through(keep, keep0)[:, None]
    h_in, h_final = incoming_states(decay[..., None, None], h_local, axis_name=axis_name,
                                    initial_state=initial_state)
    if keep0 is not None:
        h_in = h_in * keep0[:, None, None, None]
    y = y.astype(jnp.float32) + initial_state_output(
        dt.astype(jnp.float32), A.astype(jnp.float32), C.astype(jnp.float32), h_in, keep)
    if D is not None:
        y = y + D.astype(jnp.float32)[:, None] * x.astype(jnp.float32)
    y = y.astype(x.dtype)
    return (y, h_final) if return_final_state else y


def sequence_parallel_ssd(x, dt, A, B, C, *, mesh, axis_name="sequence", chunk_size=64, D=None,
                          initial_state=None, segment_ids=None, return_final_state=False,
                          impl="auto"):
    """`ssd` on global arrays with T split over `axis_name` of `mesh`."""
    fn = functools.partial(sharded_ssd, axis_name=axis_name, chunk_size=chunk_size,
                           return_final_state=return_final_state, impl=impl)
    seq = {"x": x, "dt": dt, "B": B, "C": C, "segment_ids": segment_ids}
    rep = {"A": A, "D": D, "initial_state": initial_state}
    return _run_sharded(fn, mesh, axis_name, seq, rep, return_final_state)
