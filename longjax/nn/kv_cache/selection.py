"""The per-head budgeted cache shared by the selection / eviction policies (H2O, SnapKV).

Each KV head keeps its own `cache_budget` N tokens in the same slots:
`{"k", "v": [B, N, K, D], "positions": [B, N, K] int32 (-1 = empty), "segment_ids":
[B, N, K] (0 = empty), <the policy's per-slot state>: [B, N, K], "end": int32}`, a head's
kept tokens in ascending position order after its empty slots. A call reads the
candidates (kept tokens, then the call's T tokens, one `KeyPart` with per-head masks,
causal by position) and keeps the N of highest priority, so the budget holds during a
chunked prefill and every decode step. Positions order the tokens: one document per row
(segment ids mark padding, which is never kept).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longjax.nn.kv_cache.base import KeyPart, NewTokens
from longjax.ops.attention import attention_weights


def check_unwindowed(policy, where):
    """Raises ValueError naming `where.window` / `num_sinks` when set: the selection
    policies choose their own keys."""
    if policy.window is not None or policy.num_sinks:
        raise ValueError(f"{where}.window and num_sinks must be unset for "
                         f"cache_mode={policy.name!r} (it selects its own keys); got "
                         f"window={policy.window!r}, num_sinks={policy.num_sinks!r}")


def init(batch_size, budget, kv_shape, dtype, state):
    """The empty cache of `budget` slots per KV head; `state`: name -> dtype of the
    policy's per-slot arrays (zeros)."""
    K, D = kv_shape
    per_slot = (batch_size, budget, K)
    kv = jnp.zeros((*per_slot, D), dtype)
    return {"k": kv, "v": kv, "positions": jnp.full(per_slot, -1, jnp.int32),
            "segment_ids": jnp.zeros(per_slot, jnp.int32),
            **{name: jnp.zeros(per_slot, dt) for name, dt in state.items()},
            "end": jnp.zeros((), jnp.int32)}


def candidates(cache, new: NewTokens):
    """The kept tokens then the call's: `[B, N + T, K(, D)]` arrays (the call's per-token
    arrays shared by the heads; the policy's state zero for them)."""
    B, T, K, _ = new.k.shape
    fresh = {"k": new.k, "v": new.v,
             "positions": jnp.broadcast_to(new.positions[:, :, None], (B, T, K)),
             "segment_ids": jnp.broadcast_to(new.segment_ids[:, :, None], (B, T, K))}
    return {name: jnp.concatenate(
        [stored, fresh[name].astype(stored.dtype) if name in fresh
         else jnp.zeros((B, T, K), stored.dtype)], axis=1)
        for name, stored in cache.items() if name != "end"}


def part(cands, new: NewTokens) -> KeyPart:
    """The candidates as one key part, causal by position, per-head masks."""
    return KeyPart(cands["k"], cands["v"], positions=cands["positions"],
                   segment_ids=cands["segment_ids"], q_slots=new.positions,
                   kv_slots=cands["positions"], one_block=new.positions.shape[1] == 1)


def received_attention(part: KeyPart, new: NewTokens, *, softcap, scale, last=None):
    """`[B, N + T, K]` fp32: the attention probability each candidate receives, summed
    over the call's queries (its `last` ones when given) and the G query heads of its KV
    head; padding queries give none."""
    q, q_pos, q_seg = new.q, new.positions, new.segment_ids
    if last is not None:
        q, q_pos, q_seg = q[:, -last:], q_pos[:, -last:], q_seg[:, -last:]
    p = attention_weights(q, part.k, causal=True, segment_ids=q_seg,
                          kv_segment_ids=part.segment_ids, q_positions=q_pos,
                          kv_positions=part.kv_slots, softcap=softcap, scale=scale)
    B, H, T, S = p.shape
    K = part.k.shape[2]
    return p.reshape(B, K, H // K, T, S).sum(axis=(2, 3)).transpose(0, 2, 1)


def most_recent(cands, count):
    """`[B, N + T, K]` bool: each head's `count` valid candidates of highest position."""
    valid = cands["segment_ids"] != 0
    newest = jnp.max(jnp.where(valid, cands["positions"], -1), axis=1, keepdims=True)
    return valid & (cands["positions"] > newest - count)


def keep(cands, priority, budget, end):
    """The cache of each head's `budget` candidates of highest `priority` `[B, N + T, K]`
    (-inf: never kept, the slot is emptied, its state zero), in ascending position order
    after the empty slots; `end` the tokens seen."""
    order = jax.lax.top_k(jnp.moveaxis(priority, 1, 2), budget)[1]  # [B, K, N]
    kept = jnp.moveaxis(jnp.take_along_axis(jnp.moveaxis(priority, 1, 2), order, 2), 2, 1)
    order = jnp.moveaxis(order, 2, 1)  # [B, N, K]
    real = kept > -jnp.inf
    pos = jnp.take_along_axis(cands["positions"], order, 1)
    by_position = jnp.argsort(jnp.where(real, pos, -1), axis=1, stable=True)
    order = jnp.take_along_axis(order, by_position, 1)
    real = jnp.take_along_axis(real, by_position, 1)
    out = {}
    for name, value in cands.items():
        idx = order if value.ndim == 3 else order[..., None]
        out[name] = jnp.take_along_axis(value, idx, 1)
        if name not in ("k", "v"):
            empty = jnp.asarray(-1 if name == "positions" else 0, value.dtype)
            out[name] = jnp.where(real, out[name], empty)
    out["end"] = end
    return out
