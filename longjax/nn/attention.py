"""Softmax-attention mixer: grouped-query attention with RoPE and a KV cache.

Three decode caches, chosen by `cache_mode` (`config.model.mixer_options.attention`):

- `"full"`: every token's keys and values (`max_length` slots).
- `"rolling"`: the `num_sinks` first tokens and the last `window` tokens, a constant
  `num_sinks + window` slots; the same math as the full cache with that `window` and
  `num_sinks` (sliding-window attention, Beltagy et al. 2020; with sinks the Lambda mask
  of LM-Infinite, Han et al. 2023, without its distance limit).
- `"streaming"`: the same slots, with positions re-assigned inside the cache as in
  StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
  Sinks"): the sinks sit just before the window, so no query ever sees a relative
  position beyond `num_sinks + window - 1` and a stream of any length keeps a constant
  cache and in-range positions. Until the cache first fills it equals the full cache.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from longjax.nn.layers import dense
from longjax.nn.registry import register_mixer
from longjax.ops import positions as positions_lib
from longjax.ops.attention import dot_product_attention, merge_attention
from longjax.parallel.sequence_parallel import sequence_parallel_attention

CACHE_MODES = ("full", "rolling", "streaming")


class AttentionMixer(nn.Module):
    """Causal multi-head attention with `num_kv_heads` shared K/V heads (GQA, Ainslie 2023).

    Cache: `{"k", "v": [B, L, K, D], "segment_ids": [B, L] (0 = empty), "end": int32}`;
    tokens are written at slots `end .. end + T - 1` and attend causally by slot.

    Without a cache, when the current mesh (`jax.set_mesh`) has a `sequence` axis of size
    > 1, attention runs sequence-parallel with strategy `sequence_parallel` ("ring",
    "all_gather", "ulysses") and token `layout` ("zigzag", "contiguous", "striped").
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"
    window: int | None = None
    num_sinks: int = 0
    softcap: float | None = None
    rope_base: float = 10000.0
    rope_fraction: float = 1.0
    sequence_parallel: str = "ring"
    layout: str = "zigzag"
    cache_mode: str = "full"

    def _bounded_cache(self):
        """True for the `"rolling"` and `"streaming"` caches (checked)."""
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"config.model.mixer_options.attention.cache_mode must be one of "
                             f"{CACHE_MODES}; got {self.cache_mode!r}")
        if self.cache_mode != "full" and not (isinstance(self.window, int) and self.window > 0):
            raise ValueError(f"config.model.mixer_options.attention.cache_mode="
                             f"{self.cache_mode!r} needs a positive int window; "
                             f"got window={self.window!r}")
        return self.cache_mode != "full"

    def init_cache(self, batch_size, max_length, dtype=None):
        """Full cache: `max_length` slots. Rolling / streaming: `num_sinks + window` slots
        whatever `max_length` is (sinks first, then a ring of the last `window` tokens,
        position p in ring slot `p % window`), with `"positions": [B, S]` (-1 = empty)."""
        dtype = dtype or self.dtype
        bounded = self._bounded_cache()
        length = self.num_sinks + self.window if bounded else max_length
        kv = jnp.zeros((batch_size, length, self.num_kv_heads, self.head_dim), dtype)
        cache = {
            "k": kv, "v": kv,
            "segment_ids": jnp.zeros((batch_size, length), jnp.int32),
            "end": jnp.zeros((), jnp.int32),
        }
        if bounded:
            cache["positions"] = jnp.full((batch_size, length), -1, jnp.int32)
        return cache

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        B, T, _ = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = dense((H, D), axes=("embed", "heads", "kv"), dtype=self.dtype, name="query")(x)
        k = dense((K, D), axes=("embed", "kv_heads", "kv"), dtype=self.dtype, name="key")(x)
        v = dense((K, D), axes=("embed", "kv_heads", "kv"), dtype=self.dtype, name="value")(x)
        if positions is None:
            start = 0 if cache is None else cache["end"]
            positions = jnp.broadcast_to(start + jnp.arange(T), (B, T))
        options = dict(softcap=self.softcap, impl=self.impl)
        if cache is not None and self._bounded_cache():
            out, cache = self._attend_bounded(q, k, v, segment_ids, positions, cache, options)
            return self._out(x, out), cache
        q, k = self._rope(q, positions), self._rope(k, positions)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        options.update(window=self.window, num_sinks=self.num_sinks)
        mesh = jax.sharding.get_abstract_mesh()
        if cache is None and mesh.shape.get("sequence", 1) > 1:
            out = sequence_parallel_attention(
                q, k, v, mesh=mesh, strategy=self.sequence_parallel, layout=self.layout,
                causal=True, segment_ids=segment_ids, **options)
        elif cache is None:
            out = dot_product_attention(q, k, v, causal=True, segment_ids=segment_ids, **options)
        else:
            out, cache = self._attend_cached(q, k, v, segment_ids, cache, options)
        return self._out(x, out), cache

    def _out(self, x, out):
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        return dense(x.shape[-1], axes=("heads", "kv", "embed"), dtype=self.dtype, name="out",
                     num_input_dims=2)(out)

    def _blockwise(self):
        """True when attention runs the blockwise "xla" impl (its block size is ours)."""
        return self.impl == "xla" or (self.impl == "auto" and jax.default_backend() == "cpu")

    def _rope(self, x, positions):
        if self.rope_fraction <= 0:
            return x
        return positions_lib.rope(x, positions, base=self.rope_base, fraction=self.rope_fraction)

    def _attend_bounded(self, q, k, v, segment_ids, positions, cache, options):
        """Attention through the rolling / streaming cache; q, k `[B, T, *, D]` before RoPE.

        The cache holds `num_sinks` sink slots (the tokens at positions `< num_sinks`) and
        a ring of the last `window` tokens (written in place), keys rotated at their own
        positions once, when written. Attention is computed in two parts merged by their
        logsumexp: the window part (non-sink keys with `0 <= t - s < window`, the query
        at its position `t`; RoPE depends on `t - s` alone, so this is the same as
        re-assigning positions inside the cache) and the sink part (keys `s < num_sinks`,
        `s <= t`), where the query is rotated at `t` ("rolling") or at
        `min(t, num_sinks + window - 1)` ("streaming": the sinks sit just before the
        window, so no query-key distance exceeds the cache length, as in StreamingLLM).
        """
        B, T = q.shape[:2]
        S, W = self.num_sinks, self.window
        seg = (jnp.ones((B, T), jnp.int32) if segment_ids is None
               else segment_ids.astype(jnp.int32))
        pos = positions.astype(jnp.int32)
        dtype = cache["k"].dtype
        k = self._rope(k, pos)
        new = _write_slots(cache, {"k": k.astype(dtype), "v": v.astype(dtype),
                                   "positions": pos, "segment_ids": seg}, S, W)
        # Window part: the ring of the last W tokens (sink slots are masked out: s < S).
        if T == 1:  # the token overwrote the one W back, which is out of the window
            keys, values, kv_pos, kv_seg = (new[n] for n in ("k", "v", "positions",
                                                             "segment_ids"))
        else:
            keys = jnp.concatenate([cache["k"], k.astype(dtype)], axis=1)
            values = jnp.concatenate([cache["v"], v.astype(dtype)], axis=1)
            kv_pos = jnp.concatenate([cache["positions"], pos], axis=1)
            kv_seg = jnp.concatenate([cache["segment_ids"], seg], axis=1)
        out, lse = dot_product_attention(
            self._rope(q, pos), keys.astype(q.dtype), values.astype(q.dtype), causal=True,
            window=W, segment_ids=seg, kv_segment_ids=jnp.where(kv_pos < S, 0, kv_seg),
            q_positions=pos, kv_positions=kv_pos, return_lse=True,
            block_k=keys.shape[1] if T == 1 and self._blockwise() else None,  # no padding
            **options)
        if S:  # sink part
            q_sink_pos = jnp.minimum(pos, S + W - 1) if self.cache_mode == "streaming" else pos
            out_s, lse_s = dot_product_attention(
                self._rope(q, q_sink_pos), new["k"][:, :S].astype(q.dtype),
                new["v"][:, :S].astype(q.dtype), causal=True, segment_ids=seg,
                kv_segment_ids=new["segment_ids"][:, :S], q_positions=pos,
                kv_positions=new["positions"][:, :S], return_lse=True, **options)
            out = merge_attention(out, lse, out_s, lse_s)[0].astype(out.dtype)
        new["end"] = cache["end"] + T
        return out, new

    def _attend_cached(self, q, k, v, segment_ids, cache, options):
        B, T = q.shape[:2]
        L, end = cache["k"].shape[1], cache["end"]
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        cache = {
            "k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                                     end, 1),
            "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                                     end, 1),
            "segment_ids": jax.lax.dynamic_update_slice_in_dim(
                cache["segment_ids"], segment_ids.astype(jnp.int32), end, 1),
            "end": end + T,
        }
        q_slots = jnp.broadcast_to(end + jnp.arange(T), (B, T))
        kv_slots = jnp.broadcast_to(jnp.arange(L), (B, L))
        out = dot_product_attention(
            q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), causal=True,
            segment_ids=segment_ids, kv_segment_ids=cache["segment_ids"],
            q_positions=q_slots, kv_positions=kv_slots, **options,
        )
        return out, cache


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


@register_mixer(
    "attention",
    defaults={"impl": "auto", "window": None, "num_sinks": 0, "softcap": None,
              "rope_base": 10000.0, "rope_fraction": 1.0, "sequence_parallel": "ring",
              "layout": "zigzag", "cache_mode": "full"},
)
def build_attention(model, options, **module_kwargs):
    return AttentionMixer(
        num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim or model.d_model // model.num_heads,
        dtype=jnp.dtype(model.dtype), **options, **module_kwargs,
    )
