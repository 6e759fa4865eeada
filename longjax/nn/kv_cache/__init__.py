"""KV-cache policies of the attention mixer (`cache_mode`), chosen by name: `"full"`,
`"rolling"`, `"streaming"`, `"lm_infinite"`, `"quest"`, `"infllm"`, `"squeezed"`. The
interface is in `base`, the per-head budgeted cache of the selection policies in
`selection`, the cache that keeps every token and reads a subset per query (Quest, InfLLM,
Squeezed Attention) in `stored`; each policy module registers its policies on import."""

# Importing the policy modules registers the policies.
from longjax.nn.kv_cache import full, infllm, quest, squeezed, window  # noqa: F401
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
