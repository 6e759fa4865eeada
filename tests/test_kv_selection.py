"""Query-aware, per-head, budgeted KV-cache policies (H2O, SnapKV) and the per-head key
masks they need, checked against dense NumPy definitions written from the papers."""

import numpy as np
import pytest

from longjax.ops.attention import attention_weights, dot_product_attention


def _dense_per_head(q, k, v, q_pos, kv_pos, kv_seg):
    """NumPy attention where KV head k masks key s by `kv_seg[b, s, k] != 0` and
    `kv_pos[b, s, k] <= q_pos[b, t]`, for its G query heads: `(out, p)`."""
    B, T, H, D = q.shape
    K = k.shape[2]
    G = H // K
    out = np.zeros((B, T, H, D))
    p = np.zeros((B, H, T, k.shape[1]))
    for b in range(B):
        for h in range(H):
            kh = h // G
            s = q[b, :, h] @ k[b, :, kh].T * D**-0.5
            seen = (kv_seg[b, None, :, kh] != 0) & (kv_pos[b, None, :, kh] <= q_pos[b, :, None])
            s = np.where(seen, s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            w = np.where(seen, w, 0.0)
            w = w / w.sum(-1, keepdims=True)
            p[b, h] = w
            out[b, :, h] = w @ v[b, :, kh]
    return out, p


def test_per_head_key_masks_every_path():
    """`kv_segment_ids` / `kv_positions` `[B, S, K]`: each KV head masks its own keys for
    its G query heads, in the reference, blockwise and split-cache paths alike."""
    rng = np.random.default_rng(0)
    B, T, S, H, K, D = 2, 3, 10, 4, 2, 8
    q = rng.normal(size=(B, T, H, D)).astype(np.float32)
    k, v = (rng.normal(size=(B, S, K, D)).astype(np.float32) for _ in range(2))
    kv_pos = rng.integers(0, 12, size=(B, S, K)).astype(np.int32)
    kv_seg = (rng.random((B, S, K)) < 0.8).astype(np.int32)
    q_pos = np.broadcast_to(np.arange(9, 12, dtype=np.int32), (B, T))
    want, p = _dense_per_head(q, k, v, q_pos, kv_pos, kv_seg)
    for impl in ("reference", "xla", "split_kv"):
        got = dot_product_attention(q, k, v, causal=True, q_positions=q_pos,
                                    kv_positions=kv_pos, kv_segment_ids=kv_seg, impl=impl,
                                    block_k=8 if impl != "reference" else None)
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=impl)
    np.testing.assert_allclose(
        attention_weights(q, k, causal=True, q_positions=q_pos, kv_positions=kv_pos,
                          kv_segment_ids=kv_seg), p, atol=1e-6)
    with pytest.raises(ValueError, match=r"kv_positions per key/value head must be"):
        dot_product_attention(q, k, v, causal=True, q_positions=q_pos,
                              kv_positions=kv_pos[:, :, :1].repeat(3, axis=2))


def _mixer(**options):
    from longjax.nn.attention import AttentionMixer

    return AttentionMixer(num_heads=4, num_kv_heads=2, head_dim=8, **options)


def test_budget_and_options_are_checked():
    """`cache_budget` sizes the rolling family (num_sinks + window); a budget for a policy
    without one, an option a policy does not declare, a bad value, and a query-aware
    policy where keys are encoded at read or scores carry a bias are ValueErrors naming
    the option."""
    policy, _ = _mixer(cache_mode="streaming", num_sinks=2, cache_budget=6)._policies()
    assert policy.ring == 4
    where = "config.model.mixer_options.attention"
    for options, message in (
            (dict(cache_mode="full", cache_budget=8), f"{where}.cache_budget=8: cache_mode"),
            (dict(cache_mode="rolling", window=4, cache_budget=8), r"must be num_sinks \+ window"),
            (dict(cache_mode="rolling", cache_budget=2, num_sinks=2), "needs a positive int"),
            (dict(cache_mode="rolling", window=4, cache_options=(("recent_ratio", 1),)),
             f"{where}.cache_options.recent_ratio: not an option"),
            (dict(cache_mode="h2o"), f"{where}.cache_budget must be an int >= 1"),
            (dict(cache_mode="h2o", cache_budget=8, cache_options=(("recent_ratio", 2),)),
             f"{where}.cache_options.recent_ratio must be a number in"),
            (dict(cache_mode="snapkv", cache_budget=8), "cache_budget must be an int >= 32"),
            (dict(cache_mode="snapkv", cache_budget=64, cache_options=(("kernel_size", 4),)),
             f"{where}.cache_options.kernel_size must be a positive odd int"),
            (dict(cache_mode="h2o", cache_budget=8, window=4), f"{where}.window and num_sinks"),
            (dict(cache_mode="h2o", cache_budget=8, position="alibi"),
             "cache_mode='h2o' ranks keys by the query"),
            (dict(cache_mode="snapkv", cache_budget=64, rope_scaling="dynamic_ntk",
                  rope_scaling_factor=2.0, train_length=16),
             "cache_mode='snapkv' ranks keys by the query")):
        with pytest.raises(ValueError, match=message):
            _mixer(**options)._policies()


