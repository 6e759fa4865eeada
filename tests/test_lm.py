"""The decoder LM: mixer patterns, the registry, and cached decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from longjax.nn import DecoderLM, build_mixer, mixer_names
from longjax.nn.attention import AttentionMixer
from longjax.nn.linear import KIND_OPTIONS, LinearAttentionMixer, RGLRUMixer, SlidingWindowMixer
from longjax.nn.pattern import expand_pattern, layer_mixers
from longjax.nn.ssm import Mamba2Mixer, MambaMixer, S4Mixer
from longjax.train.cli import load_config_file

from conftest import REPO, TINY


@pytest.mark.parametrize("pattern, expected", [
    ("attention", ["attention"]),
    ("mamba,mamba,attention", ["mamba", "mamba", "attention"]),
    ("(rglru,rglru,swa)*2", ["rglru", "rglru", "swa"] * 2),
    ("a*3, (b, (c)*2)*2", ["a"] * 3 + ["b", "c", "c"] * 2),
])
def test_expand_pattern(pattern, expected):
    assert expand_pattern(pattern) == expected


@pytest.mark.parametrize("pattern", ["", "a,,b", "(a,b", "a)", "()", "a,", "a*x"])
def test_bad_patterns(pattern):
    with pytest.raises(ValueError, match="config.model.mixer"):
        expand_pattern(pattern)


def test_layer_mixers_cycles_and_checks_divisibility():
    assert layer_mixers("a,b", 4) == ["a", "b", "a", "b"]
    with pytest.raises(ValueError, match="does not divide config.model.num_layers=5"):
        layer_mixers("a,b", 5)


def test_unknown_mixer_is_named():
    model = ml_collections.ConfigDict({"mixer_options": {}})
    with pytest.raises(ValueError, match="unknown mixer 'nope'; registered mixers"):
        build_mixer("nope", model)


def test_config_defaults_build_the_modules_defaults():
    """A mixer built from a config of defaults equals the module called directly with only
    its shape arguments: the options' defaults are declared once, in the modules."""
    model = ml_collections.ConfigDict(dict(d_model=16, num_heads=2, num_kv_heads=1,
                                           head_dim=8, dtype="float32", norm_eps=1e-6))
    heads = dict(num_heads=2, num_kv_heads=1, head_dim=8)
    direct = {"attention": AttentionMixer(**heads), "local_attention": AttentionMixer(**heads),
              "swa": SlidingWindowMixer(**heads), "mamba": MambaMixer(d_model=16),
              "mamba2": Mamba2Mixer(d_model=16), "s4d": S4Mixer(d_model=16),
              "s4": S4Mixer(d_model=16, variant="s4"), "rglru": RGLRUMixer(width=16),
              **{kind: LinearAttentionMixer(kind=kind, num_heads=2, head_dim=8)
                 for kind in KIND_OPTIONS}}
    assert set(direct) == set(mixer_names())
    for name, module in direct.items():
        built = build_mixer(name, model, parent=None)
        assert type(built) is type(module), name
        for field in dataclasses.fields(module):
            if field.name not in ("parent", "name"):
                assert getattr(built, field.name) == getattr(module, field.name), (name, field)


def _tiny_lm(**model_overrides):
    config = load_config_file(f"{REPO}/configs/quickstart.py:{TINY}")
    config.model.update(model_overrides)
    return DecoderLM(ml_collections.FrozenConfigDict(config.model))


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 5e-2)])
def test_prefill_plus_decode_equals_full_forward(dtype, tol):
    lm = _tiny_lm(dtype=dtype, tie_embeddings=False)
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, 259)
    params = lm.init(jax.random.key(1), tokens)
    full, _ = lm.apply(params, tokens)
    prefill, cache = lm.apply(params, tokens[:, :4], cache=lm.init_cache(2, 16))
    steps = [prefill]
    for t in range(4, 11):
        logits, cache = lm.apply(params, tokens[:, t:t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=tol, rtol=tol)


def test_packed_documents_do_not_see_each_other():
    lm = _tiny_lm()
    tokens = jax.random.randint(jax.random.key(0), (1, 12), 0, 259)
    params = lm.init(jax.random.key(1), tokens)
    segments = jnp.array([[1] * 5 + [2] * 7])
    positions = jnp.array([list(range(5)) + list(range(7))])
    packed, _ = lm.apply(params, tokens, segment_ids=segments, positions=positions)
    alone, _ = lm.apply(params, tokens[:, 5:])
    np.testing.assert_allclose(packed[:, 5:], alone, atol=1e-5)
