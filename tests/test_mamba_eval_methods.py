"""Training-free evaluation methods for Mamba (longjax.nn.ssm.MambaMixer options, set by
longjax.eval.methods): Stuffed Mamba's scalings and state normalization (Chen et al.
2024) and DeciMamba's decimation (Ben-Kish et al. 2024), each against a dense numpy
Mamba block written from the papers; identity at the neutral settings; a decimated
prefill then a decode step; the LM's stream after a decimating layer; bad input named."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from longjax.eval.methods import DECIMATION_KEEP_LAST, apply_method, mamba_overrides
from longjax.nn import DecoderLM
from longjax.nn.ssm import MambaMixer
from longjax.ops.selective_scan import selective_scan
from longjax.train.config import base_config

B, T, DM, N = 2, 12, 8, 4
RANK = 1  # ceil(d_model / 16)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def numpy_mamba(p, x, *, delta_scale=1.0, decay_scale=1.0, input_scale=1.0, state_norm=None,
                decimation=None):
    """Gu & Dao's Mamba block, token by token, with the methods: delta <- s delta, A <- s A,
    B <- s B, each channel's state clipped to L2 norm `state_norm` after its update, and
    DeciMamba keeping the K tokens of largest ||delta_t||_2 among the first T - R plus the
    last R. Returns the outputs of the kept tokens and their indices."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    u, z = np.split(x @ p["in_proj"]["kernel"], 2, axis=-1)
    w = p["conv"]["kernel"]  # [K, E], w[-1] taps the current token
    conv = sum(np.pad(u, ((0, 0), (s, 0), (0, 0)))[:, :T] * w[-1 - s] for s in range(len(w)))
    u = _silu(conv + p["conv_bias"])
    dt, Bm, Cm = np.split(u @ p["x_proj"]["kernel"], [RANK, RANK + N], axis=-1)
    delta = _softplus(dt @ p["dt_proj"]["kernel"] + p["dt_bias"]) * delta_scale
    kept = np.broadcast_to(np.arange(T), (B, T))
    if decimation is not None:
        keep, last = decimation
        score = np.linalg.norm(delta[:, :T - last], axis=-1)
        top = np.sort(np.argsort(-score, axis=1)[:, :keep], axis=1)
        kept = np.concatenate([top, np.broadcast_to(np.arange(T - last, T), (B, last))], 1)
    A = -np.exp(p["A_log"]) * decay_scale
    out = np.zeros(kept.shape + (DM,))
    for b in range(B):
        h = np.zeros_like(A)
        for i, t in enumerate(kept[b]):
            h = np.exp(delta[b, t][:, None] * A) * h + \
                (delta[b, t] * u[b, t])[:, None] * (input_scale * Bm[b, t])[None, :]
            if state_norm is not None:
                norm = np.linalg.norm(h, axis=-1, keepdims=True)
                h = h * np.minimum(1.0, state_norm / norm)
            y = (h @ Cm[b, t] + p["D"] * u[b, t]) * _silu(z[b, t])
            out[b, i] = y @ p["out_proj"]["kernel"]
    return out, kept


@pytest.fixture(scope="module")
def block():
    x = jax.random.normal(jax.random.key(0), (B, T, DM))
    params = jax.jit(MambaMixer(d_model=DM, d_state=N).init)(jax.random.key(1), x)["params"]
    return x, jax.tree.map(lambda a: a.value, params, is_leaf=lambda a: hasattr(a, "value"))


@pytest.mark.parametrize("options", [
    {},
    {"delta_scale": 1.7, "decay_scale": 3.0, "input_scale": 0.5, "state_norm": 0.05},
    {"decimation": (5, 2)},
])
def test_methods_follow_the_dense_definition(block, options):
    x, params = block
    out = MambaMixer(d_model=DM, d_state=N, **options).apply({"params": params}, x)
    want, kept = numpy_mamba(params, np.asarray(x, np.float64), **options)
    np.testing.assert_allclose(out[0], want, rtol=1e-4, atol=1e-5)
    if "decimation" in options:
        np.testing.assert_array_equal(out[2], kept)
        assert out[0].shape == (B, 7, DM)
    if "state_norm" in options:  # the clip acts: without it the outputs differ
        unclipped, _ = numpy_mamba(params, np.asarray(x, np.float64),
                                   **{**options, "state_norm": None})
        assert np.abs(unclipped - want).max() > 1e-3


