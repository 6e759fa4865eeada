"""The cache-policy interface of the attention mixer, and the registry of policies by name.

A policy decides what an attention layer keeps of the past and which keys each query
reads. The mixer hands it the call's tokens (`NewTokens`: keys, values, positions,
segments and the encoded queries) and its cache; the policy writes what it keeps and
returns the `KeyPart`s to read, each read with one softmax and merged by logsumexp
(`longjax.ops.attention.merge_attention`). The mixer attends each part and merges: it has
no branch per policy.

Options. A policy is a frozen dataclass whose fields are attention-mixer options read by
name (`window`, `num_sinks`, `train_length`, `softcap`, `scale`, ...). Two mixer options
serve every budgeted policy, declared once on the mixer
(`config.model.mixer_options.attention`):

- `cache_budget` (int or None): the tokens a layer keeps per KV head, past and present;
  a policy that takes it has a `cache_budget` field (the rolling family reads it as
  `num_sinks + window`);
- `cache_options`: the policy's own options as sorted `(name, value)` pairs (a mapping in
  a config, `name=value,...` on the command line); a policy declares the names it takes
  and their defaults in `option_defaults`, reads them with `option(name)` and checks the
  values in `check`, raising ValueError naming
  `config.model.mixer_options.attention.cache_options.<name>` and what is allowed. The
  registry (`cache_policy`) refuses a budget for a policy without one and an option name
  the policy does not declare.

Shapes are fixed under jit: `init` gives the cache for `max_length` tokens (a bounded
policy ignores it and holds `cache_budget` slots), and `read` keeps that shape whatever
the call's length T, so chunked prefill and one-token decode share it; the budget holds
during chunked prefill (a call reads its kept keys and its own T tokens, then keeps at
most the budget). Caches are dicts with `"end"`: int32, tokens seen. Padding (segment 0)
is never kept, so left-padded rows keep only their real tokens.

Query-aware policies (`query_aware = True`: H2O, SnapKV, Quest, ...) rank keys by the
call's queries `NewTokens.q` `[B, T, H, D]`, encoded at their positions as the stored
keys are (RoPE, log-n scale), so `q . k` is the attention score; the attention
probabilities of the mixer's math are `longjax.ops.attention.attention_weights` (with the
policy's `softcap` and `scale` fields). The mixer refuses them (ValueError naming
`cache_mode`) where keys are stored raw and encoded at read, or where scores carry a
bias the policy does not see (xpos, alibi, t5, kerple, fire, dynamic_ntk, longrope,
Self-Extend); `NewTokens.q` is None there.

Per-head kept sets: a `KeyPart`'s `positions`, `segment_ids` and `kv_slots` may be
`[B, S, K]`, one set of tokens per KV head in the same slots (`k`, `v` `[B, S, K, D]`
hold head k's token in `[:, s, k]`); `dot_product_attention` masks each KV head by its
own and applies it to its G query heads (GQA).

Adding a policy: a module here with a `@register_policy(name)` dataclass; `cache_mode=name`
then selects it from configs and scripts (`--cache_policy=NAME --cache_budget=B
--cache_options=name=value,...`). Its tests: budget >= context equals full attention, and
the kept set matches a dense numpy definition of the method (in `tests/`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

_POLICIES: dict[str, type[CachePolicy]] = {}


@dataclasses.dataclass(frozen=True)
class NewTokens:
    """The call's tokens as a cache stores them: `k`, `v` `[B, T, K, D]` (keys encoded at
    their positions, or raw when the mixer encodes keys at every read), `positions`
    `[B, T]` int32, `segment_ids` `[B, T]` int32 (0 = padding, never stored for reading),
    and `q` `[B, T, H, D]`: the queries encoded at their positions like the keys (None
    when keys are stored raw)."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    q: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class KeyPart:
    """Keys read with one softmax. `k`, `v` `[B, S, K, D]` stored like `NewTokens.k`;
    `positions` `[B, S]`: the keys' positions (where raw keys are encoded, and the score
    biases); `segment_ids` `[B, S]` (0 = not read); `q_slots` `[B, T]`, `kv_slots`
    `[B, S]`: the order the causal / `window` / `num_sinks` mask compares (`positions`,
    `segment_ids`, `kv_slots` may be `[B, S, K]`: per KV head, see the module doc);
    `query_positions` `[B, T]`: where the query is encoded for this part (None: its own
    positions); `one_block`: read the S keys as one key block (a decode step over a small
    cache, no padding); `keep` `[B, T or 1, K or 1, S]` bool: the keys each query reads
    per KV head (None: all; a query-aware policy that selects per query, such as Quest),
    applied on top of the other masks.

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
    keep: jax.Array | None = None

    @property
    def is_call(self) -> bool:
        """True for the call's own tokens in their order."""
        return self.positions is None

    def keep_bias(self, num_heads: int) -> jax.Array:
        """`keep` as an additive score bias `[B, H or 1, T or 1, S]` fp32 (0 read, -inf
        not), a KV head's entry repeated for its query heads."""
        keep = self.keep
        if keep.shape[2] > 1:
            keep = jnp.repeat(keep, num_heads // keep.shape[2], axis=2)
        return jnp.where(jnp.moveaxis(keep, 2, 1), 0.0, -jnp.inf)


class CachePolicy:
    """What an attention layer keeps and reads; subclasses are frozen dataclasses."""

    name: ClassVar[str]
    query_aware: ClassVar[bool] = False  # reads NewTokens.q
    option_defaults: ClassVar[Mapping[str, Any]] = {}  # its cache_options: name -> default

    def option(self, name: str):
        """The value of cache option `name` (given, or its default)."""
        return dict(getattr(self, "cache_options", ())).get(name, self.option_defaults[name])

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
    fields = {f.name for f in dataclasses.fields(cls)}
    budget = getattr(options, "cache_budget", None)
    if budget is not None and "cache_budget" not in fields:
        takes = [n for n, c in _POLICIES.items()
                 if "cache_budget" in {f.name for f in dataclasses.fields(c)}]
        raise ValueError(f"{where}.cache_budget={budget!r}: cache_mode={name!r} keeps no "
                         f"budget; policies with one: {takes}")
    for option, _ in getattr(options, "cache_options", ()):
        if option not in cls.option_defaults:
            raise ValueError(f"{where}.cache_options.{option}: not an option of "
                             f"cache_mode={name!r}; allowed: {sorted(cls.option_defaults)}")
    policy = cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls)})
    policy.check(where)
    return policy


def canonical_options(options, *, where: str) -> tuple:
    """`cache_options` (a mapping, ConfigDict, `(name, value)` pairs or None) as sorted
    pairs: hashable, for a module field."""
    if options is None:
        return ()
    pairs = options.items() if hasattr(options, "items") else options
    try:
        return tuple(sorted((str(name), value) for name, value in pairs))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} must be a mapping or (name, value) pairs; got "
                         f"{options!r}") from e


def positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_budget(policy, where: str, *, at_least: int = 1) -> None:
    """Raises ValueError naming `where.cache_budget` unless it is an int >= `at_least`."""
    budget = policy.cache_budget
    if not (positive_int(budget) and budget >= at_least):
        raise ValueError(f"{where}.cache_budget must be an int >= {at_least} for "
                         f"cache_mode={policy.name!r}; got {budget!r}")