# Dense NumPy definitions of what H2O and SnapKV keep, written from the papers, token by
# token and head by head (float64, no shared code with the policies).

B, K, G, D = 2, 2, 2, 8
PAD = 3  # row 1 is left-padded by PAD tokens (segment 0, position 0)
LENGTH = 16


def _stream():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(B, LENGTH, K * G, D))
    k = rng.normal(size=(B, LENGTH, K, D))
    segments = np.ones((B, LENGTH), np.int32)
    segments[1, :PAD] = 0
    positions = np.stack([np.arange(LENGTH), np.maximum(np.arange(LENGTH) - PAD, 0)])
    return q, k, segments, positions.astype(np.int32)


def _received(q, k, b, kh, queries, keys, positions, scores):
    """Adds to `scores[s]` the attention each key in `keys` receives from each query in
    `queries` (causal by position), summed over the G query heads of KV head `kh`."""
    for t in queries:
        seen = [s for s in keys if positions[b, s] <= positions[b, t]]
        for h in range(kh * G, (kh + 1) * G):
            logits = np.array([q[b, t, h] @ k[b, s, kh] for s in seen]) * D**-0.5
            p = np.exp(logits - logits.max())
            for s, w in zip(seen, p / p.sum(), strict=True):
                scores[s] = scores.get(s, 0.0) + w


def h2o_kept(q, k, segments, positions, chunks, budget, recent):
    """{(b, kv head): (kept token indices, their accumulated attention)} after the chunks."""
    out = {}
    for b in range(B):
        for kh in range(K):
            kept, scores = [], {}
            for lo, hi in chunks:
                new = [t for t in range(lo, hi) if segments[b, t]]
                cand = kept + new
                _received(q, k, b, kh, new, cand, positions, scores)
                if len(cand) > budget:
                    by_age = sorted(cand, key=lambda s: positions[b, s])
                    recents = by_age[len(by_age) - recent:] if recent else []
                    heavy = sorted((s for s in cand if s not in recents),
                                   key=lambda s: -scores[s])
                    cand = recents + heavy[:budget - len(recents)]
                kept = cand
                scores = {s: scores[s] for s in kept}
            out[b, kh] = kept, scores
    return out


