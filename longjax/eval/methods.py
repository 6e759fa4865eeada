"""Training-free context-extension methods, applied when a checkpoint is evaluated.

A method is a string that sets options of the attention mixer
(`config.model.mixer_options.attention`) of every attention layer; none of them adds
parameters, so the trained parameters still load. Parts compose with `+`
(`"yarn:auto+logn"`). With L the training length and n the evaluation length:

- `none`: the checkpoint as trained.
- `linear:S` (Position Interpolation, Chen et al. 2023), `ntk:S` (NTK-aware base change,
  bloc97 2023), `dynamic_ntk:S`, `yarn:S` (Peng et al. 2023), `llama3:S` (Meta 2024): RoPE
  scaling by the factor S (a number > 0, or `auto`: max(1, n / L) at each length).
- `giraffe`: Giraffe's truncated RoPE basis (Pal et al. 2023) with
  `positions.giraffe_params(L, n)`.
- `lm_infinite`: LM-Infinite (Han et al. 2023): 10 sinks, a window of L and no distance
  beyond L; `lm_infinite:B`: a cache budget of B tokens (10 sinks, a window of B - 10).
- `streaming`: StreamingLLM (Xiao et al. 2023): 4 sinks and a window of L - 4, positions
  re-assigned inside the cache; `streaming:B`: a cache budget of B (a window of B - 4).
- `window`: sliding-window attention over the last L tokens.
- `self_extend:G:W`: Self-Extend (Jin et al. 2024): exact RoPE positions within W tokens,
  positions grouped by G beyond.
- `logn`: log-n query scaling beyond L (Chiang & Cholak 2022).
- `cache:NAME[:B][:option=value...]`: the KV-cache policy NAME of `longjax.nn.kv_cache`
  (`h2o`, `snapkv`, `streaming`, ...) with a budget of B tokens per layer and KV head and
  its `cache_options` (`cache:snapkv:64:window=16:kernel_size=5`); what the scripts'
  `--cache_policy`, `--cache_budget`, `--cache_options` add to every method
  (`cache_method`; `--cache_policy=streaming` and `lm_infinite` give the methods above,
  with their papers' sinks). Text and teacher-forced rows are then scored through the cache
  (`reads_through_cache`), since the selection policies' full forward is full attention.

Mamba methods set options of the Mamba mixers (`config.model.mixer_options.mamba` and
`.mamba2`, see `longjax.nn.ssm.MambaMixer` and `Mamba2Mixer`) of every such layer:

- Stuffed Mamba's training-free mitigations of state collapse (Chen et al. 2024, arXiv
  2410.07145v1), on `mamba` and `mamba2` layers alike:
  `delta_scale:S`: the step size times S, decay and input both (Mamba: delta `[B, T, E]`
  per channel; Mamba-2: dt `[B, T, H]` per head, after the softplus and dt_bias);
  `decay_scale:S`: A times S, the decay exp(dt A) alone, S > 1 forgets more (Mamba: A
  `[E, N]`; Mamba-2: each head's scalar A `[H]`);
  `input_scale:S`: B times S, the write alone, S < 1 remembers less (Mamba: B `[B, T, N]`;
  Mamba-2: B `[B, T, G, N]` of every group; C unchanged); the recurrence being linear,
  without `state_norm` this is exactly the SSM's read `C h` times S against the `D` skip;
  `state_norm:C`: after every update each channel's state `[N]` (Mamba: one of E
  channels; Mamba-2: the row of one head's state `[P, N]` at one p) scaled down to L2
  norm C where larger, a token-by-token scan.
- `decimation:I:K` (DeciMamba, Ben-Kish et al. 2024): Mamba layer I (from 0) keeps the
  K tokens with the largest step sizes (`auto`: L - 8) and the last 8, and the layers
  after it see only those (`config.model.decimation`); repeat it with `+` for several
  layers. The last `DECIMATION_KEEP_LAST` tokens are always kept so the passkey's answer
  positions are scored; dropped positions score as uniform predictions, so under
  decimation read the passkey, RULER and task rows, not the text metrics.
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

from longjax.nn import kv_cache, registry
from longjax.nn.attention import ROTARY
from longjax.nn.pattern import layer_mixers
from longjax.ops import positions

# The scalings set by a factor alone (LongRoPE needs per-pair factors from a search; the
# truncated basis is the `giraffe` method).
ROPE_SCALINGS = tuple(s for s in positions.ROPE_SCALINGS
                      if s not in ("none", "longrope", "truncated"))
MAMBA_SCALES = ("delta_scale", "decay_scale", "input_scale")
ALLOWED = ("none", *(f"{s}:S" for s in ROPE_SCALINGS), "giraffe", "lm_infinite[:B]",
           "streaming[:B]", "window", "self_extend:G:W", "logn", "cache:NAME[:B][:option=value...]",
           *(f"{s}:S" for s in MAMBA_SCALES), "state_norm:C", "decimation:I:K")
MAMBA_METHODS = (*MAMBA_SCALES, "state_norm", "decimation")
# The mixers Stuffed Mamba's scalings and state normalization reach (decimation: mamba).
STUFFED_MAMBA_MIXERS = ("mamba", "mamba2")
DECIMATION_KEEP_LAST = 8
LM_INFINITE_SINKS = 10
STREAMING_SINKS = 4
SINKS = {"streaming": STREAMING_SINKS, "lm_infinite": LM_INFINITE_SINKS}
_OPTIONS = "config.model.mixer_options.attention"


def parse_method(method: str) -> list[tuple[str, tuple[str, ...]]]:
    """`"yarn:auto+logn"` -> `[("yarn", ("auto",)), ("logn", ())]`, each part checked
    (name, argument count, factor > 0, positive ints); ValueError otherwise."""
    parts = []
    for part in method.split("+"):
        name, *args = part.strip().split(":")
        if name in ROPE_SCALINGS:
            if len(args) != 1:
                raise ValueError(f"method {method!r}: {name!r} takes one scaling factor, "
                                 f"'{name}:S' with S a number > 0 or 'auto'")
            if args[0] != "auto":
                _factor(method, args[0])
        elif name == "self_extend":
            if len(args) != 2 or not all(a.isdigit() and int(a) > 0 for a in args):
                raise ValueError(f"method {method!r}: self_extend takes a group size and a "
                                 f"neighbour window, 'self_extend:G:W' with positive ints")
        elif name == "cache":
            _cache_options(method, args)
        elif name in SINKS:
            if len(args) > 1 or args and not (args[0].isdigit()
                                              and int(args[0]) > SINKS[name]):
                raise ValueError(f"method {method!r}: {name} takes an optional cache budget, "
                                 f"'{name}:B' with B an int > {SINKS[name]} (its sinks)")
        elif name in (*MAMBA_SCALES, "state_norm"):
            if len(args) != 1:
                raise ValueError(f"method {method!r}: {name!r} takes one number > 0, "
                                 f"'{name}:S'")
            _factor(method, args[0])
        elif name == "decimation":
            if (len(args) != 2 or not args[0].isdigit()
                    or not (args[1] == "auto" or args[1].isdigit() and int(args[1]) > 0)):
                raise ValueError(f"method {method!r}: decimation takes a Mamba layer index "
                                 f"and the tokens it keeps, 'decimation:I:K' with I an int "
                                 f">= 0 and K a positive int or 'auto'")
        elif name in ALLOWED:
            if args:
                raise ValueError(f"method {method!r}: {name!r} takes no arguments")
        else:
            raise ValueError(f"unknown method {part.strip()!r} in {method!r}; allowed: "
                             f"{list(ALLOWED)}, joined by '+'")
        parts.append((name, tuple(args)))
    return parts


def _cache_options(method: str, args) -> dict[str, Any]:
    """The attention options of a `cache:NAME[:B][:option=value...]` part's arguments;
    ValueError naming the method for an unknown policy, a bad budget or option."""
    if not args or args[0] not in kv_cache.policy_names():
        raise ValueError(f"method {method!r}: cache takes a policy name, "
                         f"'cache:NAME[:B][:option=value...]' with NAME in "
                         f"{list(kv_cache.policy_names())}")
    name, *rest = args
    budget = None
    if rest and "=" not in rest[0]:
        if not (rest[0].isdigit() and int(rest[0]) > 0):
            raise ValueError(f"method {method!r}: the cache budget must be a positive int; "
                             f"got {rest[0]!r}")
        budget, rest = int(rest[0]), rest[1:]
    options = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if not (sep and key and value):
            raise ValueError(f"method {method!r}: cache options are 'name=value'; got "
                             f"{item!r}")
        options[key] = _option_value(value)
    return {"cache_mode": name, "cache_budget": budget,
            "cache_options": kv_cache.canonical_options(options, where=f"method {method!r}")}


def _option_value(text: str):
    """An option value from text: an int, else a float, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def cache_method(policy: str, budget: int | None = None, options=()) -> str:
    """The method part `cache:policy[:budget][:name=value...]` from the scripts' flags
    (`options`: "name=value" strings), checked; StreamingLLM and LM-Infinite without
    options are their methods `streaming[:budget]`, `lm_infinite[:budget]` (the papers'
    sinks)."""
    budget_args = [] if budget is None else [str(budget)]
    if policy in SINKS and not options:
        part = ":".join([policy, *budget_args])
        parse_method(part)
        return part
    part = ":".join(["cache", policy, *budget_args, *options])
    parse_method(part)
    return part


