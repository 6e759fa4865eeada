"""RoPE scalings against the code released checkpoints were trained with, as
`transformers.modeling_rope_utils` implements it (YaRN's and Llama 3.1's released code,
LongRoPE, dynamic NTK): inverse frequencies and attention factors for every type and
parameter it accepts, and the rotated q/k of its Llama rotary embedding."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

from longjax.ops import positions as P  # noqa: E402

# transformers' rope_type -> ours. "proportional" (Gemma's partial rotary that pairs dim i
# with i + D/2 across the whole head) is a rotary layout, not a context-extension scaling.
HF_TYPES = {"linear": "linear", "dynamic": "dynamic_ntk", "yarn": "yarn",
            "llama3": "llama3", "longrope": "longrope"}
NOT_MAPPED = {"proportional"}
HEAD_DIM, L = 32, 64  # L: the training (original) length


def _hf_config(rope_type, factor, params, *, fraction=1.0, base=10000.0, max_positions=None):
    rope = {"rope_type": rope_type, "factor": factor, "rope_theta": base, **params}
    if rope_type != "dynamic":
        rope["original_max_position_embeddings"] = L
    if fraction != 1.0:
        rope["partial_rotary_factor"] = fraction
    return LlamaConfig(hidden_size=2 * HEAD_DIM, num_attention_heads=2, head_dim=HEAD_DIM,
                       max_position_embeddings=max_positions or int(L * factor),
                       rope_parameters=rope)


def _ours(rope_type, factor, params, *, fraction=1.0, base=10000.0, length=None):
    kw = dict(scaling=HF_TYPES[rope_type], factor=factor, original_length=L, params=params)
    return (P.rope_frequencies(HEAD_DIM, base=base, fraction=fraction, length=length, **kw),
            P.rope_attention_factor(HF_TYPES[rope_type], factor, original_length=L,
                                    params=params))


def _theirs(config, rope_type, seq_len=None):
    inv_freq, attention = rope_utils.ROPE_INIT_FUNCTIONS[rope_type](config, "cpu",
                                                                     seq_len=seq_len)
    return inv_freq.numpy(), attention


def test_every_transformers_rope_type_is_mapped():
    assert set(rope_utils.ROPE_INIT_FUNCTIONS) == set(HF_TYPES) | NOT_MAPPED
    assert {HF_TYPES[t] for t in HF_TYPES} <= set(P.ROPE_SCALINGS)


RNG = np.random.default_rng(0)
LONGROPE = {"short_factor": list(1 + RNG.random(HEAD_DIM // 2)),
            "long_factor": list(1 + 8 * RNG.random(HEAD_DIM // 2))}
CASES = [
    ("linear", 4.0, {}, {}), ("linear", 2.5, {}, dict(fraction=0.5, base=500000.0)),
    ("yarn", 4.0, {}, {}), ("yarn", 8.0, {}, dict(base=1e6)),
    ("yarn", 4.0, {"beta_fast": 16}, {}), ("yarn", 4.0, {"beta_slow": 2.0}, {}),
    ("yarn", 4.0, {"beta_fast": 64, "beta_slow": 0.5}, dict(fraction=0.5)),
    ("yarn", 4.0, {"truncate": False}, {}), ("yarn", 16.0, {"truncate": False}, dict(base=1e6)),
    ("yarn", 40.0, {"mscale": 0.707, "mscale_all_dim": 0.707}, {}),  # DeepSeek-V3
    ("yarn", 40.0, {"mscale": 1.0, "mscale_all_dim": 0.5}, {}),
    ("yarn", 4.0, {"mscale": 2.0}, {}),  # mscale alone leaves the default factor
    ("yarn", 4.0, {"attention_factor": 1.3}, {}), ("yarn", 1.0, {}, {}),
    ("llama3", 8.0, {"low_freq_factor": 1.0, "high_freq_factor": 4.0}, {}),
    ("llama3", 8.0, {"low_freq_factor": 2.0, "high_freq_factor": 8.0}, dict(base=500000.0)),
    ("llama3", 4.0, {"low_freq_factor": 0.5, "high_freq_factor": 2.0}, dict(fraction=0.5)),
    ("longrope", 4.0, LONGROPE, {}), ("longrope", 32.0, LONGROPE, {}),
    ("longrope", 4.0, {**LONGROPE, "attention_factor": 1.2}, {}),
]


@pytest.mark.parametrize("rope_type, factor, params, kw", CASES)
def test_inverse_frequencies_and_attention_factor_equal_transformers(rope_type, factor,
                                                                      params, kw):
    params = dict(params)
    if rope_type == "longrope" and kw.get("fraction"):
        pytest.skip("longrope factors are sized for the full rotary dim")
    theirs, their_factor = _theirs(_hf_config(rope_type, factor, params, **kw), rope_type)
    ours, our_factor = _ours(rope_type, factor, params, **kw)
    np.testing.assert_allclose(ours, theirs, rtol=2e-6)
    assert our_factor == pytest.approx(their_factor, rel=1e-12)


@pytest.mark.parametrize("length", [None, 10, L, L + 1, 3 * L, 1000])
def test_length_dependent_scalings_equal_transformers_below_and_above_the_training_length(
        length):
    """Dynamic NTK (transformers' `max_position_embeddings` is the training length) and
    LongRoPE (short factors up to the original length, long ones beyond)."""
    dynamic = _hf_config("dynamic", 4.0, {}, max_positions=L)
    theirs, _ = _theirs(dynamic, "dynamic", seq_len=length)
    ours = P.rope_frequencies(HEAD_DIM, scaling="dynamic_ntk", factor=4.0, original_length=L,
                              length=length)
    np.testing.assert_allclose(ours, theirs, rtol=2e-6)
    longrope = _hf_config("longrope", 4.0, LONGROPE)
    theirs, _ = _theirs(longrope, "longrope", seq_len=length)
    np.testing.assert_allclose(_ours("longrope", 4.0, LONGROPE, length=length)[0], theirs,
                               rtol=2e-6)


@pytest.mark.parametrize("rope_type, factor, params", [
    ("yarn", 4.0, {"beta_fast": 16, "mscale": 0.707, "mscale_all_dim": 0.707}),
    ("llama3", 8.0, {"low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    ("longrope", 4.0, LONGROPE), ("dynamic", 4.0, {}),
])
def test_rotated_queries_equal_transformers_llama_rotary_embedding(rope_type, factor, params):
    """q rotated at positions 0 .. 3L - 1 (past the training length) as Llama's rotary
    embedding and `apply_rotary_pos_emb` do it, cos and sin times the attention factor."""
    config = _hf_config(rope_type, factor, params,
                        max_positions=L if rope_type == "dynamic" else None)
    T = 3 * L
    x = RNG.standard_normal((1, T, 2, HEAD_DIM)).astype(np.float32)
    position_ids = torch.arange(T)[None]
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    cos, sin = rotary(torch.from_numpy(x), position_ids)
    q = torch.from_numpy(x).transpose(1, 2)  # [B, H, T, D]
    theirs, _ = modeling_llama.apply_rotary_pos_emb(q, q, cos, sin)
    ours = P.rope(x, np.arange(T)[None], scaling=HF_TYPES[rope_type], factor=factor,
                  original_length=L, length=T, params=params)
    np.testing.assert_allclose(np.asarray(ours), theirs.transpose(1, 2).numpy(), atol=2e-5)


@pytest.mark.parametrize("scaling, params, match", [
    ("yarn", {"beta_fats": 16}, r"'beta_fats' is not a parameter of rope_scaling='yarn'; "
                                r"allowed: \['attention_factor', 'beta_fast'"),
    ("linear", {"factor": 2}, r"'factor' is not a parameter of rope_scaling='linear'; allowed: "
                              r"\[\]"),
    ("llama3", {"low_freq": 1}, "allowed: \\['high_freq_factor', 'low_freq_factor'\\]"),
    ("longrope", {"short_factor": [1.0] * 16}, "needs 'long_factor'"),
    ("longrope", {"short_factor": [1.0] * 3, "long_factor": [1.0] * 3}, "needs 16"),
    ("yarn", {"beta_fast": 0}, "beta_fast=0 must be a number > 0"),
    ("truncated", {"a": 0.1, "b": 0.5}, "needs 'rho'"),
    ("truncated", {"a": 0.5, "b": 0.1, "rho": 0.1}, "needs 0 <= a <= b and rho >= 0"),
])
def test_bad_rope_scaling_params_are_named(scaling, params, match):
    with pytest.raises(ValueError, match=match):
        P.rope_frequencies(HEAD_DIM, scaling=scaling, factor=2.0, original_length=L,
                           params=params)


def test_the_attention_mixer_takes_rope_scaling_params_from_the_config():
    """`config.model.mixer_options.attention.rope_scaling_params` (pairs, or a mapping)
    reaches the mixer as sorted hashable pairs; a bad key is named with its config field."""
    import jax
    import ml_collections

    from longjax.nn import build_mixer

    def mixer(params):
        config = ml_collections.ConfigDict(dict(
            d_model=16, num_heads=2, num_kv_heads=1, head_dim=8, dtype="float32",
            mixer_options={"attention": dict(rope_scaling="yarn", rope_scaling_factor=4.0,
                                             train_length=L, rope_scaling_params=params)}))
        return build_mixer("attention", config, parent=None)

    built = mixer({"beta_slow": 2, "beta_fast": 8})
    assert built.rope_scaling_params == (("beta_fast", 8), ("beta_slow", 2))
    assert mixer((("beta_fast", 8), ("beta_slow", 2))).rope_scaling_params == \
        built.rope_scaling_params
    hash(mixer({"short_factor": [1.0, 2.0]}).rope_scaling_params)
    x = np.zeros((1, 4, 16), np.float32)
    with pytest.raises(ValueError, match="mixer_options.attention.rope_scaling_params: "
                                         "'beta' is not a parameter"):
        mixer({"beta": 8}).init(jax.random.key(0), x)
