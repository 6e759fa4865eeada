"""The cache that keeps every token and reads a subset of it per query: the base of the
query-aware read-selection policies (Quest, InfLLM, Squeezed Attention).

A row's real tokens (segment != 0) sit at their index among the row's real tokens, their
slot: left padding takes no slot, so a padded row is laid out as the row alone, and the
methods' pages, blocks and fixed context are ranges of slots. The cache grows with the
context (`max_length` slots, as the papers keep every token: on the accelerator for Quest
and Squeezed Attention, offloaded to host memory for InfLLM); what a policy bounds is what
each query reads, `keep` `[B, T or 1, K or 1, L]`, given to the mixer as the part's
`KeyPart.keep`. The read is masked, not gathered: the attention still runs over L slots,
so this measures the methods' accuracy, not their speed.

Cache: `{"k", "v": [B, L, K, D], "positions", "segment_ids": [B, L] int32 (0 = empty),
"count": [B] int32 (the row's real tokens), "end": int32, <the policy's state>}`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from longjax.nn.kv_cache.base import CachePolicy, KeyPart, NewTokens, check_budget
from longjax.nn.kv_cache.selection import check_unwindowed


@dataclasses.dataclass(frozen=True)
class ReadSelection(CachePolicy):
    """Every token stored at its row index; each query reads the keys `select` keeps.

    Subclasses define `init_state` (their arrays beside the tokens) and `select`, and
    read the budget of keys per query and KV head as `cache_budget`. The mixer's
    `window` and `num_sinks` must be unset (the policy chooses what is read)."""

    cache_budget: int | None
    cache_options: tuple
    window: int | None
    num_sinks: int
    query_aware: ClassVar[bool] = True

    def check(self, where):
        check_budget(self, where)
        check_unwindowed(self, where)

    def init_state(self, batch_size: int, length: int, kv_shape: tuple[int, int]) -> dict:
        """The policy's arrays beside the tokens, for `length` slots; `kv_shape` = (K, D)."""
        return {}

    def select(self, cache: dict, new: NewTokens, index: jax.Array) -> tuple[dict, jax.Array]:
        """`(cache, keep)` after the call's tokens are stored: the policy's state updated
        and `keep` `[B, T or 1, K or 1, L]` bool, the slots each query reads per KV head
        (the causal and segment masks apply on top). `index` `[B, T]`: each query's slot
        (its index among the row's real tokens)."""
        raise NotImplementedError

    def init(self, batch_size, max_length, kv_shape, dtype):
        kv = jnp.zeros((batch_size, max_length, *kv_shape), dtype)
        per_slot = jnp.zeros((batch_size, max_length), jnp.int32)
        return {"k": kv, "v": kv, "positions": per_slot, "segment_ids": per_slot,
                "count": jnp.zeros((batch_size,), jnp.int32), "end": jnp.zeros((), jnp.int32),
                **self.init_state(batch_size, max_length, kv_shape)}

    def read(self, cache, new: NewTokens):
        B, T = new.positions.shape
        stored = cache if cache is not None else self.init(B, T, new.k.shape[2:], new.k.dtype)
        stored, index = store(stored, new)
        stored, keep = self.select(stored, new, index)
        L = stored["k"].shape[1]
        part = KeyPart(stored["k"], stored["v"], positions=stored["positions"],
                       segment_ids=stored["segment_ids"], q_slots=index,
                       kv_slots=jnp.broadcast_to(jnp.arange(L), (B, L)), keep=keep)
        return [part], None if cache is None else stored


def store(cache, new: NewTokens):
    """`(cache, index)`: the call's real tokens written at their row index `index` `[B, T]`
    (a padding token gets the index of the real token before it, and is not written)."""
    real = new.segment_ids != 0
    index = cache["count"][:, None] + jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1
    slot = jnp.where(real, index, cache["k"].shape[1])  # out of range: dropped
    rows = jnp.arange(real.shape[0])[:, None]
    out = dict(cache)
    for name, value in (("k", new.k), ("v", new.v), ("positions", new.positions),
                        ("segment_ids", new.segment_ids)):
        out[name] = cache[name].at[rows, slot].set(value.astype(cache[name].dtype), mode="drop")
    out["count"] = cache["count"] + real.sum(axis=1, dtype=jnp.int32)
    out["end"] = cache["end"] + real.shape[1]
    return out, index


def group_queries(q_BTHD, num_kv_heads):
    """`[B, T, K, G, D]`: the query heads grouped by the KV head they share (GQA)."""
    B, T, H, D = q_BTHD.shape
    return q_BTHD.reshape(B, T, num_kv_heads, H // num_kv_heads, D)
