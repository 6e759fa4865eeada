"""KV-cache policies of the attention mixer (`cache_mode`), chosen by name: `"full"`,
`"rolling"`, `"streaming"`, `"lm_infinite"`, `"h2o"`, `"snapkv"`, `"quest"`, `"infllm"`,
`"squeezed"`. The interface is in `base`, the per-head budgeted cache of the selection
policies in `selection`, the cache that keeps every token and reads a subset per query
(Quest, InfLLM, Squeezed Attention) in `stored`; each policy module registers its
policies on import."""

from longjax.nn.kv_cache import (  # noqa: F401  (registers them)
    full,
    h2o,
    infllm,
    quest,
    snapkv,
    squeezed,
    window,
)
from longjax.nn.kv_cache.base import (
    CachePolicy,
    KeyPart,
    NewTokens,
    cache_policy,
    canonical_options,
    policy_names,
    register_policy,
)

__all__ = ["CachePolicy", "KeyPart", "NewTokens", "cache_policy", "canonical_options",
           "policy_names", "register_policy"]
