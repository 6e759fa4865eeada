"""KV-cache policies of the attention mixer (`cache_mode`), chosen by name: `"full"`,
`"rolling"`, `"streaming"`, `"lm_infinite"`, `"h2o"`, `"snapkv"`. The interface is in
`base`, the per-head budgeted cache of the selection policies in `selection`; each policy
module registers its policies on import."""

from longjax.nn.kv_cache import full, h2o, snapkv, window  # noqa: F401  (registers them)
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