def test_neutral_settings_are_the_identity(block):
    x, params = block
    plain, _ = MambaMixer(d_model=DM, d_state=N).apply({"params": params}, x)
    neutral = MambaMixer(d_model=DM, d_state=N, delta_scale=1.0, decay_scale=1.0,
                         input_scale=1.0, state_norm=1e30, decimation=(T - 2, 2))
    out, _, kept = neutral.apply({"params": params}, x)
    np.testing.assert_allclose(out, plain, rtol=1e-6, atol=1e-6)
    assert kept is None  # T tokens fit K + R: nothing to drop


def test_a_decimated_prefill_then_a_decode_step(block):
    """The prompt is decimated, the generated token is not (Ben-Kish et al. decimate the
    prefill): the step continues the state of the kept tokens, as the dense block over
    the T + 1 tokens keeping the new one too."""
    x, params = block
    mixer = MambaMixer(d_model=DM, d_state=N, decimation=(5, 2))
    cache = mixer.init_cache(B, T)
    _, cache, _ = mixer.apply({"params": params}, x[:, :T - 1], cache=cache)
    step, _, kept = mixer.apply({"params": params}, x[:, T - 1:], cache=cache)
    assert kept is None
    want, _ = numpy_mamba(params, np.asarray(x, np.float64), decimation=(5, 3))
    np.testing.assert_allclose(step[:, 0], want[:, -1], rtol=1e-4, atol=1e-5)


def _lm_config(mixer="mamba", **fields):
    config = base_config().model
    config.update(vocab_size=32, d_model=DM, num_layers=2, mixer=mixer, mlp="none",
                  num_heads=2, num_kv_heads=2, head_dim=4, mlp_dim=16)
    config.mixer_options.mamba = {"d_state": N}
    config.update(fields)
    return config


def test_the_layers_after_a_decimating_layer_see_only_its_tokens():
    """Layer 0 keeps 4 + 8 of 24 tokens: layer 1 runs on those 12 alone, so only their
    logits are non-zero and they differ from the undecimated LM's."""
    config = _lm_config()
    tokens = jax.random.randint(jax.random.key(2), (B, 24), 0, 32)
    model = DecoderLM(ml_collections.FrozenConfigDict(config))
    params = jax.jit(model.init)(jax.random.key(3), tokens)["params"]
    plain, _ = jax.jit(model.apply)({"params": params}, tokens)
    method = apply_method(config, "decimation:0:4", train_length=12, eval_length=24)
    assert method.decimation == ((0, 4, DECIMATION_KEEP_LAST),)
    logits, _ = jax.jit(DecoderLM(method).apply)({"params": params}, tokens)
    scored = np.abs(np.asarray(logits)).sum(-1) > 0
    assert (scored.sum(1) == 4 + DECIMATION_KEEP_LAST).all() and scored[:, -8:].all()
    assert not np.allclose(np.asarray(logits)[scored], np.asarray(plain)[scored], atol=1e-3)


def test_bad_methods_are_named():
    config = _lm_config()
    assert mamba_overrides("decay_scale:2+state_norm:0.5", train_length=64) == (
        {"decay_scale": 2.0, "state_norm": 0.5}, ())
    assert mamba_overrides("decimation:0:auto", train_length=64)[1] == ((0, 56, 8),)
    with pytest.raises(ValueError, match="has no mamba or mamba2 layer"):
        apply_method(_lm_config("attention"), "decay_scale:2", train_length=8, eval_length=16)
    with pytest.raises(ValueError, match="decimation needs a mamba layer"):
        apply_method(_lm_config("(mamba,attention)*1"), "decimation:1:4",
                     train_length=8, eval_length=16)
    for method, match in (("decay_scale:0", "a number > 0"),
                          ("state_norm", "takes one number > 0"),
                          ("decimation:a:4", "decimation:I:K"),
                          ("decimation:0:auto", "L=8 less the last 8 tokens")):
        with pytest.raises(ValueError, match=match):
            apply_method(config, method, train_length=8, eval_length=16)
    with pytest.raises(ValueError, match="mixer_options.mamba.input_scale must be a number"):
        MambaMixer(d_model=DM, d_state=N, input_scale=-1.0).init(
            jax.random.key(0), jnp.zeros((1, 4, DM)))
    with pytest.raises(ValueError, match="state_norm must be a number > 0"):
        selective_scan(*(jnp.ones((1, 2, 3)),) * 2, -jnp.ones((3, 2)),
                       *(jnp.ones((1, 2, 2)),) * 2, state_norm=0.0)
