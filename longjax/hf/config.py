"""Hugging Face `config.json` <-> longjax `config.model`, one family at a time.

`model_config(hf)` maps the fields of a supported architecture to longjax's model fields
and mixer options, and raises a ValueError naming any field it cannot honour (an unknown
field, or a known one with a value longjax does not implement). `hf_config(model)` is the
reverse; it checks itself by mapping its answer back, so a longjax model that no family
expresses (ALiBi, scaled tied logits, ...) is refused with the fields that differ.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from longjax.nn import registry
from longjax.nn.pattern import layer_mixers
from longjax.ops import positions
from longjax.train.config import base_config

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Gemma2ForCausalLM", "MambaForCausalLM", "Mamba2ForCausalLM")
MODEL_TYPES = dict(zip(ARCHITECTURES, ("llama", "mistral", "qwen2", "gemma2", "mamba",
                                       "mamba2"), strict=True))
ATTENTION_MIXERS = ("attention", "local_attention")

# transformers' RoPE types -> longjax's `rope_scaling` names.
ROPE_TYPES = {"linear": "linear", "dynamic": "dynamic_ntk", "yarn": "yarn",
              "llama3": "llama3", "longrope": "longrope"}
# Fields of a RoPE parameter dict that map to named mixer options, not to
# `rope_scaling_params`.
_ROPE_NAMED = ("rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
               "partial_rotary_factor")

# Fields with no effect on the forward pass: bookkeeping, training-only settings
# (dropout, initialisation) and generation defaults.
_IGNORED = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "_name_or_path", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
    "initializer_range", "attention_dropout", "max_position_embeddings", "return_dict",
    "output_hidden_states", "output_attentions", "tie_word_embeddings", "rope_parameters",
    "rope_scaling", "rope_theta", "partial_rotary_factor", "hidden_dropout",
    "time_step_min", "time_step_max", "time_step_floor", "time_step_init_scheme",
    "time_step_scale", "rescale_prenorm_residual", "use_mambapy", "use_associative_scan",
    "residual_in_fp32", "id2label", "label2id", "chunk_size_feed_forward", "problem_type",
    "is_encoder_decoder", "cache_implementation", "is_llama_config", "tokenizer_class",
    "_attn_implementation_autoset", "n_layer",  # Mamba's alias of num_hidden_layers
})
# Fields longjax implements only at these values (other values are refused).
_FIXED = {
    "hidden_act": ("silu",), "mlp_bias": (False,), "pretraining_tp": (1,),
    "use_bias": (False,), "use_conv_bias": (True,), "hidden_activation": ("gelu_pytorch_tanh",),
    "time_step_limit": ((0.0, math.inf),),
    "use_bidirectional_attention": (None, False), "rope_interleaved": (False,),
    "use_mrope": (False,), "norm_before_gate": (False,), "rms_norm": (True,),
}
_FAMILY_FIXED = {"Gemma2ForCausalLM": {"hidden_act": ("gelu_pytorch_tanh",)}}
_ATTENTION_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps")
_FAMILY_FIELDS = {
    "LlamaForCausalLM": _ATTENTION_FIELDS + ("attention_bias",),
    "MistralForCausalLM": _ATTENTION_FIELDS + ("sliding_window",),
    "Qwen2ForCausalLM": _ATTENTION_FIELDS + ("sliding_window", "use_sliding_window",
                                             "max_window_layers", "layer_types"),
    "Gemma2ForCausalLM": _ATTENTION_FIELDS + (
        "sliding_window", "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
        "final_logit_softcapping", "attention_bias", "cache_implementation"),
    "MambaForCausalLM": ("vocab_size", "hidden_size", "state_size", "num_hidden_layers",
                         "layer_norm_epsilon", "expand", "conv_kernel", "intermediate_size",
                         "time_step_rank"),
    "Mamba2ForCausalLM": ("vocab_size", "hidden_size", "state_size", "num_hidden_layers",
                          "layer_norm_epsilon", "expand", "conv_kernel", "n_groups", "num_heads",
                          "head_dim", "chunk_size", "time_step_rank"),
}
_TIED_BY_DEFAULT = ("Gemma2ForCausalLM", "MambaForCausalLM")
# Mixer options that choose how the math runs, not what it is (never compared).
_RUNTIME_OPTIONS = frozenset({"impl", "sequence_parallel", "layout", "chunk_size"})


def architecture(hf: dict) -> str:
    """The one supported architecture named by `config.json`'s `architectures`."""
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise ValueError(f"config.json architectures={names!r}: longjax.hf supports exactly "
                         f"one of {list(ARCHITECTURES)}")
    return names[0]


