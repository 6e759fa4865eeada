"""Softmax-attention mixer: grouped-query attention, position schemes, KV caches, and the
training-free context-extension methods.

Positions (`position`): RoPE (`rope`, with `rope_scaling` linear / ntk / dynamic_ntk /
yarn / llama3 / longrope and their `rope_scaling_params`, see `longjax.ops.positions`;
dynamic_ntk and longrope take the current length, the largest position of the call + 1,
in the full forward, chunked prefill and decode alike), `xpos`, `alibi`, `t5` buckets, `kerple`
(log), `fire`, or `none` (NoPE; pair it with the LM's absolute embeddings for sinusoidal
or learned positions). `logn_scaling` scales queries past `train_length` by
log(p + 1) / log(train_length).

Beyond the window (`cache_mode`, `config.model.mixer_options.attention`), the same rule in
the full forward and in decoding:

- `"full"`: every token's keys and values (`max_length` slots in decoding); with `window`
  and `num_sinks` the full forward uses the Lambda mask (sinks + window).
- `"rolling"`: the `num_sinks` first tokens and the last `window` tokens, a constant
  `num_sinks + window` slots in decoding; the same math as the full forward with that
  `window` and `num_sinks` (sliding-window attention, Beltagy et al. 2020; with sinks the
  Lambda mask of LM-Infinite without its distance limit).
- `"streaming"`: those slots, with positions re-assigned inside the cache as in
  StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
  Sinks"): the sinks sit just before the window, so no query sees a relative position
  beyond `num_sinks + window - 1` and a stream of any length keeps a constant cache.
- `"lm_infinite"`: LM-Infinite (Han et al. 2023): the Lambda mask, and a sink seen from a
  query at position t sits at distance min(t, train_length) - s, so no distance exceeds
  the training length.

Self-Extend (Jin et al. 2024, "LLM Maybe LongLM"; `self_extend_group` G > 0,
`self_extend_window` N): keys within N tokens use RoPE as trained; farther keys use
grouped positions floor(s / G) against the query's floor(t / G) + N - floor(N / G); both
parts are merged by logsumexp, a single softmax over all keys.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from longjax.nn.layers import dense
from longjax.nn.position_bias import FireBias, KerpleLogBias, T5Bias
from longjax.nn.registry import register_mixer
from longjax.ops import positions as positions_lib
from longjax.ops.attention import alibi_bias, dot_product_attention, merge_attention
from longjax.parallel.mesh import sequence_mesh
from longjax.parallel.sequence_parallel import sequence_parallel_attention

CACHE_MODES = ("full", "rolling", "streaming", "lm_infinite")
POSITIONS = ("rope", "xpos", "alibi", "t5", "kerple", "fire", "none")
ROTARY = ("rope", "xpos")
_OPTIONS = "config.model.mixer_options.attention"


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class AttentionMixer(nn.Module):
    """Causal multi-head attention with `num_kv_heads` shared K/V heads (GQA, Ainslie 2023).

    Cache: `{"k", "v": [B, L, K, D], "segment_ids": [B, L] (0 = empty), "end": int32}`;
    tokens are written at slots `end .. end + T - 1` and attend causally by slot (keys are
    stored rotated, or raw when their encoding depends on the reading call: see
    `_keys_at_read`).

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
        needs_length = self.logn_scaling or self.cache_mode == "lm_infinite"
        if needs_length and not _positive_int(self.train_length):
            raise ValueError(f"{_OPTIONS}.train_length must be a positive int for "
                             f"logn_scaling / cache_mode='lm_infinite'; got {self.train_length!r}")
        if self.self_extend_group:
            if not (_positive_int(self.self_extend_group) and _positive_int(
                    self.self_extend_window)) or self.position != "rope":
                raise ValueError(
                    f"{_OPTIONS}.self_extend_group={self.self_extend_group!r} needs a positive "
                    f"int group, a positive int self_extend_window (got "
                    f"{self.self_extend_window!r}) and position='rope' (got {self.position!r})")
            if self._bounded_cache():
                raise ValueError(f"{_OPTIONS}.self_extend_group works with cache_mode='full'; "
                                 f"got cache_mode={self.cache_mode!r}")

    def _bounded_cache(self):
        """True for the `"rolling"`, `"streaming"` and `"lm_infinite"` caches (checked)."""
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"{_OPTIONS}.cache_mode must be one of {CACHE_MODES}; "
                             f"got {self.cache_mode!r}")
        if self.cache_mode != "full" and not _positive_int(self.window):
            raise ValueError(f"{_OPTIONS}.cache_mode={self.cache_mode!r} needs a positive int "
                             f"window; got window={self.window!r}")
        return self.cache_mode != "full"

    def init_cache(self, batch_size, max_length, dtype=None):
        """Full cache: `max_length` slots. Bounded caches: `num_sinks + window` slots
        whatever `max_length` is (sinks first, then a ring of the last `window` tokens,
        position p in ring slot `p % window`), with `"positions": [B, S]` (-1 = empty)."""
        self._check()
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
        self._check()
        B, T, _ = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = dense((H, D), axes=("embed", "heads", "kv"), dtype=self.dtype, name="query")(x)
        k = dense((K, D), axes=("embed", "kv_heads", "kv"), dtype=self.dtype, name="key")(x)
        v = dense((K, D), axes=("embed", "kv_heads", "kv"), dtype=self.dtype, name="value")(x)
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
        enc = dict(length=length, offset=offset)
        options = dict(softcap=self.softcap, impl=self.impl)
        streaming_rule = self.num_sinks and self.cache_mode in ("streaming", "lm_infinite")
        if (cache is not None and self._bounded_cache()) or (cache is None and streaming_rule):
            bounded = cache if cache is not None else self.init_cache(B, 0, q.dtype)
            out, new = self._attend_bounded(q, k, v, segment_ids, positions, bounded, bias,
                                            options, enc)
            return self._out(x, out), None if cache is None else new
        if cache is not None:
            out, cache = self._attend_cached(q, k, v, segment_ids, positions, cache, bias,
                                             options, enc)
            return self._out(x, out), cache
        if self.self_extend_group:
            seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids
            out = self._self_extend(q, k, v, positions, positions, seg, seg, None, None, enc,
                                    options)
            return self._out(x, out), None
        q, k = self._query(q, positions, enc), self._key(k, positions, enc)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        options.update(window=self.window, num_sinks=self.num_sinks)
        mesh = sequence_mesh()
        if mesh is not None:
            if self.position not in (*ROTARY, "none"):
                raise ValueError(f"sequence-parallel attention supports {_OPTIONS}.position in "
                                 f"{[*ROTARY, 'none']}; got {self.position!r}")
            out = sequence_parallel_attention(
                q, k, v, mesh=mesh, strategy=self.sequence_parallel, layout=self.layout,
                ulysses_degree=self.ulysses_degree,
                causal=True, segment_ids=segment_ids, **options)
        else:
            score_pos = positions[:1] if shared_positions else positions
            out = dot_product_attention(q, k, v, causal=True, segment_ids=segment_ids,
                                        **options, **self._scores(bias, score_pos, score_pos))
        return self._out(x, out), None

    def _out(self, x, out):
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        return dense(x.shape[-1], axes=("heads", "kv", "embed"), dtype=self.dtype, name="out",
                     num_input_dims=2)(out)

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

    def _keys_at_read(self):
        """True when a key's encoding depends on the call that reads it, so caches hold raw
        keys encoded at every read: xPos (decay relative to the call's offset), the
        length-dependent scalings (dynamic NTK, LongRoPE) and Self-Extend (two encodings)."""
        return (self.position == "xpos" or bool(self.self_extend_group)
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

    def _attend_bounded(self, q, k, v, segment_ids, positions, cache, bias, options, enc):
        """Attention through the bounded cache; q, k `[B, T, *, D]` before encoding.

        The cache holds `num_sinks` sink slots (the tokens at positions `< num_sinks`) and
        a ring of the last `window` tokens (written in place), keys encoded at their own
        positions once, when written. Attention is computed in two parts merged by their
        logsumexp: the window part (non-sink keys with `0 <= t - s < window`, the query
        at its position `t`; relative schemes depend on `t - s` alone, so this is the same
        as re-assigning positions inside the cache) and the sink part (keys `s <
        num_sinks`, `s <= t`), where the query is encoded at `t` ("rolling"),
        `min(t, num_sinks + window - 1)` ("streaming") or `min(t, train_length)`
        ("lm_infinite"). With an empty cache this is the full forward under that rule.
        Raw keys (`_keys_at_read`) are encoded at their positions when read.
        """
        B, T = q.shape[:2]
        S, W = self.num_sinks, self.window
        seg = (jnp.ones((B, T), jnp.int32) if segment_ids is None
               else segment_ids.astype(jnp.int32))
        pos = positions.astype(jnp.int32)
        dtype = cache["k"].dtype
        at_read = self._keys_at_read()
        if not at_read:
            k = self._key(k, pos, enc)
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
        if at_read:
            keys = self._key(keys, kv_pos, enc)
        out, lse = dot_product_attention(
            self._query(q, pos, enc), keys.astype(q.dtype), values.astype(q.dtype),
            causal=True, window=W, segment_ids=seg,
            kv_segment_ids=jnp.where(kv_pos < S, 0, kv_seg), q_positions=pos,
            kv_positions=kv_pos, return_lse=True,
            block_k=keys.shape[1] if T == 1 and self._blockwise() else None,  # no padding
            **options, **self._scores(bias, pos, kv_pos))
        if S:  # sink part
            q_sink_pos = {"rolling": pos, "streaming": jnp.minimum(pos, S + W - 1),
                          "lm_infinite": jnp.minimum(pos, self.train_length or 0)}[
                              self.cache_mode]
            sink_pos = new["positions"][:, :S]
            sink_keys = new["k"][:, :S]
            if at_read:
                sink_keys = self._key(sink_keys, sink_pos, enc)
            out_s, lse_s = dot_product_attention(
                self._query(q, pos, enc, q_sink_pos), sink_keys.astype(q.dtype),
                new["v"][:, :S].astype(q.dtype), causal=True, segment_ids=seg,
                kv_segment_ids=new["segment_ids"][:, :S], q_positions=pos,
                kv_positions=sink_pos, return_lse=True, **options,
                **self._scores(bias, q_sink_pos, sink_pos, dense_alibi=True))
            out = merge_attention(out, lse, out_s, lse_s)[0].astype(out.dtype)
        new["end"] = cache["end"] + T
        return out, new

    def _attend_cached(self, q, k, v, segment_ids, positions, cache, bias, options, enc):
        """Attention through the full cache. Slots order the keys (the mask); the scheme
        sees positions, slot + (the row's position - its slot), so left padding is free.
        One query with `impl="auto"` takes the split-cache decode path
        (`ops.attention.split_kv_attention`, chosen by `longjax.ops.impl`)."""
        B, T = q.shape[:2]
        L, end = cache["k"].shape[1], cache["end"]
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        q_slots = jnp.broadcast_to(end + jnp.arange(T), (B, T))
        kv_slots = jnp.broadcast_to(jnp.arange(L), (B, L))
        kv_pos = kv_slots + (positions[:, :1] - end)
        if not self._keys_at_read():
            k = self._key(k, positions, enc)

        def write(name, value):
            return jax.lax.dynamic_update_slice_in_dim(cache[name], value.astype(
                cache[name].dtype), end, 1)

        cache = {"k": write("k", k), "v": write("v", v),
                 "segment_ids": write("segment_ids", segment_ids), "end": end + T}
        keys, values = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
        if self.self_extend_group:
            out = self._self_extend(q, keys, values, positions, kv_pos, segment_ids,
                                    cache["segment_ids"], q_slots, kv_slots, enc, options)
            return out, cache
        if self._keys_at_read():
            keys = self._key(keys, kv_pos, enc)
        out = dot_product_attention(
            self._query(q, positions, enc), keys, values, causal=True,
            segment_ids=segment_ids, kv_segment_ids=cache["segment_ids"],
            q_positions=q_slots, kv_positions=kv_slots, **options,
            **self._scores(bias, positions, kv_pos))
        return out, cache

    def _self_extend(self, q, k, v, q_pos, kv_pos, seg, kv_seg, q_slots, kv_slots, enc,
                     options):
        """Self-Extend attention of raw q `[B, T, H, D]`, k, v `[B, S, K, D]` at positions
        `q_pos`, `kv_pos` (masks at `q_slots`, `kv_slots`; None = positions): the
        neighbour part (distance < N, trained positions) and the grouped part (distance
        >= N, positions // G, the query shifted by N - N // G), merged by logsumexp."""
        G, N = self.self_extend_group, self.self_extend_window
        q_mask = q_pos if q_slots is None else q_slots
        kv_mask = kv_pos if kv_slots is None else kv_slots
        common = dict(causal=True, segment_ids=seg, kv_segment_ids=kv_seg,
                      kv_positions=kv_mask, return_lse=True, **options)
        near, near_lse = dot_product_attention(
            self._query(q, q_pos, enc), self._key(k, kv_pos, enc), v, window=N,
            q_positions=q_mask, **common)
        far, far_lse = dot_product_attention(
            self._query(q, q_pos, enc, q_pos // G + N - N // G),
            self._key(k, kv_pos // G, enc), v, q_positions=q_mask - N, **common)
        return merge_attention(near, near_lse, far, far_lse)[0].astype(q.dtype)


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
              "position": "rope", "rope_base": 10000.0, "rope_fraction": 1.0,
              "rope_scaling": "none", "rope_scaling_factor": 1.0, "rope_scaling_params": (),
              "train_length": None,
              "logn_scaling": False, "self_extend_group": 0, "self_extend_window": 0,
              "t5_num_buckets": 32, "t5_max_distance": 128, "sequence_parallel": "ring",
              "ulysses_degree": None, "layout": "zigzag", "cache_mode": "full"},
)
def build_attention(model, options, **module_kwargs):
    options = {**options, "rope_scaling_params": positions_lib.canonical_rope_params(
        options["rope_scaling_params"])}
    return AttentionMixer(
        num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim or model.d_model // model.num_heads,
        dtype=jnp.dtype(model.dtype), **options, **module_kwargs,
    )
