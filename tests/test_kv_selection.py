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
# token and head by head (float64, no shared code with the policies). Row 0 holds 16
# tokens, more than the budget of 6; row 1 is left-padded by 10 tokens (segment 0,
# position 0), so its 6 tokens fit the budget: full attention.

B, K, G, D = 2, 2, 2, 8
PAD, LENGTH, BUDGET = 10, 16, 6
CHUNKS = [(0, 6), (6, 12)] + [(t, t + 1) for t in range(12, LENGTH)]


def _stream():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(B, LENGTH, K * G, D))
    k, v = rng.normal(size=(2, B, LENGTH, K, D))
    segments = np.ones((B, LENGTH), np.int32)
    segments[1, :PAD] = 0
    positions = np.stack([np.arange(LENGTH), np.maximum(np.arange(LENGTH) - PAD, 0)])
    return q, k, v, segments, positions.astype(np.int32)


def _attend(stream, b, kh, queries, keys, out, scores):
    """Attention of `queries` to `keys` (causal by position) for the G query heads of KV
    head kh: writes the outputs into `out[b, t, h]` and adds to `scores[s]` the
    probability each key receives, summed over the queries and the G heads."""
    q, k, v, _, positions = stream
    for t in queries:
        seen = [s for s in keys if positions[b, s] <= positions[b, t]]
        for h in range(kh * G, (kh + 1) * G):
            logits = np.array([q[b, t, h] @ k[b, s, kh] for s in seen]) * D**-0.5
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[b, t, h] = p @ v[b, seen, kh]
            for s, w in zip(seen, p, strict=True):
                scores[s] = scores.get(s, 0.0) + w


def h2o_reference(stream, chunks, budget, recent):
    """`(outputs [B, T, H, D], {(b, kv head): {kept token: accumulated attention}})`."""
    segments, positions = stream[3], stream[4]
    out, kept_scores = np.zeros(stream[0].shape), {}
    for b in range(B):
        for kh in range(K):
            kept, scores = [], {}
            for lo, hi in chunks:
                new = [t for t in range(lo, hi) if segments[b, t]]
                cand = kept + new
                _attend(stream, b, kh, new, cand, out, scores)
                if len(cand) > budget:
                    by_age = sorted(cand, key=lambda s: positions[b, s])
                    recents = by_age[len(by_age) - recent:] if recent else []
                    heavy = sorted((s for s in cand if s not in recents),
                                   key=lambda s: -scores[s])
                    cand = recents + heavy[:budget - len(recents)]
                kept = cand
                scores = {s: scores[s] for s in kept}
            kept_scores[b, kh] = scores
    return out, kept_scores