def apply_cache_method(model_config, part: str) -> ml_collections.FrozenConfigDict:
    """`model_config` with the cache policy of a `cache:` method part (`cache_method`)
    alone, which reads no length (scripts/generate.py)."""
    if not reads_through_cache(part) or len(parse_method(part)) != 1:
        raise ValueError(f"{part!r} is not a single 'cache:...' method part")
    return apply_method(model_config, part, train_length=1, eval_length=1)


def reads_through_cache(method: str) -> bool:
    """True when `method` sets a cache policy (a `cache:` part)."""
    return any(name == "cache" for name, _ in parse_method(method))


def _factor(method: str, text: str) -> float:
    try:
        factor = float(text)
    except ValueError:
        factor = float("nan")
    if not factor > 0:
        raise ValueError(f"method {method!r}: the factor must be a number > 0 (or 'auto' "
                         f"for a RoPE scaling); got {text!r}")
    return factor


def method_overrides(method: str, *, train_length: int, eval_length: int) -> dict[str, Any]:
    """The attention options `method` sets for a model trained at `train_length` and
    evaluated at `eval_length`; ValueError for a bad method, a length < 1, or two parts
    that set one option differently."""
    if eval_length < 1 or train_length < 1:
        raise ValueError(f"method {method!r}: lengths must be >= 1; got evaluation length "
                         f"{eval_length} and training length {train_length}")
    L = train_length
    overrides: dict[str, Any] = {}
    for name, args in parse_method(method):
        if name in ROPE_SCALINGS:
            factor = (max(1.0, eval_length / L) if args[0] == "auto"
                      else _factor(method, args[0]))
            part = {"rope_scaling": name, "rope_scaling_factor": factor, "train_length": L}
        elif name == "giraffe":
            part = {"rope_scaling": "truncated", "rope_scaling_factor": 1.0, "train_length": L,
                    "rope_scaling_params": positions.canonical_rope_params(
                        positions.giraffe_params(L, max(L, eval_length)))}
        elif name == "lm_infinite":
            window = int(args[0]) - LM_INFINITE_SINKS if args else L
            part = {"cache_mode": "lm_infinite", "num_sinks": LM_INFINITE_SINKS,
                    "window": window, "train_length": L}
        elif name == "streaming" and args:
            part = {"cache_mode": "streaming", "num_sinks": STREAMING_SINKS,
                    "window": int(args[0]) - STREAMING_SINKS}
        elif name == "streaming":
            if L <= STREAMING_SINKS:
                raise ValueError(f"method {method!r}: streaming keeps {STREAMING_SINKS} sinks "
                                 f"and a window of L - {STREAMING_SINKS}; the training length "
                                 f"L={L} is too short")
            part = {"cache_mode": "streaming", "num_sinks": STREAMING_SINKS,
                    "window": L - STREAMING_SINKS}
        elif name == "window":
            part = {"window": L}
        elif name == "self_extend":
            part = {"self_extend_group": int(args[0]), "self_extend_window": int(args[1])}
        elif name == "logn":
            part = {"logn_scaling": True, "train_length": L}
        elif name == "cache":
            part = _cache_options(method, args)
        else:  # none, and the Mamba methods (`mamba_overrides`)
            part = {}
        for key, value in part.items():
            if overrides.get(key, value) != value:
                raise ValueError(f"method {method!r} sets {_OPTIONS}.{key} twice: "
                                 f"{overrides[key]!r} and {value!r}")
            overrides[key] = value
    return overrides


