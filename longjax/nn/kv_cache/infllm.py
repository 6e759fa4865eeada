"""InfLLM (Xiao et al. 2024, "InfLLM: Training-Free Long-Context Extrapolation for LLMs
with an Efficient Context Memory", arXiv:2402.04617): each query reads the initial tokens
(sinks), a local window and the blocks of a context memory most relevant to its chunk.

With S initial tokens, local window W and blocks of `block_size` tokens (block j holds the tokens
of row index S + j * block_size .. S + (j + 1) * block_size - 1):

- a token's representative score (the paper's r_m, Sec. 3.2) is the sum of q . k_m over
  the queries that read it through the local window (0 <= t - m < W; the queries of the
  KV head's G query heads summed), accumulated while it is in the window;
- a block enters the memory once its last token has left every later query's window
  (query t's memory: the blocks ending at or before t - W); its representative is the sum
  of its `num_representatives` keys of highest score (the paper's sum over representative
  keys; InfLLM's code averages them, the same ranking);
- each call (a prefill chunk or one decode token) ranks the memory blocks of its last
  query by the relevance sum_t sum_h q_t^h . rep^h (the call's queries, every query head;
  one selection per row, shared by the KV heads, as InfLLM's code does) and retrieves the
  `top_k_blocks` best;
- query t reads the sinks, every token not yet in its memory (the window and the block
  the window is leaving, InfLLM's "remainder") and the retrieved blocks.

Budget: `cache_budget` = S + W + top_k_blocks * block_size: S and `top_k_blocks` are
cache options (`initial_tokens`, default 4; `top_k_blocks`, default half the budget left
after the initial tokens, in blocks), the window what remains. A query reads at most the
budget plus the block_size - 1 tokens of the block leaving its window.

Positions: every key keeps the position it was stored at (keys are stored encoded), for
retrieval and attention. The paper gives all memory tokens one position just before the
local window (its code: the query at W, the memory keys raw), which needs the raw keys at
read; here a retrieved token is seen at its true distance, which the model knows within
its trained length, not beyond it. The cache keeps every token (InfLLM
offloads the memory blocks to host memory); reads are what the budget bounds.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from longjax.nn.kv_cache.base import positive_int, register_policy
from longjax.nn.kv_cache.stored import ReadSelection, group_queries


def accumulate_scores(score_BLK, q_BTHD, k_BLKD, index_BT, segment_ids_BT, kv_segment_ids_BL,
                      window):
    """The representative scores `[B, L, K]` fp32 plus, for each stored key m, the sum of
    q_t . k_m over the call's queries t of its segment with 0 <= t - m < window (t, m:
    row indices = slots) and the KV head's G query heads."""
    L = k_BLKD.shape[1]
    q = group_queries(q_BTHD, k_BLKD.shape[2]).sum(axis=3).astype(jnp.float32)  # [B,T,K,D]
    s = jnp.einsum("btkd,blkd->btlk", q, k_BLKD.astype(jnp.float32))
    d = index_BT[:, :, None] - jnp.arange(L)
    local = ((d >= 0) & (d < window) & (segment_ids_BT[:, :, None] != 0)
             & (segment_ids_BT[:, :, None] == kv_segment_ids_BL[:, None, :]))
    return score_BLK + jnp.where(local[..., None], s, 0.0).sum(axis=1)


def block_representatives(score_BLK, k_BLKD, num_sinks, block_size, num_representatives):
    """`[B, blocks, K, D]` fp32: per block and KV head, the sum of the block's
    `num_representatives` keys of highest representative score."""
    B, L, K, D = k_BLKD.shape
    n = (L - num_sinks) // block_size if L > num_sinks else 0
    end = num_sinks + n * block_size
    score = score_BLK[:, num_sinks:end].reshape(B, n, block_size, K)
    keys = k_BLKD[:, num_sinks:end].reshape(B, n, block_size, K, D).astype(jnp.float32)
    _, top = jax.lax.top_k(jnp.moveaxis(score, 2, 3), num_representatives)  # [B,n,K,r]
    chosen = jnp.take_along_axis(jnp.moveaxis(keys, 2, 3), top[..., None], axis=3)
    return chosen.sum(axis=3)


