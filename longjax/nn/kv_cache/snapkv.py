"""SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You Are Looking for Before Generation"):
at prefill, keep per head the prompt keys that an observation window of the last queries
attends to most, pooled so that a kept key brings its neighbours, plus the window.

Per layer and KV head, `cache_budget` N tokens. A prefill call (T > 1 tokens) scores each
candidate outside the observation window (the last `window` tokens) by the attention the
call's last min(window, T) queries give it, summed over those queries and the G query
heads of its KV head, then pooled along the head's candidates in position order by a 1-D
pool of `kernel_size` (stride 1, zero-padded, as `torch.nn.functional.max_pool1d` /
`avg_pool1d` with padding `kernel_size // 2`); the head keeps the window and its N -
window top-pooled candidates (the "selected" ones). A decode step (T = 1) selects
nothing: the selected tokens stay, and the other N - |selected| slots hold the most
recent tokens (a rolling tail of at least `window`), so memory stays bounded where the
paper lets decoded tokens accumulate. A chunked prefill re-selects at every chunk, each
with its own observation window; one prefill call is the paper's compression.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from longjax.nn.kv_cache import selection
from longjax.nn.kv_cache.base import (
    CachePolicy,
    KeyPart,
    NewTokens,
    check_budget,
    positive_int,
    register_policy,
)

POOLINGS = ("max", "avg")


@register_policy("snapkv")
@dataclasses.dataclass(frozen=True)
class SnapKVCache(CachePolicy):
    """Cache: `selection`'s, with `"selected"` `[B, N, K]` bool. Options: `window` (the
    observation window and the kept tail, default 32 as in the released code),
    `kernel_size` (default 7, odd), `pooling` ("max", the default: a needle's neighbours
    share its peak and padding zeros do not dilute it; or "avg", the released default)."""

    cache_budget: int | None
    cache_options: tuple
    window: int | None
    num_sinks: int
    softcap: float | None
    scale: float | None
    query_aware = True
    option_defaults = {"window": 32, "kernel_size": 7, "pooling": "max"}

    def check(self, where):
        selection.check_unwindowed(self, where)
        opts = f"{where}.cache_options"
        observe, kernel = self.option("window"), self.option("kernel_size")
        if not positive_int(observe):
            raise ValueError(f"{opts}.window must be a positive int; got {observe!r}")
        check_budget(self, where, at_least=observe)
        if not (positive_int(kernel) and kernel % 2):
            raise ValueError(f"{opts}.kernel_size must be a positive odd int; got {kernel!r}")
        if self.option("pooling") not in POOLINGS:
            raise ValueError(f"{opts}.pooling must be one of {POOLINGS}; got "
                             f"{self.option('pooling')!r}")

    def init(self, batch_size, max_length, kv_shape, dtype):
        return selection.init(batch_size, self.cache_budget, kv_shape, dtype,
                              {"selected": jnp.bool_})

    def read(self, cache, new: NewTokens):
        if cache is None:
            return [KeyPart(new.k, new.v)], None
        cands = selection.candidates(cache, new)
        part = selection.part(cands, new)
        valid = cands["segment_ids"] != 0
        B, T = new.positions.shape
        if T == 1:  # decode: the selected tokens, then the most recent
            recency = cands["positions"].astype(jnp.float32)
            priority = jnp.where(valid, jnp.where(cands["selected"], jnp.inf, recency),
                                 -jnp.inf)
        else:
            observe = self.option("window")
            tail = selection.most_recent(cands, observe)
            score = selection.received_attention(part, new, softcap=self.softcap,
                                                 scale=self.scale, last=min(observe, T))
            pooled = self._pool(jnp.where(tail, 0.0, score))
            priority = jnp.where(tail, jnp.inf, jnp.where(valid, pooled, -jnp.inf))
            cands["selected"] = valid & ~tail
        return [part], selection.keep(cands, priority, self.cache_budget, cache["end"] + T)

    def _pool(self, score):
        """The 1-D pool of `kernel_size` along the candidates `[B, S, K]` (stride 1, zero
        padding; avg divides by the kernel size)."""
        size = self.option("kernel_size")
        pad = ((0, 0), (size // 2, size // 2), (0, 0))
        if self.option("pooling") == "max":
            return jax.lax.reduce_window(score, -jnp.inf, jax.lax.max, (1, size, 1),
                                         (1, 1, 1), pad)
        return jax.lax.reduce_window(score, 0.0, jax.lax.add, (1, size, 1), (1, 1, 1),
                                     pad) / size
