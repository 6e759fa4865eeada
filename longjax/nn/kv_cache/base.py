"""The cache-policy interface of the attention mixer, and the registry of policies by name.

A policy decides what an attention layer keeps of the past and which keys each query
reads. The mixer hands it the call's tokens (`NewTokens`) and its cache; the policy
writes what it keeps and returns the `KeyPart`s to read, each read with one softmax and
merged by logsumexp (`longjax.ops.attention.merge_attention`). The mixer encodes the
query, attends each part and merges: it has no branch per policy.

A policy is a frozen dataclass whose fields are attention-mixer options read by name
(`window`, `num_sinks`, `train_length`, ...; a new policy adds its options, such as a
budget, to the mixer's fields and to its own). Shapes are fixed under jit: `init` gives
the cache for `max_length` tokens (a bounded policy ignores it), and `read` keeps that
shape whatever the call's length T, so chunked prefill and one-token decode share it.
Caches are dicts with `"end"`: int32, tokens seen (the slot order of the next token).

Adding a policy: a module here with a `@register_policy(name)` dataclass; `cache_mode=name`
then selects it from configs and scripts. A policy with a budget B keeps `init`'s shape at
B slots and, in `read`, returns the parts over its kept keys and the call's (the budget
holds during chunked prefill as in `window.RollingCache`); padding (segment 0) is never
kept. What the interface does not carry yet, for the query-aware methods: the encoded
query (to rank keys by attention, as H2O, SnapKV and Quest do) and per-head key masks
(SnapKV keeps different tokens per KV head).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

_POLICIES: dict[str, type[CachePolicy]] = {}


@dataclasses.dataclass(frozen=True)
class NewTokens:
    """The call's tokens as a cache stores them: `k`, `v` `[B, T, K, D]` (keys encoded at
    their positions, or raw when the mixer encodes keys at every read), `positions`
    `[B, T]` int32, `segment_ids` `[B, T]` int32 (0 = padding, never stored for reading)."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment_ids: jax.Array


@dataclasses.dataclass(frozen=True)
class KeyPart:
    """Keys read with one softmax. `k`, `v` `[B, S, K, D]` stored like `NewTokens.k`;
    `positions` `[B, S]`: the keys' positions (where raw keys are encoded, and the score
    biases); `segment_ids` `[B, S]` (0 = not read); `q_slots` `[B, T]`, `kv_slots`
    `[B, S]`: the order the causal / `window` / `num_sinks` mask compares;
    `query_positions` `[B, T]`: where the query is encoded for this part (None: its own
    positions); `one_block`: read the S keys as one key block (a decode step over a small
    cache, no padding).

    Without positions, segments and slots the part is the call's own tokens in their
    order (the full forward, which may run sequence-parallel)."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array | None = None
    segment_ids: jax.Array | None = None
    q_slots: jax.Array | None = None
    kv_slots: jax.Array | None = None
    window: int | None = None
    num_sinks: int = 0
    query_positions: jax.Array | None = None
    one_block: bool = False

    @property
    def is_call(self) -> bool:
        """True for the call's own tokens in their order."""
        return self.positions is None


class CachePolicy:
    """What an attention layer keeps and reads; subclasses are frozen dataclasses."""

    name: ClassVar[str]

    def check(self, where: str) -> None:
        """Raises ValueError naming `where.<option>` for options the policy cannot use."""

    def init(self, batch_size: int, max_length: int, kv_shape: tuple[int, int],
             dtype) -> dict:
        """The empty cache of `batch_size` rows; `kv_shape` = (K, D)."""
        raise NotImplementedError

    def read(self, cache: dict | None,
             new: NewTokens) -> tuple[list[KeyPart], dict | None]:
        """`(parts, cache)`: the key parts the call's queries read and the cache with the
        new tokens kept. `cache=None` is the full forward of the call (returns None)."""
        raise NotImplementedError


def register_policy(name: str):
    """Registers a `CachePolicy` dataclass as `cache_mode=name`."""

    def decorate(cls):
        if name in _POLICIES:
            raise ValueError(f"cache policy {name!r} is already registered")
        cls.name = name
        _POLICIES[name] = cls
        return cls

    return decorate


def policy_names() -> tuple[str, ...]:
    return tuple(_POLICIES)


def cache_policy(name: str, options, *, where: str) -> CachePolicy:
    """The policy registered as `name`, its fields read from `options` (an object with
    them as attributes: the attention mixer), checked. `where` names the options in
    errors (`config.model.mixer_options.attention`)."""
    if name not in _POLICIES:
        raise ValueError(f"{where}.cache_mode must be one of {policy_names()}; got {name!r}")
    cls = _POLICIES[name]
    policy = cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls)})
    policy.check(where)
    return policy
