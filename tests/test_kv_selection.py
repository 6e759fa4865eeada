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


def test_budget_and_options_are_checked_by_the_registry():
    """`cache_budget` sizes the rolling family (num_sinks + window); a budget for a policy
    without one, or an option a policy does not declare, is a ValueError naming it."""
    policy, _ = _mixer(cache_mode="streaming", num_sinks=2, cache_budget=6)._policies()
    assert policy.ring == 4
    where = "config.model.mixer_options.attention"
    for options, message in (
            (dict(cache_mode="full", cache_budget=8), f"{where}.cache_budget=8: cache_mode"),
            (dict(cache_mode="rolling", window=4, cache_budget=8), r"must be num_sinks \+ window"),
            (dict(cache_mode="rolling", cache_budget=2, num_sinks=2), "needs a positive int"),
            (dict(cache_mode="rolling", window=4, cache_options=(("recent_ratio", 1),)),
             f"{where}.cache_options.recent_ratio: not an option")):
        with pytest.raises(ValueError, match=message):
            _mixer(**options)._policies()
