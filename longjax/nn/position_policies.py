"""Position policies of the attention mixer: where the query and the keys of a `KeyPart`
are encoded. A policy maps one key part to the parts it is read as (merged by
logsumexp): the plain policy leaves it, Self-Extend splits it.

Self-Extend (Jin et al. 2024, "LLM Maybe LongLM"; `self_extend_group` G > 0,
`self_extend_window` N): keys within N tokens use RoPE as trained; farther keys use
grouped positions floor(s / G) against the query's floor(t / G) + N - floor(N / G); both
parts are merged by logsumexp, a single softmax over all keys. Keys are encoded when read
(two encodings of one key).
"""

from __future__ import annotations

import dataclasses

from longjax.nn.kv_cache import KeyPart, NewTokens
from longjax.nn.kv_cache.base import positive_int


@dataclasses.dataclass(frozen=True)
class PlainPositions:
    """Every key and query at its own position."""

    encodes_at_read = False

    def split(self, part: KeyPart, new: NewTokens) -> list[KeyPart]:
        return [part]


@dataclasses.dataclass(frozen=True)
class SelfExtend:
    """The neighbour part (distance < N, trained positions) and the grouped part (distance
    >= N, positions // G, the query shifted by N - N // G)."""

    group: int
    window: int
    encodes_at_read = True

    def split(self, part: KeyPart, new: NewTokens) -> list[KeyPart]:
        G, N = self.group, self.window
        kv_pos = new.positions if part.positions is None else part.positions
        q_slots = new.positions if part.q_slots is None else part.q_slots
        common = dict(
            segment_ids=new.segment_ids if part.segment_ids is None else part.segment_ids,
            kv_slots=kv_pos if part.kv_slots is None else part.kv_slots)
        near = dataclasses.replace(part, positions=kv_pos, q_slots=q_slots, window=N, **common)
        far = dataclasses.replace(part, positions=kv_pos // G, q_slots=q_slots - N,
                                  query_positions=new.positions // G + N - N // G, **common)
        return [near, far]


def position_policy(options, *, where: str):
    """The position policy of the attention options (`self_extend_group`,
    `self_extend_window`, read as attributes), checked: Self-Extend needs RoPE, the full
    cache and no window or sinks (its neighbour part is its window)."""
    G, N = options.self_extend_group, options.self_extend_window
    position, cache_mode = options.position, options.cache_mode
    if not G:
        return PlainPositions()
    if not (positive_int(G) and positive_int(N)) or position != "rope":
        raise ValueError(
            f"{where}.self_extend_group={G!r} needs a positive int group, a positive int "
            f"self_extend_window (got {N!r}) and position='rope' (got {position!r})")
    if cache_mode != "full" or options.window is not None or options.num_sinks:
        raise ValueError(f"{where}.self_extend_group works with cache_mode='full' and no "
                         f"window or sinks; got cache_mode={cache_mode!r}, "
                         f"window={options.window!r}, num_sinks={options.num_sinks!r}")
    return SelfExtend(G, N)