def _plain(value):
    """A config.json value with lists as tuples and transformers' encoded floats
    (`{"__float__": "Infinity"}`) as floats."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        return float(value["__float__"])
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


def _check_fields(hf: dict, arch: str) -> None:
    fixed = {**_FIXED, **_FAMILY_FIXED.get(arch, {})}
    for key, value in hf.items():
        if key in fixed:
            if _plain(value) not in fixed[key]:
                raise ValueError(f"config.json {key}={value!r} is not supported for {arch}; "
                                 f"longjax implements {key} in {list(fixed[key])}")
        elif key not in _IGNORED and key not in _FAMILY_FIELDS[arch]:
            raise ValueError(f"config.json field {key!r} (= {value!r}) is not supported for "
                             f"{arch}; longjax.hf knows {sorted(_FAMILY_FIELDS[arch])} and "
                             f"ignores {sorted(_IGNORED)}")


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def rope_options(hf: dict) -> dict[str, Any]:
    """Attention options of the RoPE fields: `rope_parameters` (transformers 5) or the
    older `rope_theta` / `rope_scaling` / `partial_rotary_factor`."""
    params = dict(hf.get("rope_parameters") or {})
    for key, value in (hf.get("rope_scaling") or {}).items():
        params.setdefault(key, value)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    options = {"rope_base": float(theta), "rope_fraction": float(fraction)}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return options
    if kind not in ROPE_TYPES:
        raise ValueError(f"config.json rope_parameters.rope_type={kind!r} is not supported; "
                         f"allowed: {['default', *ROPE_TYPES]}")
    scaling = ROPE_TYPES[kind]
    # transformers' training length: max_position_embeddings for dynamic NTK; for the
    # others original_max_position_embeddings (top level first, as Phi-3 stores it).
    length = hf["max_position_embeddings"] if kind == "dynamic" else (
        hf.get("original_max_position_embeddings")
        or params.get("original_max_position_embeddings") or hf["max_position_embeddings"])
    factor = params.get("factor") or hf["max_position_embeddings"] / length
    extra = tuple(sorted((k, _hashable(v)) for k, v in params.items() if k not in _ROPE_NAMED))
    positions.rope_scaling_params(scaling, extra, where="config.json rope_parameters")
    return {**options, "rope_scaling": scaling, "rope_scaling_factor": float(factor),
            "train_length": int(length), "rope_scaling_params": extra}


def _layer_windows(hf: dict, arch: str) -> list[int | None]:
    """The attention window of each layer (None: global), as transformers builds the mask."""
    n, window = hf["num_hidden_layers"], hf.get("sliding_window")
    if arch == "LlamaForCausalLM" or window is None:
        return [None] * n
    if arch == "MistralForCausalLM":
        return [window] * n
    if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
        return [None] * n
    types = hf.get("layer_types")
    if types is None and arch == "Qwen2ForCausalLM":
        types = ["sliding_attention" if i >= hf.get("max_window_layers", 28)
                 else "full_attention" for i in range(n)]
    elif types is None:  # Gemma 2: local layers first
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    bad = set(types) - {"sliding_attention", "full_attention"}
    if bad or len(types) != n:
        raise ValueError(f"config.json layer_types={types!r}: longjax.hf takes "
                         f"num_hidden_layers={n} entries of 'sliding_attention' / "
                         f"'full_attention'")
    return [window if t == "sliding_attention" else None for t in types]


def _attention_model(hf: dict, arch: str) -> tuple[dict, dict]:
    d, H = hf["hidden_size"], hf["num_attention_heads"]
    model = dict(vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"],
                 num_heads=H, num_kv_heads=hf.get("num_key_value_heads") or H,
                 head_dim=hf.get("head_dim") or d // H, mlp_dim=hf["intermediate_size"],
                 norm_eps=float(hf["rms_norm_eps"]))
    attention = {"position": "rope", **rope_options(hf)}
    bias = bool(hf.get("attention_bias", False))
    attention.update(qkv_bias=bias or arch == "Qwen2ForCausalLM", out_bias=bias)
    if arch == "Gemma2ForCausalLM":
        model.update(mlp="geglu", post_norms=True, scale_embeddings=True,
                     final_logit_softcap=hf.get("final_logit_softcapping"))
        attention.update(scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
                         softcap=hf.get("attn_logit_softcapping"))
    windows = _layer_windows(hf, arch)
    local = {w for w in windows if w is not None}
    options = {"attention": attention}
    if len(local) == 1 and None not in windows:  # every layer windowed
        model["mixer"] = "attention"
        attention.update(window=local.pop(), cache_mode="rolling")
    elif local:
        model["mixer"] = ",".join("attention" if w is None else "local_attention"
                                  for w in windows)
        options["local_attention"] = dict(attention, window=local.pop(), cache_mode="rolling")
    else:
        model["mixer"] = "attention"
    return model, options


def _ssm_model(hf: dict, arch: str) -> tuple[dict, dict]:
    d = hf["hidden_size"]
    expand = hf.get("expand", 2)
    if hf.get("intermediate_size", expand * d) != expand * d:
        raise ValueError(f"config.json intermediate_size={hf['intermediate_size']} must be "
                         f"expand * hidden_size = {expand * d}")
    model = dict(vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"],
                 num_heads=1, num_kv_heads=1, mlp="none", mlp_dim=0,
                 norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    options = dict(d_state=hf["state_size"], d_conv=hf.get("conv_kernel", 4), expand=expand)
    if arch == "MambaForCausalLM":
        options["dt_rank"] = hf.get("time_step_rank", "auto")  # "auto" is ceil(d / 16) in both
        model["mixer"] = "mamba"
        return model, {"mamba": options}
    heads, head_dim = hf["num_heads"], hf["head_dim"]
    if heads * head_dim != expand * d:
        raise ValueError(f"config.json num_heads={heads} x head_dim={head_dim} must be "
                         f"expand * hidden_size = {expand * d}")
    groups = hf.get("n_groups", 1)
    # transformers normalises each group's channels; for one group that is longjax's default.
    options.update(head_dim=head_dim, n_groups=groups, chunk_size=hf.get("chunk_size", 256),
                   norm_per_group=groups > 1)
    model["mixer"] = "mamba2"
    return model, {"mamba2": options}


def model_config(hf: dict, *, dtype: str = "float32") -> ml_collections.ConfigDict:
    """`config.model` for the checkpoint whose `config.json` is `hf` (compute `dtype`)."""
    arch = architecture(hf)
    _check_fields(hf, arch)
    build = _ssm_model if arch in ("MambaForCausalLM", "Mamba2ForCausalLM") else _attention_model
    try:
        fields, options = build(hf, arch)
    except KeyError as e:
        raise ValueError(f"config.json has no field {e.args[0]!r}, which {arch} needs") from e
    config = base_config().model
    config.update(fields, dtype=dtype, scale_tied_logits=False,
                  tie_embeddings=bool(hf.get("tie_word_embeddings", arch in _TIED_BY_DEFAULT)))
    for name, values in options.items():  # replaced whole: dt_rank may change type
        config.mixer_options[name] = ml_collections.ConfigDict(
            {**config.mixer_options[name].to_dict(), **values})
    return config


def family(model) -> str:
    """The architecture that expresses a longjax `config.model` (before checking it)."""
    if model.get("scan_layers", False):
        raise ValueError("config.model.scan_layers=True stacks the layers' parameters; "
                         "Hugging Face checkpoints hold unrolled layers: use scan_layers=False")
    mixers = set(layer_mixers(model.mixer, model.num_layers))
    if mixers == {"mamba"}:
        return "MambaForCausalLM"
    if mixers == {"mamba2"}:
        return "Mamba2ForCausalLM"
    if not mixers <= set(ATTENTION_MIXERS):
        raise ValueError(f"config.model.mixer={model.mixer!r}: Hugging Face families take "
                         f"attention layers only, or Mamba / Mamba-2 layers only")
    attention = registry.mixer_options("attention", model)
    if model.get("post_norms", False):
        return "Gemma2ForCausalLM"
    if attention["qkv_bias"] and not attention["out_bias"]:
        return "Qwen2ForCausalLM"
    if attention["window"] is not None:
        return "MistralForCausalLM"
    return "LlamaForCausalLM"


def _rope_fields(attention: dict) -> dict[str, Any]:
    """`rope_parameters` (and, for dynamic NTK, the `max_position_embeddings` transformers
    takes as its training length) of the attention options."""
    params = {"rope_type": "default", "rope_theta": attention["rope_base"]}
    if attention["rope_fraction"] != 1.0:
        params["partial_rotary_factor"] = attention["rope_fraction"]
    if attention["rope_scaling"] == "none":
        return {"rope_parameters": params}
    kind = {v: k for k, v in ROPE_TYPES.items()}.get(attention["rope_scaling"])
    if kind is None:
        raise ValueError(f"rope_scaling={attention['rope_scaling']!r} has no transformers "
                         f"RoPE type; allowed: {list(ROPE_TYPES.values())}")
    params.update(rope_type=kind, factor=attention["rope_scaling_factor"])
    params.update({k: list(v) if isinstance(v, tuple) else v
                   for k, v in positions.canonical_rope_params(
                       attention["rope_scaling_params"])})
    if kind == "dynamic":
        return {"rope_parameters": params, "max_position_embeddings": attention["train_length"]}
    params["original_max_position_embeddings"] = attention["train_length"]
    return {"rope_parameters": params}


def hf_config(model) -> dict[str, Any]:
    """The `config.json` fields of a longjax `config.model` (ValueError when no supported
    family expresses it, naming the fields that differ)."""
    arch = family(model)
    hf: dict[str, Any] = {"architectures": [arch], "model_type": MODEL_TYPES[arch],
                          "vocab_size": model.vocab_size, "hidden_size": model.d_model,
                          "num_hidden_layers": model.num_layers,
                          "tie_word_embeddings": bool(model.tie_embeddings)}
    if arch in ("MambaForCausalLM", "Mamba2ForCausalLM"):
        name = "mamba" if arch == "MambaForCausalLM" else "mamba2"
        o = registry.mixer_options(name, model)
        hf.update(state_size=o["d_state"], conv_kernel=o["d_conv"], expand=o["expand"],
                  layer_norm_epsilon=model.norm_eps, use_bias=False, use_conv_bias=True)
        if name == "mamba":
            hf.update(intermediate_size=o["expand"] * model.d_model, time_step_rank=o["dt_rank"])
        else:
            hf.update(head_dim=o["head_dim"], num_heads=o["expand"] * model.d_model
                      // o["head_dim"], n_groups=o["n_groups"], chunk_size=o["chunk_size"])
    else:
        a = registry.mixer_options("attention", model)
        hf.update(num_attention_heads=model.num_heads, num_key_value_heads=model.num_kv_heads,
                  head_dim=model.head_dim or model.d_model // model.num_heads,
                  intermediate_size=model.mlp_dim, rms_norm_eps=model.norm_eps,
                  hidden_act="silu", **_rope_fields(a))
        mixers = layer_mixers(model.mixer, model.num_layers)
        if arch == "LlamaForCausalLM":
            hf["attention_bias"] = bool(a["out_bias"])
        elif arch == "MistralForCausalLM":
            hf["sliding_window"] = a["window"]
        else:
            local = (registry.mixer_options("local_attention", model)
                     if "local_attention" in mixers else {"window": None})
            hf["sliding_window"] = local["window"]
            hf["layer_types"] = ["full_attention" if m == "attention" else "sliding_attention"
                                 for m in mixers]
        if arch == "Qwen2ForCausalLM":
            hf.update(use_sliding_window=local["window"] is not None, max_window_layers=0)
        if arch == "Gemma2ForCausalLM":
            del hf["hidden_act"]
            hf.update(hidden_activation="gelu_pytorch_tanh",
                      query_pre_attn_scalar=_integral(a["scale"] ** -2 if a["scale"]
                                                      else hf["head_dim"]),
                      attn_logit_softcapping=a["softcap"],
                      final_logit_softcapping=model.get("final_logit_softcap", None))
    _check_round_trip(model, hf)
    return hf


def _integral(x: float) -> int | float:
    """`x` as an int when it is one up to rounding (config.json's ints stay ints)."""
    return round(x) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else x


def _math_fields(model) -> dict[str, Any]:
    """The `config.model` fields that change the math of this model's layers."""
    keys = ["vocab_size", "d_model", "num_layers", "mixer", "norm_eps", "tie_embeddings",
            "position_embedding", "mlp", "post_norms", "scale_embeddings",
            "scale_tied_logits", "final_logit_softcap"]
    defaults = {"position_embedding": "none", "mlp": "swiglu", "post_norms": False,
                "scale_embeddings": False, "scale_tied_logits": True,
                "final_logit_softcap": None}
    fields = {k: model.get(k, defaults.get(k)) for k in keys}
    if set(layer_mixers(model.mixer, model.num_layers)) <= set(ATTENTION_MIXERS):
        fields.update(num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
                      head_dim=model.head_dim or model.d_model // model.num_heads)
    if fields["mlp"] != "none":
        fields["mlp_dim"] = model.mlp_dim
    return fields


def _check_round_trip(model, hf: dict) -> None:
    """Raises ValueError naming the fields of `model` that `hf` does not express."""
    back = model_config(hf, dtype=model.dtype)
    mine, theirs = _math_fields(model), _math_fields(back)
    diffs = [f"config.model.{k}={mine[k]!r} (as {hf['architectures'][0]}: {theirs[k]!r})"
             for k in mine if mine[k] != theirs[k]]
    for name in set(layer_mixers(model.mixer, model.num_layers)):
        mine, theirs = registry.mixer_options(name, model), registry.mixer_options(name, back)
        for options in (mine, theirs):
            if "rope_scaling_params" in options:  # pairs, lists or tuples
                options["rope_scaling_params"] = positions.canonical_rope_params(
                    options["rope_scaling_params"])
        diffs += [f"config.model.mixer_options.{name}.{k}={mine[k]!r} (as "
                  f"{hf['architectures'][0]}: {theirs[k]!r})"
                  for k in mine if k not in _RUNTIME_OPTIONS and mine[k] != theirs[k]]
    if diffs:
        raise ValueError("this model has no Hugging Face equivalent: " + "; ".join(diffs))
