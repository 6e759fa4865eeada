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

from longjax.ops.scan import linear_scan
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
    h_local = linear_scan(a, b, segment_ids=segment_ids, impl=impl).astype(jnp.float32)
    # decay from the shard's start to each token: the same recurrence on b = 0, h_0 = 1
    decay = linear_scan(a, jnp.zeros(a.shape, jnp.float32), segment_ids=segment_ids,
                        initial_state=jnp.ones((a.shape[0],) + a.shape[2:], jnp.float32),
                        impl=impl)
    keep0 = _continues_from_previous_shard(segment_ids, axis_name)
    if keep0 is not None:
        decay = decay * _leading(keep0, decay.ndim)
    h_in, h_final = incoming_states(decay[:, -1], h_local[:, -1], axis_name=axis_name,
                                    initial_state=initial_state)
    h = (h_local + decay * h_in[:, None]).astype(b.dtype)
    return (h, h_final) if return_final_state else h


def _run_sharded(fn, mesh, axis_name, seq_args, replicated_args, return_final_state):
    """shard_map of `fn(*seq_args, *replicated_args)` with time (axis 1) split over the axis."""
    seq_spec = P(None, axis_name)
    n = mesh.shape[axis_name]
    for name, x in seq_args.items():
        if x is not None and x.shape[1] % n:
            raise ValueError(f"{name}: sequence length {x.shape[1]} must be divisible by the "
                             f"'{axis_name}' mesh axis size {n}")
    given = {k: v for k, v in {**seq_args, **replicated_args}.items() if v is not None}
    names, values = list(given), list(given.values())
    in_specs = tuple(seq_spec if k in seq_args else P() for k in names)
    out_specs = (seq_spec, P()) if return_final_state else seq_spec

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
