"""Softmax-attention mixer: grouped-query attention with RoPE and a KV cache."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from longjax.nn.layers import dense
from longjax.nn.registry import register_mixer
from longjax.ops import positions as positions_lib
from longjax.ops.attention import dot_product_attention
from longjax.parallel.sequence_parallel import sequence_parallel_attention


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

    def init_cache(self, batch_size, max_length, dtype=None):
        dtype = dtype or self.dtype
        kv = jnp.zeros((batch_size, max_length, self.num_kv_heads, self.head_dim), dtype)
        return {
            "k": kv, "v": kv,
            "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
            "end": jnp.zeros((), jnp.int32),
        }

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
        if self.rope_fraction > 0:
            q = positions_lib.rope(q, positions, base=self.rope_base, fraction=self.rope_fraction)
            k = positions_lib.rope(k, positions, base=self.rope_base, fraction=self.rope_fraction)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        options = dict(window=self.window, num_sinks=self.num_sinks, softcap=self.softcap,
                       impl=self.impl)
        mesh = jax.sharding.get_abstract_mesh()
        if cache is None and mesh.shape.get("sequence", 1) > 1:
            out = sequence_parallel_attention(
                q, k, v, mesh=mesh, strategy=self.sequence_parallel, layout=self.layout,
                causal=True, segment_ids=segment_ids, **options)
        elif cache is None:
            out = dot_product_attention(q, k, v, causal=True, segment_ids=segment_ids, **options)
        else:
            out, cache = self._attend_cached(q, k, v, segment_ids, cache, options)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        y = dense(x.shape[-1], axes=("heads", "kv", "embed"), dtype=self.dtype, name="out",
                  num_input_dims=2)(out)
        return y, cache

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


@register_mixer(
    "attention",
    defaults={"impl": "auto", "window": None, "num_sinks": 0, "softcap": None,
              "rope_base": 10000.0, "rope_fraction": 1.0, "sequence_parallel": "ring",
              "layout": "zigzag"},
)
def build_attention(model, options, **module_kwargs):
    return AttentionMixer(
        num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim or model.d_model // model.num_heads,
        dtype=jnp.dtype(model.dtype), **options, **module_kwargs,
    )