def mamba_overrides(method: str, *, train_length: int) -> tuple[dict[str, float], tuple]:
    """The Mamba mixer options `method` sets, and its `config.model.decimation`
    `((layer, K, R), ...)`; ValueError for a bad method, an option set twice, or an `auto`
    decimation at a training length of at most `DECIMATION_KEEP_LAST` tokens."""
    options: dict[str, float] = {}
    decimation = {}
    for name, args in parse_method(method):
        if name in (*MAMBA_SCALES, "state_norm"):
            value = _factor(method, args[0])
            if options.get(name, value) != value:
                raise ValueError(f"method {method!r} sets {name} twice")
            options[name] = value
        elif name == "decimation":
            keep = train_length - DECIMATION_KEEP_LAST if args[1] == "auto" else int(args[1])
            if keep < 1:
                raise ValueError(f"method {method!r}: decimation:I:auto keeps the training "
                                 f"length L={train_length} less the last "
                                 f"{DECIMATION_KEEP_LAST} tokens; L is too short")
            if decimation.setdefault(int(args[0]), keep) != keep:
                raise ValueError(f"method {method!r} decimates layer {args[0]} twice")
    return options, tuple((layer, keep, DECIMATION_KEEP_LAST)
                          for layer, keep in sorted(decimation.items()))


