"""Sequence parallelism for the linear-attention ops and RG-LRU (LASP-2 style).

Each shard of the `sequence` mesh axis summarises its chunks as affine maps of the state
(`longjax.ops.linear_attention.chunk_maps`) and composes them into one map for the whole
shard, `S_out = A S_in + B` (A diagonal, or a `[Dk, Dk]` matrix for the delta rules). The
shards' maps are combined across devices by
`longjax.parallel.state_passing.incoming_states` (one all-gather of the summaries, as in
Sun et al. 2025, "LASP-2"), and each shard then runs its cheap inter-chunk state pass from
its incoming state and reads its outputs: no token-level work is repeated. Document borders
that fall on shard borders are seen through the previous shard's last segment id.

`sharded_*` functions run inside `jax.shard_map`; `sequence_parallel_*` take global arrays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longjax.ops import linear_attention as la
from longjax.ops.rglru import rglru_coefficients, rglru_resets
from longjax.parallel.sequence_scan import (
    _continues_from_previous_shard,
    _run_sharded,
    sharded_linear_scan,
)
from longjax.parallel.state_passing import incoming_states

# op name -> (the op, names of its per-token array arguments, in order)
OPS = {
    "linear_attention": (la.linear_attention, ("q", "k", "v")),
    "based": (la.based, ("q", "k", "v")),
    "retention": (la.retention, ("q", "k", "v")),
    "gla": (la.gla, ("q", "k", "v", "g")),
    "delta_rule": (la.delta_rule, ("q", "k", "v", "beta")),
    "gated_delta_rule": (la.gated_delta_rule, ("q", "k", "v", "g", "beta")),
}


def _shard_resets(segment_ids, batch, length, axis_name):
    resets = la.resets_from_segments(segment_ids, batch, length)
    continues = _continues_from_previous_shard(segment_ids, axis_name)
    return resets if continues is None else resets.at[:, 0].set(continues == 0)


def sharded_recurrence(q, k, v, g, beta, segment_ids, state, chunk_size, *, axis_name):
    """The chunked recurrence of `longjax.ops.linear_attention` on this shard's tokens.

    Pass it (with `axis_name` bound) as the `impl=` of any op there, inside `shard_map`;
    `state` is the global initial state. Returns this shard's outputs and the global final
    state (the same on every shard).
    """
    B, T = q.shape[:2]
    resets = _shard_resets(segment_ids, B, T, axis_name)
    maps = la.chunk_maps(*la.to_chunks(q, k, v, g, beta, resets, chunk_size),
                         delta=beta is not None)
    _, b_local = la.chunk_states(maps.A, maps.B, jnp.zeros_like(state))
    diagonal = maps.A.ndim == 4
    if diagonal:
        a_local = jnp.prod(maps.A, axis=1)[..., None]  # [B, H, Dk, 1]
    else:  # the product of the chunks' matrices: the same pass on the identity
        eye = jnp.broadcast_to(jnp.eye(q.shape[-1]), maps.A.shape[:1] + maps.A.shape[2:])
        _, a_local = la.chunk_states(maps.A, jnp.zeros_like(maps.A), eye)
    s_in, s_final = incoming_states(a_local, b_local, axis_name=axis_name,
                                    initial_state=state, diagonal=diagonal)
    o, _ = la.finish_chunks(maps, s_in, T)
    return o, s_final


def sequence_parallel_linear(op, *arrays, mesh, axis_name="sequence", segment_ids=None,
                             initial_state=None, return_final_state=False, **op_kwargs):
    """Runs linear-attention op `op` (a name in `OPS`) on global arrays `[B, T, ...]` with T
    split over `axis_name` of `mesh`; equal to the unsharded op (`impl="xla"`).

    `arrays` are the op's per-token positional arguments (e.g. `q, k, v, g` for `"gla"`);
    `op_kwargs` its other keyword arguments (`scale`, `chunk_size`, ...).
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}; got {op!r}")
    fn, names = OPS[op]
    if len(arrays) != len(names):
        raise ValueError(f"{op} takes the per-token arrays {names}; got {len(arrays)} arrays")
    impl = functools.partial(sharded_recurrence, axis_name=axis_name)

    def run(segment_ids=None, initial_state=None, **named):
        return fn(*(named[n] for n in names), segment_ids=segment_ids,
                  initial_state=initial_state, return_final_state=return_final_state,
                  impl=impl, **op_kwargs)

    seq = dict(zip(names, arrays, strict=True), segment_ids=segment_ids)
    return _run_sharded(run, mesh, axis_name, seq, {"initial_state": initial_state},
                        return_final_state)


def sharded_rg_lru(x, r, i, a_param, *, axis_name, segment_ids=None, initial_state=None,
                   return_final_state=False, impl="auto"):
    """`longjax.ops.rglru.rg_lru` on this shard's tokens, inside `shard_map`."""
    B, T, _ = x.shape
    continues = _continues_from_previous_shard(segment_ids, axis_name)
    first_shard = jax.lax.axis_index(axis_name) == 0
    later_start = False if continues is None else continues == 0
    first_is_start = jnp.where(first_shard, initial_state is None, later_start)
    a, b = rglru_coefficients(x, r, i, a_param, rglru_resets(segment_ids, B, T, first_is_start))
    h, state = sharded_linear_scan(a, b, axis_name=axis_name, initial_state=initial_state,
                                   return_final_state=True, impl=impl)
    h = h.astype(x.dtype)
    return (h, state) if return_final_state else h


def sequence_parallel_rg_lru(x, r, i, a_param, *, mesh, axis_name="sequence",
                             segment_ids=None, initial_state=None, return_final_state=False,
                             impl="auto"):
    """`rg_lru` on global arrays `[B, T, D]` with T split over `axis_name` of `mesh`."""
    fn = functools.partial(sharded_rg_lru, axis_name=axis_name,
                           return_final_state=return_final_state, impl=impl)
    seq = {"x": x, "r": r, "i": i, "segment_ids": segment_ids}
    rep = {"a_param": a_param, "initial_state": initial_state}
    return _run_sharded(fn, mesh, axis_name, seq, rep, return_final_state)
