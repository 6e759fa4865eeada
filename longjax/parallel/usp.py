"""USP: Ulysses inside groups of devices, ring attention across the groups.

Fang & Zhao 2024, "USP: A Unified Sequence Parallelism Approach for Long Context
Generative AI". The P devices of the sequence axis form R = P / U groups of U consecutive
devices (U is the Ulysses degree), each group one ring shard. Tokens are laid out over
the R ring shards (`layout`), each ring shard's tokens split contiguously over its U
devices. One all-to-all inside each group gives every device all `U T` tokens of its ring
shard for `H / U` heads; ring attention across the R groups runs on those; a second
all-to-all returns the output to sequence shards. Heads need only divide by U (Ulysses
alone needs `H % P == 0`), and the ring takes R steps instead of P.
"""

from __future__ import annotations

from longjax.parallel.ring_attention import ring_attention
from longjax.parallel.ulysses import group_all_gather, to_head_shards, to_sequence_shards


def usp_attention(
    q, k, v, *, axis_name, ulysses_degree, causal=False, segment_ids=None, layout="zigzag",
    window=None, num_sinks=0, softcap=None, scale=None, block_size=None, impl="auto",
):
    """Attention of the local tokens, head-parallel inside groups of `ulysses_degree` = U
    consecutive devices of `axis_name` and ring-parallel across the `P / U` groups; call in
    `jax.shard_map(..., check_vma=False)`.

    q `[B, T, H, D]`, k, v `[B, T, K, D]` and `segment_ids` `[B, T]` are this device's `T`
    tokens: group r holds ring shard r of `layout` over `P / U` shards, split contiguously
    over its U devices (`longjax.parallel.layouts.shard_to_layout` with
    `ring_size=P / U`). `H % U == 0`; K/V heads are repeated when `K % U`.
    Returns `[B, T, H, D]`.
    """
    q, k, v = to_head_shards(q, k, v, axis_name, ulysses_degree)
    if segment_ids is not None:
        segment_ids = group_all_gather(segment_ids, axis_name, ulysses_degree, 1)
    out = ring_attention(q, k, v, axis_name=axis_name, causal=causal, segment_ids=segment_ids,
                         layout=layout, window=window, num_sinks=num_sinks, softcap=softcap,
                         scale=scale, block_size=block_size, impl=impl,
                         group_size=ulysses_degree)
    return to_sequence_shards(out, axis_name, ulysses_degree)
