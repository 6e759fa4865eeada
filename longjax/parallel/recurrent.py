"""The recurrent ops as the mixers call them: sequence-parallel under a sequence mesh.

Each function has the signature of its op in `longjax.ops` and runs that op, unless the
current mesh (`jax.set_mesh`) splits the `sequence` axis (`mesh.sequence_mesh`); then it
runs the op's sequence-parallel form (`sequence_scan`, `sequence_linear`: local chunked
pass, states passed across shards, resets at document borders on shard borders), with
the batch split over the mesh's batch axes. The rest of a mixer (projections, short
convolutions, norms) stays with the compiler's sharding propagation, which exchanges the
convolutions' halos itself.
"""

from __future__ import annotations

from longjax.ops import linear_attention as la
from longjax.ops import rglru as rglru_lib
from longjax.ops import s4 as s4_lib
from longjax.ops import selective_scan as selective_scan_lib
from longjax.ops import ssd as ssd_lib
from longjax.parallel import sequence_linear, sequence_scan
from longjax.parallel.mesh import sequence_mesh


def _local_state_norm(op: str, kwargs) -> None:
    """ValueError for `state_norm` under a sequence mesh: the clipped recurrence is not
    linear, so it has no chunked sequence-parallel form (it runs token by token)."""
    if kwargs.get("state_norm") is not None:
        raise ValueError(f"{op}: state_norm (Stuffed Mamba's state normalization) runs token "
                         f"by token and has no sequence-parallel form; evaluate without a "
                         f"mesh whose 'sequence' axis splits the sequence")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   **kwargs):
    """`longjax.ops.selective_scan.selective_scan`."""
    mesh = sequence_mesh()
    if mesh is None:
        return selective_scan_lib.selective_scan(u, delta, A, B, C, D, z, delta_bias,
                                                 delta_softplus, **kwargs)
    _local_state_norm("selective_scan", kwargs)
    return sequence_scan.sequence_parallel_selective_scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, mesh=mesh, **kwargs)


def ssd(x, dt, A, B, C, **kwargs):
    """`longjax.ops.ssd.ssd`."""
    mesh = sequence_mesh()
    if mesh is None:
        return ssd_lib.ssd(x, dt, A, B, C, **kwargs)
    _local_state_norm("ssd", kwargs)
    return sequence_scan.sequence_parallel_ssd(x, dt, A, B, C, mesh=mesh, **kwargs)


def s4d_recurrence(u, Ab, Bb, C, **kwargs):
    """`longjax.ops.s4.s4d_recurrence`."""
    mesh = sequence_mesh()
    if mesh is None:
        return s4_lib.s4d_recurrence(u, Ab, Bb, C, **kwargs)
    return sequence_scan.sequence_parallel_s4d_recurrence(u, Ab, Bb, C, mesh=mesh, **kwargs)


def s4_recurrence(u, Ab, Bb, C, **kwargs):
    """`longjax.ops.s4.s4_recurrence`."""
    mesh = sequence_mesh()
    if mesh is None:
        return s4_lib.s4_recurrence(u, Ab, Bb, C, **kwargs)
    return sequence_scan.sequence_parallel_s4_recurrence(u, Ab, Bb, C, mesh=mesh, **kwargs)


def rg_lru(x, r, i, a_param, *, first_is_start=True, **kwargs):
    """`longjax.ops.rglru.rg_lru`; split over the sequence, the first token starts a
    document (`first_is_start=True`, the training case)."""
    mesh = sequence_mesh()
    if mesh is None:
        return rglru_lib.rg_lru(x, r, i, a_param, first_is_start=first_is_start, **kwargs)
    if first_is_start is not True:
        raise ValueError("sequence-parallel rg_lru needs first_is_start=True (a cached "
                         "continuation runs on one device)")
    return sequence_linear.sequence_parallel_rg_lru(x, r, i, a_param, mesh=mesh, **kwargs)


def linear(op, *arrays, impl="auto", **kwargs):
    """The linear-attention op named `op` (`sequence_linear.OPS`: "gla", "retention", ...)
    on its per-token `arrays`; the sequence-parallel form runs its chunked recurrence."""
    mesh = sequence_mesh()
    if mesh is None:
        return getattr(la, op)(*arrays, impl=impl, **kwargs)
    return sequence_linear.sequence_parallel_linear(op, *arrays, mesh=mesh, **kwargs)