def memory_blocks(index_BT, num_sinks, block_size, window):
    """`[B, T]`: the number of blocks in query t's memory (blocks whose last token,
    S + (j + 1) block_size - 1, is at or before t - window)."""
    return jnp.maximum((index_BT - window - num_sinks + 1) // block_size, 0)


def retrieve_blocks(q_BTHD, rep_BNKD, index_BT, real_BT, num_sinks, block_size, window,
                    top_k):
    """`[B, blocks]` bool: the `top_k` blocks of the call's last query's memory of highest
    relevance sum over the call's real queries and query heads of q . rep."""
    q = group_queries(q_BTHD, rep_BNKD.shape[2]).sum(axis=3).astype(jnp.float32)
    q = jnp.where(real_BT[..., None, None], q, 0.0).sum(axis=1)  # [B, K, D]
    relevance = jnp.einsum("bkd,bnkd->bn", q, rep_BNKD)
    last = jnp.max(jnp.where(real_BT, index_BT, -1), axis=1, keepdims=True)
    n = rep_BNKD.shape[1]
    in_memory = jnp.arange(n) < memory_blocks(last, num_sinks, block_size, window)
    k = min(top_k, n)
    if k == 0:
        return jnp.zeros_like(in_memory)
    _, top = jax.lax.top_k(jnp.where(in_memory, relevance, -jnp.inf), k)
    return jax.nn.one_hot(top, n, dtype=bool).any(axis=1) & in_memory


def read_mask(retrieved_BN, index_BT, length, num_sinks, block_size, window):
    """`[B, T, L]` bool: query t reads the sinks, the slots after its memory and the
    retrieved blocks."""
    slot = jnp.arange(length)
    block = (slot - num_sinks) // block_size  # negative for the sinks
    n = retrieved_BN.shape[1]
    retrieved = jnp.take_along_axis(retrieved_BN, jnp.clip(block, 0, max(n - 1, 0))[None],
                                    axis=1) if n else jnp.zeros((1, length), bool)
    retrieved &= (block >= 0) & (block < n)
    memory = memory_blocks(index_BT, num_sinks, block_size, window)[..., None]
    return (slot < num_sinks) | (block >= memory) | retrieved[:, None, :]


@register_policy("infllm")
@dataclasses.dataclass(frozen=True)
class InfLLMCache(ReadSelection):
    """InfLLM's sinks + local window + retrieved memory blocks (see the module doc).

    Options (`cache_options`): `initial_tokens` (sinks; the paper's 128 at 4k windows),
    `block_size` (tokens per memory block; the paper's 128), `num_representatives`
    (representative keys per block; the paper's 4), `top_k_blocks` (blocks retrieved per
    chunk; None: half the budget after the initial tokens). State: `"score": [B, L, K]`
    fp32, the representative scores."""

    option_defaults: ClassVar[dict] = {"initial_tokens": 4, "block_size": 16,
                                       "num_representatives": 4, "top_k_blocks": None}

    @property
    def top_k(self):
        given = self.option("top_k_blocks")
        if given is not None:
            return given
        initial = self.option("initial_tokens")
        return (self.cache_budget - initial) // (2 * self.option("block_size"))

    @property
    def local_window(self):
        """The local window: the budget left after the initial tokens and the blocks."""
        return (self.cache_budget - self.option("initial_tokens")
                - self.top_k * self.option("block_size"))

    def check(self, where):
        super().check(where)
        options = f"{where}.cache_options"
        block_size, reps = self.option("block_size"), self.option("num_representatives")
        if not positive_int(block_size):
            raise ValueError(f"{options}.block_size must be a positive int for "
                             f"cache_mode='infllm'; got {block_size!r}")
        if not (positive_int(reps) and reps <= block_size):
            raise ValueError(f"{options}.num_representatives must be an int in [1, "
                             f"block_size={block_size}] for cache_mode='infllm'; got {reps!r}")
        for name, or_none in (("initial_tokens", False), ("top_k_blocks", True)):
            value = self.option(name)
            if value is None and or_none:
                continue
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"{options}.{name} must be an int >= 0"
                                 f"{' or None' if or_none else ''} for cache_mode='infllm'; "
                                 f"got {value!r}")
        if self.local_window < 1:
            raise ValueError(
                f"{where}.cache_budget={self.cache_budget} leaves no local window for "
                f"cache_mode='infllm': it must exceed initial_tokens + top_k_blocks * "
                f"block_size = {self.option('initial_tokens')} + {self.top_k} * {block_size}")

    def init_state(self, batch_size, length, kv_shape):
        return {"score": jnp.zeros((batch_size, length, kv_shape[0]), jnp.float32)}

    def select(self, cache, new, index):
        S, size, W = self.option("initial_tokens"), self.option("block_size"), self.local_window
        score = accumulate_scores(cache["score"], new.q, cache["k"], index, new.segment_ids,
                                  cache["segment_ids"], W)
        reps = block_representatives(score, cache["k"], S, size,
                                     self.option("num_representatives"))
        retrieved = retrieve_blocks(new.q, reps, index, new.segment_ids != 0, S, size, W,
                                    self.top_k)
        keep = read_mask(retrieved, index, cache["k"].shape[1], S, size, W)
        return {**cache, "score": score}, keep[:, :, None, :]
