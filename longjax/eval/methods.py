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
  beyond L.
- `streaming`: StreamingLLM (Xiao et al. 2023): 4 sinks and a window of L - 4, positions
  re-assigned inside the cache.
- `window`: sliding-window attention over the last L tokens.
- `self_extend:G:W`: Self-Extend (Jin et al. 2024): exact RoPE positions within W tokens,
  positions grouped by G beyond.
- `logn`: log-n query scaling beyond L (Chiang & Cholak 2022).
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

from longjax.nn import registry
from longjax.nn.attention import ROTARY
from longjax.nn.pattern import layer_mixers
from longjax.ops import positions

# The scalings set by a factor alone (LongRoPE needs per-pair factors from a search; the
# truncated basis is the `giraffe` method).
ROPE_SCALINGS = tuple(s for s in positions.ROPE_SCALINGS
                      if s not in ("none", "longrope", "truncated"))
ALLOWED = ("none", *(f"{s}:S" for s in ROPE_SCALINGS), "giraffe", "lm_infinite", "streaming",
           "window", "self_extend:G:W", "logn")
LM_INFINITE_SINKS = 10
STREAMING_SINKS = 4
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
        elif name in ALLOWED:
            if args:
                raise ValueError(f"method {method!r}: {name!r} takes no arguments")
        else:
            raise ValueError(f"unknown method {part.strip()!r} in {method!r}; allowed: "
                             f"{list(ALLOWED)}, joined by '+'")
        parts.append((name, tuple(args)))
    return parts


def _factor(method: str, text: str) -> float:
    try:
        factor = float(text)
    except ValueError:
        factor = float("nan")
    if not factor > 0:
        raise ValueError(f"method {method!r}: the scaling factor must be a number > 0 or "
                         f"'auto'; got {text!r}")
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
            part = {"cache_mode": "lm_infinite", "num_sinks": LM_INFINITE_SINKS, "window": L,
                    "train_length": L}
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
        else:  # none
            part = {}
        for key, value in part.items():
            if overrides.get(key, value) != value:
                raise ValueError(f"method {method!r} sets {_OPTIONS}.{key} twice: "
                                 f"{overrides[key]!r} and {value!r}")
            overrides[key] = value
    return overrides


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
    except ValueError as e:
        raise ValueError(f"method {method!r}: {e}") from e
    return ml_collections.FrozenConfigDict(config)
