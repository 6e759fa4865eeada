"""Bounded caches: `num_sinks` sink tokens and a ring of the last `window` tokens.

- `"rolling"`: the same math as the full forward with that `window` and `num_sinks`
  (sliding-window attention, Beltagy et al. 2020; with sinks the Lambda mask of LM-Infinite
  without its distance limit).
- `"streaming"`: StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with
  Attention Sinks"): positions re-assigned inside the cache, the sinks sitting just before
  the window, so no query sees a relative position beyond `num_sinks + window - 1`.
- `"lm_infinite"`: LM-Infinite (Han et al. 2023): a sink seen from a query at position t
  sits at distance min(t, train_length) - s, so no distance exceeds the training length.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from longjax.nn.kv_cache.base import (
    CachePolicy,
    KeyPart,
    NewTokens,
    positive_int,
    register_policy,
)


@register_policy("rolling")
@dataclasses.dataclass(frozen=True)
class RollingCache(CachePolicy):
    """`num_sinks + window` slots whatever `max_length` is: sinks first, then a ring of the
    last `window` tokens, position p in ring slot `num_sinks + p % window`.

    Cache: `{"k", "v": [B, S + W, K, D], "segment_ids", "positions": [B, S + W] (-1 =
    empty), "end": int32}`, keys encoded at their own positions once, when written.

    Two parts: the window part (non-sink keys with `0 <= t - s < window`, the query at
    its position t; relative schemes depend on t - s alone, so this is the same as
    re-assigning positions inside the cache) and the sink part (keys `s < num_sinks`,
    `s <= t`), where the query sits at `sink_query_positions(t)`. With an empty cache
    this is the full forward under that rule.

    `cache_budget` B, when given, is `num_sinks + window`: the window is B - num_sinks
    when not given, and must be that when given."""

    window: int | None
    num_sinks: int
    cache_budget: int | None
    moves_sinks: ClassVar[bool] = False  # sink_query_positions(t) != t

    @property
    def ring(self):
        """The window W: `window`, or `cache_budget - num_sinks`."""
        if self.window is None and self.cache_budget is not None:
            return self.cache_budget - self.num_sinks
        return self.window

    def check(self, where):
        budget = self.cache_budget
        if budget is not None and self.window is not None and budget != (
                self.num_sinks + self.window):
            raise ValueError(f"{where}.cache_budget={budget!r} must be num_sinks + window = "
                             f"{self.num_sinks + self.window} for cache_mode={self.name!r} "
                             f"(or leave window unset)")
        if not positive_int(self.ring):
            raise ValueError(f"{where}.cache_mode={self.name!r} needs a positive int window "
                             f"(or cache_budget > num_sinks); got window={self.window!r}, "
                             f"cache_budget={budget!r}, num_sinks={self.num_sinks!r}")

    def sink_query_positions(self, positions):
        """Where a query at `positions` `[B, T]` sits when it reads the sinks."""
        return positions

    def init(self, batch_size, max_length, kv_shape, dtype):
        length = self.num_sinks + self.ring
        kv = jnp.zeros((batch_size, length, *kv_shape), dtype)
        return {"k": kv, "v": kv, "segment_ids": jnp.zeros((batch_size, length), jnp.int32),
                "positions": jnp.full((batch_size, length), -1, jnp.int32),
                "end": jnp.zeros((), jnp.int32)}

    def read(self, cache, new: NewTokens):
        S, W = self.num_sinks, self.ring
        if cache is None and not (S and self.moves_sinks):
            return [KeyPart(new.k, new.v, window=W, num_sinks=S)], None
        B, T = new.positions.shape
        stored = self.init(B, 0, new.k.shape[2:], new.k.dtype) if cache is None else cache
        arrays = {"k": new.k, "v": new.v, "positions": new.positions,
                  "segment_ids": new.segment_ids}
        written = _write_slots(stored, arrays, S, W)
        pos = new.positions
        if T == 1:  # the token overwrote the one W back, which is out of the window
            window = written
        else:
            window = {n: jnp.concatenate([stored[n], a.astype(stored[n].dtype)], axis=1)
                      for n, a in arrays.items()}
        kv_pos = window["positions"]
        parts = [KeyPart(window["k"], window["v"], positions=kv_pos,
                         segment_ids=jnp.where(kv_pos < S, 0, window["segment_ids"]),
                         q_slots=pos, kv_slots=kv_pos, window=W, one_block=T == 1)]
        if S:
            sink_pos = written["positions"][:, :S]
            parts.append(KeyPart(written["k"][:, :S], written["v"][:, :S], positions=sink_pos,
                                 segment_ids=written["segment_ids"][:, :S], q_slots=pos,
                                 kv_slots=sink_pos,
                                 query_positions=self.sink_query_positions(pos)))
        written["end"] = stored["end"] + T
        return parts, None if cache is None else written


@register_policy("streaming")
@dataclasses.dataclass(frozen=True)
class StreamingCache(RollingCache):
    """The rolling cache with StreamingLLM's positions: a query reads the sinks from at
    most `num_sinks + window - 1`."""

    moves_sinks: ClassVar[bool] = True

    def sink_query_positions(self, positions):
        return jnp.minimum(positions, self.num_sinks + self.ring - 1)


@register_policy("lm_infinite")
@dataclasses.dataclass(frozen=True)
class LMInfiniteCache(RollingCache):
    """The rolling cache with LM-Infinite's distance limit: a query reads the sinks from at
    most `train_length`."""

    train_length: int | None
    moves_sinks: ClassVar[bool] = True

    def check(self, where):
        super().check(where)
        if not positive_int(self.train_length):
            raise ValueError(f"{where}.train_length must be a positive int for "
                             f"cache_mode='lm_infinite'; got {self.train_length!r}")

    def sink_query_positions(self, positions):
        return jnp.minimum(positions, self.train_length)


def _write_slots(cache, new, num_sinks, window):
    """The cache arrays `k, v, positions, segment_ids` with the new tokens written in place:
    the last `min(T, window)` at ring slot `num_sinks + position % window`, those at
    positions `< num_sinks` also at sink slot `position`; padding (segment 0) is not
    written."""
    T = new["k"].shape[1]
    n = min(T, window)
    rows = jnp.arange(new["k"].shape[0])[:, None]
    real = new["segment_ids"] != 0
    pos = new["positions"]
    drop = num_sinks + window  # out of range: the write is dropped
    ring = jnp.where(real, num_sinks + pos % window, drop)[:, T - n:]
    sinks = jnp.where(real & (pos < num_sinks), pos, drop)
    out = {}
    for name, value in new.items():
        array = cache[name].at[rows, ring].set(value[:, T - n:], mode="drop")
        if num_sinks:
            array = array.at[rows, sinks].set(value, mode="drop")
        out[name] = array
    return out
