"""The registry of sequence mixers: the LM builds each layer's mixer by name.

A mixer is a `flax.linen.Module` with

    __call__(x, *, segment_ids=None, positions=None, cache=None) -> (y, cache)
    init_cache(batch_size, max_length, dtype) -> cache pytree   (touches no parameters)

x and y are `[B, T, d_model]`; `segment_ids` `[B, T]` (0 = padding) reset every state at
document borders; `positions` `[B, T]` are the in-document positions. Given a cache, the
call continues from it and returns the updated one, so one call of T tokens and T calls of
one token agree.

Register a mixer with the module it builds: its options and their defaults are that
module's dataclass fields with a default, declared once, so a config and a direct module
call agree. Users override them per mixer in `config.model.mixer_options.<name>`:

    @register_mixer("attention", module=AttentionMixer)
    def build_attention(model_config, options, **module_kwargs):
        # options: defaults + user overrides; module_kwargs: name=... from the caller
        return AttentionMixer(..., **options, **module_kwargs)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn

MixerFactory = Callable[..., nn.Module]

_FACTORIES: dict[str, MixerFactory] = {}
_DEFAULTS: dict[str, dict[str, Any]] = {}


# Fields every factory sets from the model config (or Flax sets), never mixer options.
_NOT_OPTIONS = ("parent", "name", "dtype")


def register_mixer(name: str, *, module: type[nn.Module], only: Sequence[str] | None = None,
                   from_model: Sequence[str] = (), extra: Mapping[str, Any] | None = None):
    """Registers `factory(model_config, options, **module_kwargs) -> Module` as `name`.

    The options are `module`'s fields with a default, at that default: those in `only`
    when given, less the fields set from the model config by the factory or the LM
    (`from_model`, and dtype); `extra`: the factory's own options (name -> default), no
    module field.
    """
    fields = {f.name: f.default for f in dataclasses.fields(module)
              if f.default is not dataclasses.MISSING
              and f.name not in (*_NOT_OPTIONS, *from_model)}
    unknown = set(only or ()) - set(fields)
    if unknown:
        raise ValueError(f"mixer {name!r}: {sorted(unknown)} are not fields with a default "
                         f"of {module.__name__}")
    defaults = {k: v for k, v in fields.items() if only is None or k in only}

    def decorate(factory: MixerFactory) -> MixerFactory:
        if name in _FACTORIES:
            raise ValueError(f"mixer {name!r} is already registered")
        _FACTORIES[name] = factory
        _DEFAULTS[name] = {**defaults, **(extra or {})}
        return factory

    return decorate


def mixer_names() -> tuple[str, ...]:
    return tuple(sorted(_FACTORIES))


def mixer_defaults(name: str) -> dict[str, Any]:
    _check_known(name)
    return dict(_DEFAULTS[name])


def mixer_options(name: str, model_config) -> dict[str, Any]:
    """The defaults of mixer `name` updated by `model_config.mixer_options[name]`."""
    _check_known(name)
    options = dict(_DEFAULTS[name])
    overrides = model_config.get("mixer_options", {}).get(name, {})
    for key, value in dict(overrides).items():
        if key not in options:
            raise ValueError(
                f"config.model.mixer_options.{name}.{key} is not an option of mixer {name!r}; "
                f"allowed: {sorted(options)}"
            )
        options[key] = value
    return options


def build_mixer(mixer: str, model_config, **module_kwargs) -> nn.Module:
    """Builds the mixer registered as `mixer` for this model config."""
    options = mixer_options(mixer, model_config)  # checks the name first
    return _FACTORIES[mixer](model_config, options, **module_kwargs)


def _check_known(name: str) -> None:
    if name not in _FACTORIES:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {list(mixer_names())}")