def snapkv_reference(stream, chunks, budget, window, kernel):
    """`(outputs [B, T, H, D], {(b, kv head): kept tokens})`: a chunk of T > 1 tokens keeps
    the last `window` tokens and the top budget - window others by the max-pooled
    attention of its last min(window, T) queries; a one-token step keeps the selected
    tokens and the most recent others."""
    segments, positions = stream[3], stream[4]
    out, kept_sets = np.zeros(stream[0].shape), {}
    for b in range(B):
        for kh in range(K):
            kept, selected = [], set()
            for lo, hi in chunks:
                new = [t for t in range(lo, hi) if segments[b, t]]
                cand = sorted(kept + new, key=lambda s: positions[b, s])
                _attend(stream, b, kh, new, cand, out, {})
                if hi - lo == 1:
                    rest = [s for s in cand if s not in selected]
                    room = budget - len(selected)
                    kept = [s for s in cand if s in selected] + (rest[-room:] if room else [])
                    continue
                tail, prefix = cand[-window:], cand[:-window]
                scores = {}
                observers = [t for t in range(max(lo, hi - window), hi) if segments[b, t]]
                _attend(stream, b, kh, observers, cand, np.zeros(out.shape), scores)
                raw = [scores.get(s, 0.0) for s in prefix]
                pooled = [max(raw[max(0, i - kernel // 2):i + kernel // 2 + 1])
                          for i in range(len(raw))]
                order = sorted(range(len(prefix)), key=lambda i: (-pooled[i], i))
                selected = {prefix[i] for i in order[:budget - len(tail)]}
                kept = sorted(selected) + tail
            kept_sets[b, kh] = kept
    return out, kept_sets


def _run_policy(policy, stream):
    """The stream through `policy.read` chunk by chunk (`CHUNKS`), each chunk's queries
    attending to the part it returns: `(outputs [B, T, H, D], final cache)`."""
    import jax
    import jax.numpy as jnp

    from longjax.nn.kv_cache import NewTokens

    @jax.jit
    def read(cache, q, k, v, positions, segments):
        new = NewTokens(k, v, positions, segments, q=q)
        [part], cache = policy.read(cache, new)
        return dot_product_attention(
            q, part.k, part.v, causal=True, segment_ids=segments,
            kv_segment_ids=part.segment_ids, q_positions=part.q_slots,
            kv_positions=part.kv_slots, impl="reference"), cache

    q, k, v, segments, positions = stream
    cache, outs = policy.init(B, 0, (K, D), jnp.float32), []
    empty = jax.tree.map(lambda a: (a.shape, a.dtype), cache)
    for lo, hi in CHUNKS:
        out, cache = read(cache, *(jnp.asarray(x[:, lo:hi], jnp.float32) for x in (q, k, v)),
                          positions[:, lo:hi], segments[:, lo:hi])
        outs.append(out)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), cache) == empty  # fixed under jit
    return np.concatenate(outs, 1), cache


def _kept(cache, name, b, kh):
    """{kept token: its `name` state} of row b, head kh (positions back to stream indices)."""
    real = np.asarray(cache["segment_ids"][b, :, kh]) != 0
    tokens = np.asarray(cache["positions"][b, :, kh])[real] + (PAD if b == 1 else 0)
    return dict(zip(tokens.tolist(), np.asarray(cache[name][b, :, kh])[real].tolist(),
                    strict=True))


def _full_attention(stream, b):
    out = np.zeros(stream[0].shape)
    tokens = [t for t in range(LENGTH) if stream[3][b, t]]
    for kh in range(K):
        _attend(stream, b, kh, tokens, tokens, out, {})
    return out[b]


def _policy(name, budget, **options):
    return _mixer(cache_mode=name, cache_budget=budget,
                  cache_options=tuple(sorted(options.items())))._policies()[0]


def test_h2o_keeps_the_recent_and_the_heavy_hitters():
    """Per row and KV head (G = 2), through two prefill chunks and four decode steps: every
    step's output and the final kept tokens with their accumulated attention equal the
    dense definition (recent half, heaviest others); row 1, within the budget, gets full
    attention."""
    stream = _stream()
    got, cache = _run_policy(_policy("h2o", BUDGET), stream)
    want, kept = h2o_reference(stream, CHUNKS, BUDGET, recent=BUDGET // 2)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got[1], _full_attention(stream, 1), atol=1e-5)
    for (b, kh), scores in kept.items():
        got_scores = _kept(cache, "score", b, kh)
        assert sorted(got_scores) == sorted(scores), (b, kh)
        np.testing.assert_allclose([got_scores[s] for s in sorted(scores)],
                                   [scores[s] for s in sorted(scores)], rtol=1e-5)


def test_snapkv_keeps_the_window_and_the_pooled_top_keys():
    """Per row and KV head, through two prefill chunks and four decode steps: every step's
    output and the final kept tokens equal the dense definition (observation window, max
    pool); row 1, within the budget, gets full attention."""
    stream = _stream()
    got, cache = _run_policy(_policy("snapkv", BUDGET, window=2, kernel_size=3), stream)
    want, kept = snapkv_reference(stream, CHUNKS, BUDGET, window=2, kernel=3)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got[1], _full_attention(stream, 1), atol=1e-5)
    for (b, kh), tokens in kept.items():
        assert sorted(_kept(cache, "selected", b, kh)) == sorted(tokens), (b, kh)


def test_a_budget_covering_the_context_is_full_attention_in_the_mixer():
    """Through the attention mixer (projections, RoPE, the encoded queries handed to the
    policy), a left-padded batch (row 1: 3 padding tokens) in chunks of 4 tokens with a
    budget of 12 (the context): SnapKV's outputs equal full attention's. (Per policy and
    through decode steps in the tests above.)"""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 12, 16)), jnp.float32)
    segments = np.ones((2, 12), np.int32)
    segments[1, :3] = 0
    positions = np.stack([np.arange(12), np.maximum(np.arange(12) - 3, 0)]).astype(np.int32)
    shapes = {"query": (16, 4, 8), "key": (16, 2, 8), "value": (16, 2, 8), "out": (4, 8, 16)}
    params = {"params": {name: {"kernel": jnp.asarray(rng.normal(size=shape) * 0.3,
                                                      jnp.float32)}
                         for name, shape in shapes.items()}}
    want = jax.jit(_mixer(impl="reference").apply)(params, x, segment_ids=segments,
                                                   positions=positions)[0]
    mixer = _mixer(impl="reference", cache_mode="snapkv", cache_budget=12,
                   cache_options=(("window", 4),))
    step = jax.jit(lambda c, *a: mixer.apply(params, a[0], segment_ids=a[1], positions=a[2],
                                             cache=c))
    cache, outs = mixer.init_cache(2, 12), []
    for lo in range(0, 12, 4):
        y, cache = step(cache, x[:, lo:lo + 4], segments[:, lo:lo + 4],
                        positions[:, lo:lo + 4])
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, atol=1e-5)
    assert cache["k"].shape == (2, 12, 2, 8)


