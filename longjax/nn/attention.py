"""Softmax-attention mixer: grouped-query attention, position schemes, KV caches, and the
training-free context-extension methods.

Positions (`position`): RoPE (`rope`, with `rope_scaling` linear / ntk / dynamic_ntk /
yarn / llama3 / longrope and their `rope_scaling_params`, see `longjax.ops.positions`;
dynamic_ntk and longrope take the current length, the largest position of the call + 1,
in the full forward, chunked prefill and decode alike), `xpos`, `alibi`, `t5` buckets, `kerple`
(log), `fire`, or `none` (NoPE; pair it with the LM's absolute embeddings for sinusoidal
or learned positions). `logn_scaling` scales queries past `train_length` by
log(p + 1) / log(train_length).

Beyond the window, the cache policy (`cache_mode`, `config.model.mixer_options.attention`;
`longjax.nn.kv_cache`: `"full"`, `"rolling"`, `"streaming"`, `"lm_infinite"`, and the
budgeted selection / eviction methods with `cache_budget` and `cache_options`) decides
what a layer keeps and which keys a query reads, by the same rule in the full forward and
in decoding; the position policy (`longjax.nn.position_policies`: plain, or Self-Extend
with `self_extend_group` > 0) where queries and keys are encoded. Every call runs one path:
the policy's key parts, split by the position policy, attended and merged by logsumexp.

Projections: `qkv_bias` / `out_bias` add biases to the q, k, v / output projections
(Qwen2; Llama's `attention_bias` sets both); `scale` replaces the score scale
`head_dim ** -0.5` (Gemma 2's `query_pre_attn_scalar ** -0.5`).

The mixer is registered twice, as `"attention"` and `"local_attention"`, the same module
with two sets of options, so a layer pattern can mix global and windowed layers
(`"(local_attention,attention)*13"` with `mixer_options.local_attention.window`, Gemma 2).
The training-free methods of `longjax.eval.methods` change `"attention"` layers.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from longjax.nn import kv_cache
from longjax.nn.kv_cache.base import positive_int
from longjax.nn.layers import dense
from longjax.nn.position_bias import FireBias, KerpleLogBias, T5Bias
from longjax.nn.position_policies import position_policy
from longjax.nn.registry import register_mixer
from longjax.ops import positions as positions_lib
from longjax.ops.attention import alibi_bias, dot_product_attention, merge_attention
from longjax.parallel.mesh import sequence_mesh
from longjax.parallel.sequence_parallel import sequence_parallel_attention

POSITIONS = ("rope", "xpos", "alibi", "t5", "kerple", "fire", "none")
ROTARY = ("rope", "xpos")
QUERY_AWARE_POSITIONS = ("rope", "none")  # keys stored encoded, no score bias
_OPTIONS = "config.model.mixer_options.attention"


class AttentionMixer(nn.Module):
    """Causal multi-head attention with `num_kv_heads` shared K/V heads (GQA, Ainslie 2023).

    Cache: the cache policy's (`longjax.nn.kv_cache`), with keys stored encoded, or raw
    when their encoding depends on the reading call (see `_keys_at_read`).

    Without a cache, when the current mesh (`jax.set_mesh`) has a `sequence` axis of size
    > 1, attention runs sequence-parallel with strategy `sequence_parallel` ("ring",
    "all_gather", "ulysses", or "usp" with Ulysses groups of `ulysses_degree` devices) and
    token `layout` ("zigzag", "contiguous", "striped").
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"
    window: int | None = None
    num_sinks: int = 0
    softcap: float | None = None
    position: str = "rope"
    rope_base: float = 10000.0
    rope_fraction: float = 1.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_scaling_params: tuple = ()  # sorted (name, value) pairs, transformers' names
    train_length: int | None = None
    logn_scaling: bool = False
    self_extend_group: int = 0
    self_extend_window: int = 0
    t5_num_buckets: int = 32
    t5_max_distance: int = 128
    sequence_parallel: str = "ring"
    ulysses_degree: int | None = None
    layout: str = "zigzag"
    cache_mode: str = "full"
    cache_budget: int | None = None  # tokens kept per layer and KV head (bounded policies)
    cache_options: tuple = ()  # sorted (name, value) pairs of the cache policy's options
    qkv_bias: bool = False
    out_bias: bool = False
    scale: float | None = None

    def _check(self):
        """Raises ValueError naming the option for bad position / extension settings."""
        if self.position not in POSITIONS:
            raise ValueError(f"{_OPTIONS}.position={self.position!r}; allowed: {list(POSITIONS)}")
        positions_lib.check_rope_scaling(
            self.rope_scaling, self.rope_scaling_factor, self.train_length,
            params=self.rope_scaling_params, where=f"{_OPTIONS}.rope",
            length_field=f"{_OPTIONS}.train_length")
        if self.rope_scaling != "none" and self.position not in ROTARY:
            raise ValueError(f"{_OPTIONS}.rope_scaling={self.rope_scaling!r} needs a rotary "
                             f"position ({list(ROTARY)}); position={self.position!r}")
        if self.logn_scaling and not positive_int(self.train_length):
            raise ValueError(f"{_OPTIONS}.train_length must be a positive int for "
                             f"logn_scaling; got {self.train_length!r}")

    def _policies(self):
        """The cache policy and the position policy of the options, checked."""
        self._check()
        cache_policy = kv_cache.cache_policy(self.cache_mode, self, where=_OPTIONS)
        position = position_policy(self, where=_OPTIONS)
        if cache_policy.query_aware and (self.position not in QUERY_AWARE_POSITIONS
                                         or self._keys_at_read(position)):
            raise ValueError(
                f"{_OPTIONS}.cache_mode={self.cache_mode!r} ranks keys by the query, which needs "
                f"keys stored encoded and no score bias: position in "
                f"{list(QUERY_AWARE_POSITIONS)}, rope_scaling not dynamic_ntk / longrope, no "
                f"self_extend_group; got position={self.position!r}, "
                f"rope_scaling={self.rope_scaling!r}, "
                f"self_extend_group={self.self_extend_group!r}")
        return cache_policy, position

    def init_cache(self, batch_size, max_length, dtype=None):
        """The cache policy's empty cache for `max_length` tokens (a bounded policy's size
        does not depend on it)."""
        cache_policy, _ = self._policies()
        return cache_policy.init(batch_size, max_length, (self.num_kv_heads, self.head_dim),
                                 dtype or self.dtype)

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        cache_policy, position_policy = self._policies()
        B, T, _ = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = (dense((n, D), axes=("embed", heads, "kv"), dtype=self.dtype, name=name,
                         use_bias=self.qkv_bias)(x)
                   for name, n, heads in (("query", H, "heads"), ("key", K, "kv_heads"),
                                          ("value", K, "kv_heads")))
        bias = self._bias_module()
        shared_positions = positions is None  # one row of positions serves the batch
        if positions is None:
            start = 0 if cache is None else cache["end"]
            positions = jnp.broadcast_to(start + jnp.arange(T), (B, T))
        # The current length (dynamic NTK, LongRoPE), as transformers takes it.
        length = T if shared_positions and cache is None else jnp.max(positions) + 1
        # xPos decays relative to the centre of the call's positions (finite at any position).
        offset = positions[:, :1] + T // 2 if self.position == "xpos" else 0
        if self.position == "xpos" and T > positions_lib.XPOS_MAX_SPAN:
            raise ValueError(f"{_OPTIONS}.position='xpos' encodes at most "
                             f"{positions_lib.XPOS_MAX_SPAN} tokens per call in float32; got "
                             f"{T} (feed longer inputs in chunks through a cache)")
        pos = positions.astype(jnp.int32)
        seg = (jnp.ones((B, T), jnp.int32) if segment_ids is None
               else segment_ids.astype(jnp.int32))
        call = _Call(q=q, enc=dict(length=length, offset=offset), bias=bias,
                     segment_ids=segment_ids, shared_positions=shared_positions,
                     at_read=self._keys_at_read(position_policy))
        new = kv_cache.NewTokens(k if call.at_read else self._key(k, pos, call.enc), v, pos,
                                 seg, q=None if call.at_read else self._query(q, pos, call.enc))
        parts, cache = cache_policy.read(cache, new)
        parts = [p for part in parts for p in position_policy.split(part, new)]
        if len(parts) == 1:
            out = self._attend(call, new, parts[0], return_lse=False)
        else:
            out, lse = self._attend(call, new, parts[0], return_lse=True)
            for part in parts[1:]:
                out, lse = merge_attention(out, lse, *self._attend(call, new, part,
                                                                   return_lse=True))
            out = out.astype(q.dtype)
        return self._out(x, out), cache

    def _attend(self, call, new, part, *, return_lse):
        """Attention of the call's queries to one key part (see `kv_cache.KeyPart`): the
        query encoded at the part's query positions, raw keys encoded at theirs, the score
        bias of the scheme; `(out, lse)` with `return_lse`. The call's own tokens run
        sequence-parallel under a mesh with a `sequence` axis."""
        q = self._query(call.q, new.positions, call.enc, part.query_positions)
        kv_pos = new.positions if part.is_call else part.positions
        k = part.k.astype(q.dtype)
        if call.at_read:
            k = self._key(k, kv_pos, call.enc)
        v = part.v.astype(q.dtype)
        options = dict(causal=True, window=part.window, num_sinks=part.num_sinks,
                       softcap=self.softcap, scale=self.scale, impl=self.impl)
        if part.is_call:
            q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
            mesh = None if return_lse else sequence_mesh()
            if mesh is not None:
                if self.position not in (*ROTARY, "none"):
                    raise ValueError(f"sequence-parallel attention supports {_OPTIONS}.position "
                                     f"in {[*ROTARY, 'none']}; got {self.position!r}")
                return sequence_parallel_attention(
                    q, k, v, mesh=mesh, strategy=self.sequence_parallel, layout=self.layout,
                    ulysses_degree=self.ulysses_degree, segment_ids=call.segment_ids,
                    **options)
            score_pos = new.positions[:1] if call.shared_positions else new.positions
            return dot_product_attention(q, k, v, segment_ids=call.segment_ids,
                                         return_lse=return_lse, **options,
                                         **self._scores(call.bias, score_pos, score_pos))
        q_pos = new.positions if part.query_positions is None else part.query_positions
        scores = self._scores(call.bias, q_pos, kv_pos,
                              dense_alibi=part.query_positions is not None)
        if part.keep is not None:
            scores["bias"] = scores.get("bias", 0.0) + part.keep_bias(self.num_heads)
        return dot_product_attention(
            q, k, v, segment_ids=new.segment_ids, kv_segment_ids=part.segment_ids,
            q_positions=part.q_slots, kv_positions=part.kv_slots, return_lse=return_lse,
            block_k=k.shape[1] if part.one_block and self._blockwise() else None, **options,
            **scores)

    def _out(self, x, out):
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        return dense(x.shape[-1], axes=("heads", "kv", "embed"), dtype=self.dtype, name="out",
                     num_input_dims=2, use_bias=self.out_bias)(out)

    def _blockwise(self):
        """True when one query runs a path whose key block size is ours: "xla", or the
        split-cache path "split_kv", which `impl="auto"` takes for one query."""
        return self.impl in ("auto", "xla", "split_kv")

    def _bias_module(self):
        """The learned score-bias module of `position` (t5, kerple, fire) or None."""
        if self.position == "t5":
            return T5Bias(self.num_heads, self.t5_num_buckets, self.t5_max_distance,
                          name="position_bias")
        if self.position == "kerple":
            return KerpleLogBias(self.num_heads, name="position_bias")
        if self.position == "fire":
            return FireBias(self.num_heads, name="position_bias")
        return None

    def _scores(self, bias, q_positions, kv_positions, *, dense_alibi=False):
        """Score-bias arguments of `dot_product_attention` for the scheme, from the scheme
        positions `[B, Tq]`, `[B, Tk]`: ALiBi slopes (applied at the mask positions; a
        dense bias at these positions with `dense_alibi`), a learned bias, or nothing."""
        if self.position == "alibi":
            slopes = positions_lib.alibi_slopes(self.num_heads)
            if dense_alibi:
                return {"bias": alibi_bias(slopes, q_positions, kv_positions)}
            return {"alibi_slopes": slopes}
        if bias is not None:
            return {"bias": bias(q_positions, kv_positions)}
        return {}

    def _rotate(self, x, positions, enc, *, key):
        """RoPE / xPos at `positions` with the configured scaling and its attention factor
        on the rotated dims; `enc`: the call's current `length` (dynamic NTK, LongRoPE)
        and xPos `offset`."""
        if self.position not in ROTARY or self.rope_fraction <= 0:
            return x
        inv_freq = positions_lib.rope_frequencies(
            x.shape[-1], base=self.rope_base, fraction=self.rope_fraction,
            scaling=self.rope_scaling, factor=self.rope_scaling_factor,
            original_length=self.train_length, length=enc["length"],
            params=self.rope_scaling_params)
        factor = positions_lib.rope_attention_factor(
            self.rope_scaling, self.rope_scaling_factor, original_length=self.train_length,
            params=self.rope_scaling_params)
        if self.position == "xpos":
            return positions_lib.xpos(x, positions, key=key, inv_freq=inv_freq,
                                      offset=enc["offset"], attention_factor=factor)
        return positions_lib.rope(x, positions, inv_freq=inv_freq, attention_factor=factor)

    def _keys_at_read(self, position_policy):
        """True when a key's encoding depends on the call that reads it, so caches hold raw
        keys encoded at every read: xPos (decay relative to the call's offset), the
        length-dependent scalings (dynamic NTK, LongRoPE) and Self-Extend (two encodings)."""
        return (self.position == "xpos" or position_policy.encodes_at_read
                or self.rope_scaling in ("dynamic_ntk", "longrope"))

    def _query(self, q, positions, enc, scheme_positions=None):
        """q `[B, T, H, D]` encoded at `scheme_positions` (default `positions`), with the
        log-n scale of its true `positions`."""
        sp = positions if scheme_positions is None else scheme_positions
        q = self._rotate(q, sp, enc, key=False)
        if self.logn_scaling:
            q = q * positions_lib.logn_scale(positions, self.train_length).astype(q.dtype)
        return q

    def _key(self, k, positions, enc):
        return self._rotate(k, positions, enc, key=True)


@dataclasses.dataclass(frozen=True)
class _Call:
    """What every key part of one call is attended with: the raw query `[B, T, H, D]`, its
    encoding context `enc` (current `length`, xPos `offset`), the learned score bias module,
    the `segment_ids` as given (None: one document), whether the positions are shared by
    the rows, whether keys are encoded at read."""

    q: jax.Array
    enc: dict
    bias: nn.Module | None
    segment_ids: jax.Array | None
    shared_positions: bool
    at_read: bool


def build_attention(model, options, **module_kwargs):
    options = {**options, "rope_scaling_params": positions_lib.canonical_rope_params(
        options["rope_scaling_params"]), "cache_options": kv_cache.canonical_options(
        options["cache_options"], where=f"{_OPTIONS}.cache_options")}
    return AttentionMixer(
        num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim or model.d_model // model.num_heads,
        dtype=jnp.dtype(model.dtype), **options, **module_kwargs,
    )


for _name in ("attention", "local_attention"):
    register_mixer(_name, module=AttentionMixer)(build_attention)
