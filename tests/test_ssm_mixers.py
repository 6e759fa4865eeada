"""SSM mixers: full forward == chunked calls == token-by-token decode through the cache,
with packed documents; the LM runs forward, grad and decode with every SSM mixer."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from longjax.nn import DecoderLM, build_mixer

OPTIONS = {
    "mamba": {"d_state": 4, "chunk_size": 4},
    "mamba2": {"d_state": 4, "head_dim": 8, "n_groups": 2, "chunk_size": 4},
    "s4d": {"d_state": 8},
    "s4": {"d_state": 8},
}


def _model(mixer="mamba", num_layers=4):
    return ml_collections.FrozenConfigDict(dict(
        vocab_size=19, d_model=16, num_layers=num_layers, num_heads=2, num_kv_heads=2,
        head_dim=8, mlp_dim=32, mixer=mixer, mixer_options=OPTIONS, dtype="float32",
        norm_eps=1e-6, tie_embeddings=False, remat=False))


def _run_in_pieces(apply, params, x, seg, cache, pieces):
    outs, start = [], 0
    for size in pieces:
        y, cache = apply(params, x[:, start:start + size], seg[:, start:start + size], cache)
        outs.append(y)
        start += size
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("name", ["mamba", "mamba2", "s4d", "s4"])
def test_full_equals_chunked_equals_decode(name):
    B, T = 2, 11
    mixer = build_mixer(name, _model(), parent=None)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, T, 16)), jnp.float32)
    seg = jnp.asarray([[1] * 4 + [2] * 7, [1] * 9 + [2] * 2], jnp.int32)
    params = jax.jit(mixer.init)(jax.random.key(0), x)

    @jax.jit
    def apply(params, x, seg, cache):
        return mixer.apply(params, x, segment_ids=seg, cache=cache)

    full, _ = apply(params, x, seg, None)
    cache = mixer.init_cache(B, T, jnp.float32)
    chunked = _run_in_pieces(apply, params, x, seg, cache, [5, 5, 1])
    decoded = _run_in_pieces(apply, params, x, seg, cache, [1] * T)
    np.testing.assert_allclose(chunked, full, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(decoded, full, rtol=1e-4, atol=1e-4)
    # no segments: full (convolution mode for S4/S4D) == recurrent decode
    full_plain, _ = jax.jit(mixer.apply)(params, x)
    ones = jnp.ones((B, T), jnp.int32)
    np.testing.assert_allclose(_run_in_pieces(apply, params, x, ones, cache, [1] * T), full_plain,
                               rtol=1e-4, atol=1e-4)
    # the second document of row 0 sees nothing of the first
    changed, _ = apply(params, x.at[0, :4].set(1.0), seg, None)
    np.testing.assert_allclose(changed[0, 4:], full[0, 4:], rtol=1e-5, atol=1e-5)
    assert not np.allclose(changed[0, :4], full[0, :4])


def test_lm_forward_grad_and_decode():
    model = DecoderLM(_model("mamba,mamba2,s4d", num_layers=3))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 19, size=(2, 7)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), tokens)

    def loss(params):
        logits, _ = model.apply(params, tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    step = jax.jit(functools.partial(model.apply))
    cache, outs = model.init_cache(2, 7), []
    for t in range(7):
        out, cache = step(params, tokens[:, t:t + 1], cache=cache)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), logits, rtol=1e-4, atol=1e-4)


def test_bad_options():
    bad = dict(OPTIONS, mamba2={**OPTIONS["mamba2"], "head_dim": 7})
    model = ml_collections.FrozenConfigDict({**_model().to_dict(), "mixer_options": bad})
    mixer = build_mixer("mamba2", model, parent=None)
    with pytest.raises(ValueError, match="head_dim"):
        mixer.init_cache(1, 4)