def snapkv_kept(q, k, segments, positions, chunks, budget, window, kernel):
    """{(b, kv head): kept token indices} after the chunks: a chunk of T > 1 tokens keeps
    the last `window` tokens and the top budget - window others by the max-pooled
    attention of its last min(window, T) queries; a one-token step keeps the selected
    tokens and the most recent others."""
    out = {}
    for b in range(B):
        for kh in range(K):
            kept, selected = [], set()
            for lo, hi in chunks:
                cand = sorted(kept + [t for t in range(lo, hi) if segments[b, t]],
                              key=lambda s: positions[b, s])
                if hi - lo == 1:
                    rest = [s for s in cand if s not in selected]
                    room = budget - len(selected)
                    kept = [s for s in cand if s in selected] + (rest[-room:] if room else [])
                    continue
                tail, prefix = cand[-window:], cand[:-window]
                scores = {}
                observers = [t for t in range(max(lo, hi - window), hi) if segments[b, t]]
                _received(q, k, b, kh, observers, cand, positions, scores)
                raw = [scores.get(s, 0.0) for s in prefix]
                pooled = [max(raw[max(0, i - kernel // 2):i + kernel // 2 + 1])
                          for i in range(len(raw))]
                order = sorted(range(len(prefix)), key=lambda i: (-pooled[i], i))
                selected = {prefix[i] for i in order[:budget - len(tail)]}
                kept = sorted(selected) + tail
            out[b, kh] = kept
    return out


CHUNKS = [(0, 5), (5, 10)] + [(t, t + 1) for t in range(10, LENGTH)]


def _run_policy(policy, chunks):
    """The stream through `policy.read` chunk by chunk: the final cache."""
    import jax
    import jax.numpy as jnp

    from longjax.nn.kv_cache import NewTokens

    q, k, segments, positions = _stream()
    read = jax.jit(lambda cache, *new: policy.read(cache, NewTokens(*new))[1])
    cache = policy.init(B, 0, (K, D), jnp.float32)
    for lo, hi in chunks:
        cache = read(cache, jnp.asarray(k[:, lo:hi], jnp.float32),
                     jnp.zeros((B, hi - lo, K, D)), jnp.asarray(positions[:, lo:hi]),
                     jnp.asarray(segments[:, lo:hi]), jnp.asarray(q[:, lo:hi], jnp.float32))
    return cache


def _kept_tokens(cache, b, kh):
    """The kept token indices of row b, head kh (positions back to stream indices)."""
    pos = np.asarray(cache["positions"][b, :, kh])
    pos = pos[np.asarray(cache["segment_ids"][b, :, kh]) != 0]
    return sorted((pos + (PAD if b == 1 else 0)).tolist())


def _policy(name, budget, **options):
    return _mixer(cache_mode=name, cache_budget=budget,
                  cache_options=tuple(sorted(options.items())))._policies()[0]


def test_h2o_keeps_the_recent_and_the_heavy_hitters():
    """Per row (one left-padded) and KV head (G = 2), through two prefill chunks and six
    decode steps: the kept tokens and their accumulated attention equal the dense
    definition (recent half, heaviest others)."""
    budget = 6
    cache = _run_policy(_policy("h2o", budget), CHUNKS)
    want = h2o_kept(*_stream(), CHUNKS, budget, recent=3)
    for (b, kh), (kept, scores) in want.items():
        assert _kept_tokens(cache, b, kh) == sorted(kept), (b, kh)
        got = np.asarray(cache["score"][b, :, kh])[np.asarray(cache["segment_ids"][b, :, kh]) != 0]
        np.testing.assert_allclose(got, [scores[s] for s in sorted(kept)], rtol=1e-5)


def test_snapkv_keeps_the_window_and_the_pooled_top_keys():
    """Per row (one left-padded) and KV head, through two prefill chunks and six decode
    steps: the kept tokens equal the dense definition (observation window, max pool)."""
    budget, window, kernel = 6, 2, 3
    cache = _run_policy(_policy("snapkv", budget, window=window, kernel_size=kernel), CHUNKS)
    want = snapkv_kept(*_stream(), CHUNKS, budget, window, kernel)
    for (b, kh), kept in want.items():
        assert _kept_tokens(cache, b, kh) == sorted(kept), (b, kh)


def test_a_budget_covering_the_context_is_full_attention():
    """A left-padded batch (row 1: 3 padding tokens) through chunked prefill (4 + 4 tokens)
    and four decode steps with a budget of 12 (the context): H2O's and SnapKV's outputs
    equal full attention's."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 12, 16)), jnp.float32)
    segments = np.ones((2, 12), np.int32)
    segments[1, :3] = 0
    positions = np.stack([np.arange(12), np.maximum(np.arange(12) - 3, 0)]).astype(np.int32)
    full = _mixer(impl="reference")
    params = jax.tree.map(
        lambda s: jnp.asarray(np.random.default_rng(3).normal(size=s.shape) * 0.3, s.dtype),
        jax.eval_shape(full.init, jax.random.key(0), x[:, :4]))
    want = jax.jit(full.apply)(params, x, segment_ids=segments, positions=positions)[0]
    mixers = [_mixer(impl="reference", cache_mode="h2o", cache_budget=12),
              _mixer(impl="reference", cache_mode="snapkv", cache_budget=12,
                     cache_options=(("window", 4),))]

    @jax.jit
    def step(caches, x, segments, positions):
        return tuple(zip(*(m.apply(params, x, segment_ids=segments, positions=positions,
                                   cache=c) for m, c in zip(mixers, caches, strict=True)),
                         strict=True))

    caches, outs = [m.init_cache(2, 12) for m in mixers], []
    for lo, hi in ((0, 4), (4, 8), (8, 9), (9, 10), (10, 11), (11, 12)):
        ys, caches = step(caches, x[:, lo:hi], segments[:, lo:hi], positions[:, lo:hi])
        outs.append(ys)
    for got in zip(*outs, strict=True):
        np.testing.assert_allclose(jnp.concatenate(got, 1), want, atol=1e-5)
    assert all(c["k"].shape == (2, 12, 2, 8) for c in caches)
