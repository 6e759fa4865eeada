"""The scripts' KV-cache policy flags: `--cache_policy=NAME --cache_budget=B
--cache_options=name=value,...` (`longjax.nn.kv_cache`), read as the method part
`cache:NAME:B:name=value...` of `longjax.eval.methods`."""

from __future__ import annotations

from absl import flags

from longjax.eval.methods import cache_method
from longjax.nn import kv_cache


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """`--cache_policy`, `--cache_budget`, `--cache_options` for a script's `main`."""
    flags.DEFINE_string("cache_policy", None, "KV-cache policy of the attention layers, one "
                        f"of {list(kv_cache.policy_names())} (default: the checkpoint's).",
                        flag_values=flag_values)
    flags.DEFINE_integer("cache_budget", None, "Tokens the --cache_policy keeps per layer "
                         "and KV head.", flag_values=flag_values)
    flags.DEFINE_list("cache_options", [], "The --cache_policy's options, name=value,... "
                      "(e.g. window=16,kernel_size=5 for snapkv, recent_ratio=0.5 for h2o).",
                      flag_values=flag_values)


def method_part_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> str | None:
    """The `cache:...` method part of the flags (None without --cache_policy); ValueError
    naming the flag for a budget or options without a policy, or a bad policy."""
    f = flag_values
    if f.cache_policy is None:
        if f.cache_budget is not None or f.cache_options:
            raise ValueError("--cache_budget and --cache_options need --cache_policy")
        return None
    try:
        return cache_method(f.cache_policy, f.cache_budget, f.cache_options)
    except ValueError as e:
        raise ValueError(f"--cache_policy={f.cache_policy} --cache_budget={f.cache_budget} "
                         f"--cache_options={','.join(f.cache_options)}: {e}") from e
