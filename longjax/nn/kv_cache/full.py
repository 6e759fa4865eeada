"""The full cache: every token's keys and values, `max_length` slots."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from longjax.nn.kv_cache.base import CachePolicy, KeyPart, NewTokens, register_policy


@register_policy("full")
@dataclasses.dataclass(frozen=True)
class FullCache(CachePolicy):
    """Tokens at slots `end .. end + T - 1` of `max_length` slots; queries read every slot
    under the causal mask with `window` and `num_sinks` (the Lambda mask) by slot.

    Cache: `{"k", "v": [B, L, K, D], "segment_ids": [B, L] (0 = empty), "end": int32}`.
    Slots order the keys (the mask); the keys' positions are slot + (the row's position -
    its slot), so left padding costs no position."""

    window: int | None
    num_sinks: int

    def init(self, batch_size, max_length, kv_shape, dtype):
        kv = jnp.zeros((batch_size, max_length, *kv_shape), dtype)
        return {"k": kv, "v": kv, "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
                "end": jnp.zeros((), jnp.int32)}

    def read(self, cache, new: NewTokens):
        mask = dict(window=self.window, num_sinks=self.num_sinks)
        if cache is None:
            return [KeyPart(new.k, new.v, **mask)], None
        B, T = new.positions.shape
        L, end = cache["k"].shape[1], cache["end"]

        def write(name, value):
            return jax.lax.dynamic_update_slice_in_dim(
                cache[name], value.astype(cache[name].dtype), end, 1)

        cache = {"k": write("k", new.k), "v": write("v", new.v),
                 "segment_ids": write("segment_ids", new.segment_ids), "end": end + T}
        kv_slots = jnp.broadcast_to(jnp.arange(L), (B, L))
        part = KeyPart(cache["k"], cache["v"], positions=kv_slots + (new.positions[:, :1] - end),
                       segment_ids=cache["segment_ids"],
                       q_slots=jnp.broadcast_to(end + jnp.arange(T), (B, T)), kv_slots=kv_slots,
                       **mask)
        return [part], cache