def test_cache_policy_flags_and_methods():
    """`--cache_policy --cache_budget --cache_options` become the method part
    `cache:NAME:B:name=value...`, which sets and checks the attention's cache options;
    unknown policies and bad budgets or options are named."""
    import ml_collections
    from absl import flags

    from longjax.eval import cache_flags
    from longjax.eval.methods import apply_method, cache_method, method_overrides

    fv = flags.FlagValues()
    cache_flags.define_flags(fv)
    fv(["prog", "--cache_policy=snapkv", "--cache_budget=64",
        "--cache_options=window=16,pooling=avg"])
    part = cache_flags.method_part_from_flags(fv)
    assert part == "cache:snapkv:64:window=16:pooling=avg"
    assert method_overrides(f"yarn:2+{part}", train_length=16, eval_length=64) == {
        "rope_scaling": "yarn", "rope_scaling_factor": 2.0, "train_length": 16,
        "cache_mode": "snapkv", "cache_budget": 64,
        "cache_options": (("pooling", "avg"), ("window", 16))}
    assert cache_method("streaming", 64) == "streaming:64"
    assert method_overrides("lm_infinite:64", train_length=16, eval_length=64) == {
        "cache_mode": "lm_infinite", "num_sinks": 10, "window": 54, "train_length": 16}
    model = ml_collections.ConfigDict(dict(
        d_model=16, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32",
        mixer="attention", mixer_options={"attention": {}}))
    config = apply_method(model, f"none+{part}", train_length=16, eval_length=64)
    assert config.mixer_options.attention.cache_budget == 64
    for method, message in (
            ("cache:quest2", r"cache:NAME\[:B\]\[:option=value...\]' with NAME in \['full'"),
            ("cache:h2o:0", "the cache budget must be a positive int; got '0'"),
            ("cache:h2o:8:recent", "cache options are 'name=value'"),
            ("cache:h2o", "cache_budget must be an int >= 1 for cache_mode='h2o'"),
            ("cache:h2o:8:window=2", "cache_options.window: not an option of"),
            ("streaming:4", r"'streaming:B' with B an int > 4 \(its sinks\)")):
        with pytest.raises(ValueError, match=message):
            apply_method(model, method, train_length=16, eval_length=64)
    fv = flags.FlagValues()
    cache_flags.define_flags(fv)
    fv(["prog", "--cache_budget=64"])
    with pytest.raises(ValueError, match="--cache_budget and --cache_options need "):
        cache_flags.method_part_from_flags(fv)
