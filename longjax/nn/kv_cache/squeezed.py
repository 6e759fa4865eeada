"""Squeezed Attention (Hooper et al. 2024, "Squeezed Attention: Accelerating Long Context
Length LLM Inference", arXiv:2411.09688): the keys of a fixed context are clustered
offline per KV head; each later query reads the keys of the clusters whose centroids it
matches best, and every token after the fixed context.

- The fixed context: each row's first `fixed_length` tokens (a cache option), or with
  `fixed_length=None` the prompt: the tokens stored before the first one-token (decode)
  call. It is clustered once, when complete, per row and KV head, by k-means on its keys
  into `num_clusters` clusters: Lloyd's algorithm in squared Euclidean distance for
  `kmeans_iterations` iterations, initialised from evenly spaced keys (key
  floor(j n / C) for centroid j of n keys), an empty cluster keeping its centroid; so it
  is deterministic.
- A query after the fixed context ranks the clusters by q . centroid (the maximum over
  the KV head's G query heads, as for Quest: a cluster one head needs is read) and reads
  the best clusters while their key count fits `cache_budget` (the first cluster that
  does not fit ends the choice), plus every token after the fixed context. Queries inside
  the fixed context read it whole (its processing is the offline prefill).

One level of centroids: the paper's hierarchical (two-level) lookup, which speeds up the
ranking, is not built, and the paper's threshold on the centroid softmax is replaced by
the fixed budget. The cache keeps every token; reads are what the budget bounds.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from longjax.nn.kv_cache.base import positive_int, register_policy
from longjax.nn.kv_cache.stored import ReadSelection, group_queries


def kmeans(k_BLKD, length_B, num_clusters, iterations):
    """`(centroids [B, K, C, D] fp32, labels [B, L, K] int32)`: per row and KV head, Lloyd's
    k-means of the keys in slots `< length_B` from the keys at slots floor(j n / C)."""
    B, L, K, D = k_BLKD.shape
    x = k_BLKD.astype(jnp.float32)
    valid = (jnp.arange(L) < length_B[:, None])[..., None, None]  # [B, L, 1, 1]
    start = (jnp.arange(num_clusters) * length_B[:, None]) // num_clusters  # [B, C]
    centroids = jnp.moveaxis(jnp.take_along_axis(x, start[:, :, None, None], axis=1), 1, 2)

    def assign(c):
        d = (jnp.sum(c * c, -1)[:, None] - 2 * jnp.einsum("blkd,bkcd->blkc", x, c))
        return jnp.argmin(d, axis=-1)  # [B, L, K]

    def step(_, c):
        member = jax.nn.one_hot(assign(c), num_clusters) * valid  # [B, L, K, C]
        total = jnp.einsum("blkc,blkd->bkcd", member, x)
        count = member.sum(axis=1)[..., None]  # [B, K, C, 1]
        return jnp.where(count > 0, total / jnp.maximum(count, 1), c)

    centroids = jax.lax.fori_loop(0, iterations, step, centroids)
    return centroids, assign(centroids).astype(jnp.int32)


def cluster_sizes(labels_BLK, length_B, num_clusters):
    """`[B, K, C]` int32: the fixed-context keys in each cluster."""
    valid = (jnp.arange(labels_BLK.shape[1]) < length_B[:, None])[..., None, None]
    return (jax.nn.one_hot(labels_BLK, num_clusters, dtype=jnp.int32) * valid).sum(axis=1)


def choose_clusters(q_BTHD, centroids_BKCD, sizes_BKC, budget):
    """`[B, T, K, C]` bool: per query and KV head, the clusters in descending order of
    max_g q_g . centroid while their cumulative size fits `budget`."""
    q = group_queries(q_BTHD, centroids_BKCD.shape[1]).astype(jnp.float32)
    score = jnp.einsum("btkgd,bkcd->btkgc", q, centroids_BKCD).max(axis=3)
    order = jnp.argsort(-score, axis=-1, stable=True)
    sizes = jnp.broadcast_to(sizes_BKC[:, None], score.shape)
    fits = jnp.cumsum(jnp.take_along_axis(sizes, order, axis=-1), axis=-1) <= budget
    return jnp.take_along_axis(fits, jnp.argsort(order, axis=-1), axis=-1)


def read_mask(chosen_BTKC, labels_BLK, fixed_B, index_BT):
    """`[B, T, K, L]` bool: a query after the fixed context (of `fixed_B` slots, 0 = not
    clustered) reads the chosen clusters' keys and the slots after the context; a query
    in it reads everything."""
    L = labels_BLK.shape[1]
    labels = jnp.broadcast_to(jnp.moveaxis(labels_BLK, 1, 2)[:, None],
                              (*chosen_BTKC.shape[:3], L))
    in_chosen = jnp.take_along_axis(chosen_BTKC, labels, axis=-1)
    fixed = fixed_B[:, None, None, None]
    after = (fixed > 0) & (index_BT[:, :, None, None] >= fixed)
    return ~after | (jnp.arange(L) >= fixed) | in_chosen


@register_policy("squeezed")
@dataclasses.dataclass(frozen=True)
class SqueezedCache(ReadSelection):
    """Squeezed Attention's clustered fixed context (see the module doc).

    Options (`cache_options`): `num_clusters`, `kmeans_iterations`, `fixed_length` (int,
    or None: the prompt). State: `"centroids": [B, K, C, D]` fp32, `"labels": [B, L, K]`,
    `"fixed": [B]` (the fixed context's length, 0 until clustered)."""

    option_defaults: ClassVar[dict] = {"num_clusters": 16, "kmeans_iterations": 10,
                                       "fixed_length": None}

    def check(self, where):
        super().check(where)
        options = f"{where}.cache_options"
        for name in ("num_clusters", "kmeans_iterations"):
            if not positive_int(self.option(name)):
                raise ValueError(f"{options}.{name} must be a positive int for "
                                 f"cache_mode='squeezed'; got {self.option(name)!r}")
        fixed = self.option("fixed_length")
        if fixed is not None and not positive_int(fixed):
            raise ValueError(f"{options}.fixed_length must be a positive int or None (the "
                             f"prompt) for cache_mode='squeezed'; got {fixed!r}")

    def init_state(self, batch_size, length, kv_shape):
        K, D = kv_shape
        C = self.option("num_clusters")
        return {"centroids": jnp.zeros((batch_size, K, C, D), jnp.float32),
                "labels": jnp.zeros((batch_size, length, K), jnp.int32),
                "fixed": jnp.zeros((batch_size,), jnp.int32)}

    def fixed_length(self, count_before, count, decoding):
        """`[B]`: the fixed context's length once it is complete in this call, else 0."""
        given = self.option("fixed_length")
        if given is None:  # the prompt: complete at the first decode call
            return count_before if decoding else jnp.zeros_like(count)
        return jnp.where(count >= given, given, 0)

    def select(self, cache, new, index):
        C = self.option("num_clusters")
        count_before = cache["count"] - (new.segment_ids != 0).sum(axis=1, dtype=jnp.int32)
        length = self.fixed_length(count_before, cache["count"],
                                   decoding=new.positions.shape[1] == 1)
        start = (cache["fixed"] == 0) & (length > 0)

        def cluster(_):
            centroids, labels = kmeans(cache["k"], length, C, self.option("kmeans_iterations"))
            row = start[:, None, None]
            return (jnp.where(row[..., None], centroids, cache["centroids"]),
                    jnp.where(row, labels, cache["labels"]))

        centroids, labels = jax.lax.cond(start.any(), cluster,
                                         lambda _: (cache["centroids"], cache["labels"]), None)
        fixed = jnp.where(start, length, cache["fixed"])
        chosen = choose_clusters(new.q, centroids, cluster_sizes(labels, fixed, C),
                                 self.cache_budget)
        keep = read_mask(chosen, labels, fixed, index)
        return {**cache, "centroids": centroids, "labels": labels, "fixed": fixed}, keep