def apply_method(model_config, method: str, *, train_length: int,
                 eval_length: int) -> ml_collections.FrozenConfigDict:
    """`model_config` (a checkpoint's `config.model`) with `method`'s attention options.

    ValueError naming the method when it cannot apply: the model has no attention layer,
    a RoPE scaling meets attention without rotary positions (Self-Extend: without RoPE),
    or the attention mixer does not know an option.
    """
    overrides = method_overrides(method, train_length=train_length, eval_length=eval_length)
    # A deep copy: as_configdict() is the frozen dict's own ConfigDict, which may share
    # nested dicts with `model_config`.
    config = copy.deepcopy(ml_collections.FrozenConfigDict(model_config).as_configdict())
    _apply_mamba(config, method, train_length)
    if not overrides:
        return ml_collections.FrozenConfigDict(config)
    if "attention" not in layer_mixers(config.mixer, config.num_layers):
        raise ValueError(f"method {method!r} changes attention, but the model has no attention "
                         f"layer (config.model.mixer={config.mixer!r})")
    options = registry.mixer_options("attention", config)
    position = options.get("position", "rope")
    for name, _ in parse_method(method):
        allowed = (ROTARY if name in (*ROPE_SCALINGS, "giraffe")
                   else ("rope",) if name == "self_extend" else ())
        if allowed and (position not in allowed or options["rope_fraction"] <= 0):
            raise ValueError(f"method {method!r}: {name} rescales RoPE positions, but the "
                             f"checkpoint's attention has {_OPTIONS}.position={position!r} "
                             f"and rope_fraction={options['rope_fraction']!r}; it needs "
                             f"position in {list(allowed)} with rope_fraction > 0")
    for key, value in overrides.items():
        config.mixer_options.attention[key] = value
    try:
        registry.mixer_options("attention", config)
        if reads_through_cache(method):  # the policy checks its budget and options
            registry.build_mixer("attention", config, parent=None).init_cache(1, 1)
    except ValueError as e:
        raise ValueError(f"method {method!r}: {e}") from e
    return ml_collections.FrozenConfigDict(config)


def _apply_mamba(config, method: str, train_length: int) -> None:
    """Sets `method`'s Mamba options (on every `mamba` and `mamba2` layer) and decimation
    (`mamba` layers only) in `config` (a model ConfigDict); ValueError naming the method
    when the model has no such layer, a decimated layer is not a `mamba` one, or the mixer
    does not take an option."""
    options, decimation = mamba_overrides(method, train_length=train_length)
    if not (options or decimation):
        return
    mixers = layer_mixers(config.mixer, config.num_layers)
    targets = [m for m in STUFFED_MAMBA_MIXERS if m in mixers]
    if options and not targets:
        raise ValueError(f"method {method!r} changes Mamba, but the model has no mamba or "
                         f"mamba2 layer (config.model.mixer={config.mixer!r})")
    for layer, _, _ in decimation:
        if layer >= len(mixers) or mixers[layer] != "mamba":
            raise ValueError(f"method {method!r}: decimation needs a mamba layer; layer "
                             f"{layer} of {list(mixers)} is not one")
    for mixer in targets if options else ():
        if mixer not in config.mixer_options:
            config.mixer_options[mixer] = {}
        config.mixer_options[mixer].update(options)
        try:
            registry.mixer_options(mixer, config)
        except ValueError as e:
            raise ValueError(f"method {method!r}: {e}") from e
    if decimation:
        config.decimation = decimation
