"""Quest (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference", arXiv:2406.10774): every token stays in the cache, in pages of `page_size`
tokens with their keys' elementwise minimum and maximum per KV head; each query reads
the pages whose upper bound on q . k is highest.

Per query t and query head h, page p's bound is `sum_d max(q_d * min_pd, q_d * max_pd)`
(>= q . k for every key of the page). The query reads its own page (the last, partial one,
always included as in the paper) and the `ceil(cache_budget / page_size) - 1` complete
earlier pages of highest bound. GQA: the G query heads of a KV head read one set of pages
(the memory traffic Quest bounds is per KV head), ranked by the maximum of their bounds,
so a page that one head needs (a retrieval head) is not outvoted by the others' sum.

What is bounded is what each query reads (at most `ceil(budget / page_size)` pages), not
memory: the cache keeps every token, plus the page extrema (2 / page_size of the keys).
Every query selects, in prefill too (the paper runs its prefill dense), so a chunked
prefill gives what token-by-token decoding gives, and the full forward the same rule.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from longjax.nn.kv_cache.base import positive_int, register_policy
from longjax.nn.kv_cache.stored import ReadSelection, group_queries


def update_page_extrema(kmin_BPKD, kmax_BPKD, k_BTKD, index_BT, real_BT, page_size):
    """The pages' key minima and maxima `[B, pages, K, D]` with the call's real keys added
    (key of slot s in page s // page_size)."""
    page = jnp.where(real_BT, index_BT // page_size, kmin_BPKD.shape[1])  # padding: dropped
    rows = jnp.arange(k_BTKD.shape[0])[:, None]
    k = k_BTKD.astype(kmin_BPKD.dtype)
    return (kmin_BPKD.at[rows, page].min(k, mode="drop"),
            kmax_BPKD.at[rows, page].max(k, mode="drop"))


def page_upper_bounds(q_BTHD, kmin_BPKD, kmax_BPKD):
    """`[B, T, K, pages]` fp32: per query, the maximum over the KV head's G query heads of
    `sum_d max(q_d min_d, q_d max_d)` (= the positive part of q times max plus the
    negative part times min)."""
    q = group_queries(q_BTHD, kmin_BPKD.shape[2]).astype(jnp.float32)
    bound = (jnp.einsum("btkgd,bpkd->btkgp", jnp.maximum(q, 0), kmax_BPKD.astype(jnp.float32))
             + jnp.einsum("btkgd,bpkd->btkgp", jnp.minimum(q, 0),
                          kmin_BPKD.astype(jnp.float32)))
    return bound.max(axis=3)


def select_pages(bound_BTKP, current_BT, num_pages):
    """`[B, T, K, pages]` bool: each query's current page and the `num_pages - 1` complete
    earlier pages (those before the current one) of highest bound."""
    P = bound_BTKP.shape[-1]
    page = jnp.arange(P)
    current = current_BT[:, :, None, None]
    earlier = page < current
    chosen = page == current
    n = min(num_pages - 1, P)
    if n > 0:
        _, top = jax.lax.top_k(jnp.where(earlier, bound_BTKP, -jnp.inf), n)
        chosen |= jax.nn.one_hot(top, P, dtype=bool).any(axis=-2) & earlier
    return chosen


@register_policy("quest")
@dataclasses.dataclass(frozen=True)
class QuestCache(ReadSelection):
    """Quest's page selection over a cache of every token (see the module doc).

    Options (`cache_options`): `page_size` (tokens per page, the paper's 16). State:
    `"kmin", "kmax": [B, ceil(L / page_size), K, D]` (empty pages +inf / -inf)."""

    option_defaults: ClassVar[dict] = {"page_size": 16}

    def check(self, where):
        super().check(where)
        if not positive_int(self.option("page_size")):
            raise ValueError(f"{where}.cache_options.page_size must be a positive int for "
                             f"cache_mode='quest'; got {self.option('page_size')!r}")

    def init_state(self, batch_size, length, kv_shape):
        pages = -(-length // self.option("page_size"))
        shape = (batch_size, pages, *kv_shape)
        return {"kmin": jnp.full(shape, jnp.inf, jnp.float32),
                "kmax": jnp.full(shape, -jnp.inf, jnp.float32)}

    def select(self, cache, new, index):
        page_size = self.option("page_size")
        kmin, kmax = update_page_extrema(cache["kmin"], cache["kmax"], new.k, index,
                                         new.segment_ids != 0, page_size)
        pages = select_pages(page_upper_bounds(new.q, kmin, kmax), index // page_size,
                             -(-self.cache_budget // page_size))
        L = cache["k"].shape[1]
        keep = jnp.repeat(pages, page_size, axis=-1)[..., :L]
        return {**cache, "kmin": kmin, "kmax": kmax}, keep
