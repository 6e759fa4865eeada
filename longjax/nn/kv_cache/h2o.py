"""H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
Large Language Models"): keep the most recent tokens and the heavy hitters, the tokens
that have received the most attention.

Per layer and KV head, `cache_budget` N tokens: the R = floor(N * recent_ratio) most
recent, and the N - R others of highest accumulated attention (the sum of the attention
probabilities the token has received from every query since it arrived, over the G query
heads of the KV head). A call's queries read the kept tokens and the call's own (causal),
their attention is added to the scores, then each head keeps its N of highest priority:
one decode step evicts the lowest-score non-recent token (the paper's greedy eviction);
a prefill chunk scores the chunk's tokens by the chunk's causal attention and keeps the
recent and the heaviest (the paper's prefill). The scores come from the call's attention
probabilities, materialised: O(B H T (N + T)) memory per call, so long prompts go in
chunks.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from longjax.nn.kv_cache import selection
from longjax.nn.kv_cache.base import (
    CachePolicy,
    KeyPart,
    NewTokens,
    check_budget,
    register_policy,
)


@register_policy("h2o")
@dataclasses.dataclass(frozen=True)
class H2OCache(CachePolicy):
    """Cache: `selection`'s, with `"score"` `[B, N, K]` fp32, the accumulated attention.
    Option `recent_ratio` (default 0.5, the paper's half heavy, half recent)."""

    cache_budget: int | None
    cache_options: tuple
    window: int | None
    num_sinks: int
    softcap: float | None
    scale: float | None
    query_aware = True
    option_defaults = {"recent_ratio": 0.5}

    def check(self, where):
        check_budget(self, where)
        selection.check_unwindowed(self, where)
        ratio = self.option("recent_ratio")
        if not (isinstance(ratio, int | float) and not isinstance(ratio, bool)
                and 0 <= ratio <= 1):
            raise ValueError(f"{where}.cache_options.recent_ratio must be a number in "
                             f"[0, 1]; got {ratio!r}")

    @property
    def recent(self):
        """R: the most recent tokens always kept."""
        return int(self.cache_budget * self.option("recent_ratio"))

    def init(self, batch_size, max_length, kv_shape, dtype):
        return selection.init(batch_size, self.cache_budget, kv_shape, dtype,
                              {"score": jnp.float32})

    def read(self, cache, new: NewTokens):
        if cache is None:
            return [KeyPart(new.k, new.v)], None
        cands = selection.candidates(cache, new)
        part = selection.part(cands, new)
        cands["score"] = cands["score"] + selection.received_attention(
            part, new, softcap=self.softcap, scale=self.scale)
        priority = jnp.where(selection.most_recent(cands, self.recent), jnp.inf,
                             jnp.where(cands["segment_ids"] != 0, cands["score"], -jnp.inf))
        T = new.positions.shape[1]
        return [part], selection.keep(cands, priority, self.cache_budget, cache["end"] + T)
