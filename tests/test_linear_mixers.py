"""Linear / recurrent / sliding-window mixers and the hybrid presets: full forward ==
chunked (prefill + continuation) == token-by-token decode, and the bounded SWA cache.
(That every mixer and preset trains is tested in tests/test_mixer_smoke.py.)"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from longjax.nn import DecoderLM, build_mixer, mixer_names
from longjax.nn.pattern import expand_pattern
from longjax.nn.presets import PRESETS, preset

MIXERS = ["linear_attention", "retention", "gla", "deltanet", "gated_deltanet", "based",
          "rglru", "swa"]
SMALL_OPTIONS = {
    "swa": {"window": 5}, "based": {"feature_dim": 4, "chunk_size": 4},
    **{n: {"chunk_size": 4} for n in ("linear_attention", "retention", "gla", "deltanet",
                                      "gated_deltanet")},
}
SEGMENTS = jnp.array([[1] * 6 + [2] * 5, [1] * 11])
# numpy inputs: JAX's RNG would compile once per shape, slowly.
X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 11, 16)), jnp.float32)
TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 11)), jnp.int32)


def _model_config(mixer_options=SMALL_OPTIONS):
    return ml_collections.ConfigDict(dict(
        d_model=16, num_heads=2, num_kv_heads=1, head_dim=8, dtype="float32",
        mixer_options=mixer_options))


def _decode_all(apply, cache, x, seg, splits):
    """Runs `apply` over consecutive pieces of x split at `splits`, threading the cache."""
    outs = []
    for lo, hi in zip([0, *splits], [*splits, x.shape[1]], strict=True):
        y, cache = apply(x[:, lo:hi], seg[:, lo:hi], cache)
        outs.append(y)
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("name", MIXERS)
def test_full_equals_chunked_equals_decode(name):
    """A 4-token prefill (one chunk of 4) then one token at a time equals the full call of
    11 tokens (three chunks), across a document border."""
    assert name in mixer_names()
    mixer = build_mixer(name, _model_config(), parent=None)
    x = X
    params = jax.jit(mixer.init)(jax.random.PRNGKey(1), x)
    full, none = jax.jit(lambda x: mixer.apply(params, x, segment_ids=SEGMENTS))(x)
    assert none is None
    apply = jax.jit(lambda x, s, c: mixer.apply(params, x, segment_ids=s, cache=c))
    stepped, _ = _decode_all(apply, mixer.init_cache(2, 11, jnp.float32), x, SEGMENTS,
                             list(range(4, 11)))
    np.testing.assert_allclose(stepped, full, atol=2e-5, rtol=1e-4)


def test_sliding_window_cache_is_bounded_by_the_window():
    mixer = build_mixer("swa", _model_config(), parent=None)
    cache = mixer.init_cache(2, 10_000, jnp.float32)
    assert cache["k"].shape == (2, 5, 1, 8)
    params = jax.jit(mixer.init)(jax.random.PRNGKey(1), X)
    _, cache = jax.jit(mixer.apply)(params, X, cache=cache)
    assert cache["k"].shape == (2, 5, 1, 8)
    np.testing.assert_array_equal(np.sort(cache["positions"][0]), jnp.arange(6, 11))


def test_short_conv_does_not_mix_documents():
    """DeltaNet (with its short convolution): changing document 1 leaves document 2 as is."""
    mixer = build_mixer("deltanet", _model_config(), parent=None)
    params = jax.jit(mixer.init)(jax.random.PRNGKey(1), X)
    apply = jax.jit(lambda x: mixer.apply(params, x, segment_ids=SEGMENTS)[0])
    y, y2 = apply(X), apply(X.at[0, :6].add(1.0))
    np.testing.assert_allclose(y2[0, 6:], y[0, 6:], atol=1e-6)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="mixer_options.swa.window must be a positive int"):
        build_mixer("swa", _model_config({"swa": {"window": 0}}), parent=None)
    with pytest.raises(ValueError, match="unknown preset 'hyena'"):
        preset("hyena")


def _preset_lm(name):
    """The preset's model at a tiny width, one cycle of its pattern, and small windows."""
    overrides = preset(name)
    options = {k: {**SMALL_OPTIONS.get(k, {}), **v} for k, v in overrides["mixer_options"].items()}
    model = dict(vocab_size=264, d_model=16, num_layers=len(expand_pattern(overrides["mixer"])),
                 num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32, dtype="float32",
                 norm_eps=1e-6, tie_embeddings=False, remat=False, mixer=overrides["mixer"],
                 mixer_options={**SMALL_OPTIONS, **options})
    return DecoderLM(ml_collections.FrozenConfigDict(model))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_decode_equals_full_forward(name):
    lm = _preset_lm(name)
    tokens = TOKENS
    params = jax.jit(lm.init)(jax.random.PRNGKey(1), tokens)
    full, _ = jax.jit(lambda t: lm.apply(params, t, segment_ids=SEGMENTS))(tokens)
    apply = jax.jit(lambda t, s, c: lm.apply(params, t, segment_ids=s, cache=c))
    stepped, _ = _decode_all(apply, lm.init_cache(2, 11), tokens, SEGMENTS, [5, 6])
    np.testing.assert_allclose(stepped, full, atol=5e-5, rtol=1e-4)
