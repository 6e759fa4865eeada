"""Position schemes against closed-form values computed here, the attention mixer's
full forward against its decode path for every scheme and training-free method, what the
methods leave unchanged at the training length, and bad-option errors."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_generate import _random_params

from longjax.nn import build_mixer
from longjax.ops import positions as P


def test_rope_frequencies_and_scalings():
    np.testing.assert_allclose(P.rope_frequencies(8), [1, 0.1, 0.01, 0.001], rtol=1e-6)
    np.testing.assert_allclose(P.rope_frequencies(8, fraction=0.5), [1, 0.01], rtol=1e-6)
    np.testing.assert_allclose(P.rope_frequencies(8, scaling="linear", factor=4),
                               [0.25, 0.025, 0.0025, 0.00025], rtol=1e-6)
    ntk_base = 10000 * 4 ** (8 / 6)  # base * s^(R / (R - 2))
    np.testing.assert_allclose(P.rope_frequencies(8, scaling="ntk", factor=4),
                               [ntk_base ** (-i / 8) for i in (0, 2, 4, 6)], rtol=1e-5)
    dyn = dict(scaling="dynamic_ntk", factor=4, original_length=100)
    np.testing.assert_allclose(P.rope_frequencies(8, length=100, **dyn), P.rope_frequencies(8))
    grown = 10000 * (4 * 200 / 100 - 3) ** (8 / 6)  # s' = s L'/L - (s - 1) = 5
    np.testing.assert_allclose(P.rope_frequencies(8, length=200, **dyn),
                               [grown ** (-i / 8) for i in (0, 2, 4, 6)], rtol=1e-5)


def test_llama3_interpolates_by_wavelength():
    """Dims turning more than 4 times over the training length keep their frequency,
    fewer than once are divided by s, in between a linear ramp in the turn count."""
    L, s, D, low, high = 256, 8.0, 64, 1.0, 4.0
    theta = 10000.0 ** (-np.arange(0, D, 2) / D)
    turns = L * theta / (2 * math.pi)
    ramp = np.clip((turns - low) / (high - low), 0, 1)
    expected = np.where(turns > high, theta, np.where(turns < low, theta / s,
                                                      (1 - ramp) * theta / s + ramp * theta))
    got = P.rope_frequencies(D, scaling="llama3", factor=s, original_length=L)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got[0] == pytest.approx(1.0) and got[-1] == pytest.approx(theta[-1] / s, rel=1e-5)


def test_rope_and_xpos_depend_on_relative_position_only():
    """<rope(q, m), rope(k, n)> = cos((m - n) theta) for a pair's unit vector; xPos
    multiplies it by zeta^((m - n) / 512), zeta = (0 + 0.4) / 1.4 for pair 0."""
    e0 = jnp.zeros((1, 1, 1, 8)).at[..., 0].set(1.0)
    inv_freq = P.rope_frequencies(8)
    for m, n in [(5, 2), (105, 102), (900, 17)]:
        def at(fn, p, **kw):
            return fn(e0, jnp.full((1, 1), p), inv_freq=inv_freq, **kw)[0, 0, 0]
        dot = float(at(P.rope, m) @ at(P.rope, n))
        assert dot == pytest.approx(math.cos(m - n), abs=1e-4)
        scaled = P.rope(e0, jnp.full((1, 1), m), scaling="linear", factor=4)[0, 0, 0]
        np.testing.assert_allclose(scaled, at(P.rope, m / 4), atol=1e-5)  # PI: positions / s
        dot = float(at(P.xpos, m, key=False) @ at(P.xpos, n, key=True))
        assert dot == pytest.approx(math.cos(m - n) * (0.4 / 1.4) ** ((m - n) / 512), abs=1e-4)


@pytest.mark.parametrize("heads, slopes", [
    (8, [2.0 ** -i for i in range(1, 9)]),
    (6, [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]),
    (12, [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)]),
    (1, [2.0 ** -8]),
])
def test_alibi_slopes_for_any_head_count(heads, slopes):
    np.testing.assert_allclose(P.alibi_slopes(heads), slopes, rtol=1e-6)


def test_t5_buckets():
    d = jnp.asarray([[[-5, 0, 1, 15, 16, 31, 32, 64, 127, 128, 1000]]])
    # exact below 16; 16 + int(log(n / 16) / log(8) * 16) up to 31
    np.testing.assert_array_equal(P.t5_buckets(d)[0, 0],
                                  [0, 0, 1, 15, 16, 21, 21, 26, 31, 31, 31])
    both = P.t5_buckets(jnp.asarray([[[-3, 3, -100]]]), bidirectional=True)[0, 0]
    np.testing.assert_array_equal(both, [16 + 3, 3, 16 + 15])


def test_kerple_fire_sinusoidal_logn_closed_forms():
    q, k = jnp.asarray([[0, 10]]), jnp.asarray([[0, 3, 10]])
    bias = P.kerple_log_bias(P.relative_distance(q, k), jnp.asarray([2.0]), jnp.asarray([0.5]))
    np.testing.assert_allclose(bias[0, 0, 1], [-2 * math.log(6), -2 * math.log(4.5), 0], rtol=1e-6)
    fire = P.fire_inputs(jnp.asarray([[100, 1000]]), jnp.asarray([[50, 0]]), 1.0, 512.0)
    np.testing.assert_allclose(fire[0, 0, 0], math.log(51) / math.log(513), rtol=1e-6)
    np.testing.assert_allclose(fire[0, 1, 1], 1.0, rtol=1e-6)  # log(1001) / log(1001)
    pe = P.sinusoidal_embedding(jnp.asarray([[3]]), 6)[0, 0]
    w = 10000.0 ** (-2 / 6)
    np.testing.assert_allclose(pe, [math.sin(3), math.cos(3), math.sin(3 * w), math.cos(3 * w),
                                    math.sin(3 * w * w), math.cos(3 * w * w)], rtol=1e-5)
    scale = P.logn_scale(jnp.asarray([[0, 15, 16 * 16 - 1]]), 16)[0, :, 0, 0]
    np.testing.assert_allclose(scale, [1, 1, 2], rtol=1e-6)


X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 23, 16)), jnp.float32)
L = 8  # the "training length" of the methods below


def _mixer(**options):
    config = ml_collections.ConfigDict(dict(
        d_model=16, num_heads=2, num_kv_heads=1, head_dim=8, dtype="float32",
        mixer_options={"attention": {"impl": "reference", **options}}))
    return build_mixer("attention", config, parent=None)


def _stream(mixer, params, x, *, cache_length=64, prefill=5):
    """A prefill then one token at a time through the mixer's cache."""
    step = jax.jit(lambda x, c: mixer.apply(params, x, cache=c))
    cache = mixer.init_cache(x.shape[0], cache_length)
    outs = []
    for lo, hi in zip([0, *range(prefill, x.shape[1])], range(prefill, x.shape[1] + 1),
                      strict=True):
        y, cache = step(x[:, lo:hi], cache)
        outs.append(y)
    return jnp.concatenate(outs, 1)


SINKS = dict(window=6, num_sinks=2)
METHODS = {
    **{p: dict(position=p) for p in ("xpos", "alibi", "t5", "kerple", "fire", "none")},
    "rope_yarn": dict(rope_scaling="yarn", rope_scaling_factor=4, train_length=L),
    "rope_dynamic_ntk": dict(rope_scaling="dynamic_ntk", rope_scaling_factor=4,
                             train_length=L),
    "logn": dict(logn_scaling=True, train_length=L),
    "streaming": dict(cache_mode="streaming", **SINKS),
    "lm_infinite": dict(cache_mode="lm_infinite", train_length=L, **SINKS),
    "alibi_lm_infinite": dict(position="alibi", cache_mode="lm_infinite", train_length=L,
                              **SINKS),
    "self_extend": dict(self_extend_group=3, self_extend_window=4),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_full_forward_equals_decode(name):
    """Prefill + token-by-token decode through the cache equals the full forward. Dynamic
    NTK takes the current length, so there a step's output equals the full forward of the
    prefix it has seen (the prefill: of its 5 tokens)."""
    mixer = _mixer(**METHODS[name])
    params = _random_params(mixer, like=X)
    if name == "rope_dynamic_ntk":
        full = jnp.concatenate([mixer.apply(params, X[:, :5])[0]] + [
            mixer.apply(params, X[:, :t + 1])[0][:, t:] for t in range(5, X.shape[1])], 1)
        assert not np.allclose(full, mixer.apply(params, X)[0], atol=1e-3)
    else:
        full = mixer.apply(params, X)[0]
    np.testing.assert_allclose(_stream(mixer, params, X, cache_length=2 * X.shape[1]), full,
                               atol=2e-5)


@pytest.mark.parametrize("name", ["rope_dynamic_ntk", "logn", "lm_infinite", "streaming",
                                  "self_extend"])
def test_training_free_methods_change_nothing_up_to_the_training_length(name):
    """Dynamic NTK, log-n, LM-Infinite (window = L), StreamingLLM (sinks + window = L) and
    Self-Extend (neighbour window >= length) equal plain RoPE up to L, and differ after."""
    options = dict(METHODS[name])
    if name in ("lm_infinite", "streaming"):
        options.update(window=L - 2 * (name == "streaming"), num_sinks=2)
    if name == "self_extend":
        options.update(self_extend_window=L)
    plain, method = _mixer(), _mixer(**options)
    params = _random_params(plain, like=X)
    np.testing.assert_allclose(method.apply(params, X[:, :L])[0], plain.apply(params, X[:, :L])[0],
                               atol=1e-5)
    assert not np.allclose(method.apply(params, X)[0], plain.apply(params, X)[0], atol=1e-3)


def _rope_np(x, pos):
    inv = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    a = pos[:, None] * inv
    x1, x2 = x[..., :4], x[..., 4:]
    c, s = np.cos(a)[:, None], np.sin(a)[:, None]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def test_self_extend_matches_its_definition():
    """Self-Extend written out densely here: distance < N uses positions t, s; farther
    keys use floor(s / G) and the query floor(t / G) + N - floor(N / G); one softmax."""
    G, N, T = 3, 4, X.shape[1]
    mixer = _mixer(self_extend_group=G, self_extend_window=N)
    params = _random_params(mixer, like=X)
    p = jax.tree.map(np.asarray, params["params"])
    x = np.asarray(X[0])
    q = np.einsum("te,ehd->thd", x, p["query"]["kernel"])
    k = np.einsum("te,ehd->thd", x, p["key"]["kernel"])[:, 0]
    v = np.einsum("te,ehd->thd", x, p["value"]["kernel"])[:, 0]
    t = np.arange(T)
    near = np.einsum("thd,sd->hts", _rope_np(q, t), _rope_np(k[:, None], t)[:, 0])
    far = np.einsum("thd,sd->hts", _rope_np(q, t // G + N - N // G),
                    _rope_np(k[:, None], t // G)[:, 0])
    dist = t[:, None] - t[None, :]
    scores = np.where(dist < N, near, far) / math.sqrt(8)
    scores = np.where(dist >= 0, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("hts,sd->thd", weights, v)
    expected = np.einsum("thd,hde->te", out, p["out"]["kernel"])
    np.testing.assert_allclose(mixer.apply(params, X)[0][0], expected, atol=2e-5)


def test_learned_biases_get_gradients():
    for position in ("t5", "kerple", "fire"):
        mixer = _mixer(position=position)
        params = _random_params(mixer, like=X)
        grads = jax.grad(lambda p, m=mixer: jnp.sum(m.apply(p, X)[0] ** 2))(params)
        bias_grads = jax.tree.leaves(grads["params"]["position_bias"])
        assert all(np.isfinite(g).all() for g in bias_grads)
        assert any(np.abs(g).max() > 0 for g in bias_grads), position


@pytest.mark.parametrize("options, match", [
    (dict(position="sinusoidal"), "position='sinusoidal'; allowed"),
    (dict(rope_scaling="rerope"), "rope_scaling='rerope'; allowed"),
    (dict(rope_scaling="linear", rope_scaling_factor=0.0), "rope_scaling_factor must be"),
    (dict(rope_scaling="yarn", rope_scaling_factor=4.0), "attention.train_length"),
    (dict(rope_scaling="ntk", rope_scaling_factor=2.0, position="alibi"), "needs a rotary"),
    (dict(logn_scaling=True), "train_length must be a positive int"),
    (dict(cache_mode="lm_infinite", window=4, num_sinks=1), "train_length must be"),
    (dict(self_extend_group=2), "self_extend_window"),
    (dict(self_extend_group=2, self_extend_window=4, window=8), "no window or sinks"),
    (dict(cache_mode="rolling"), "needs a positive int window"),
])
def test_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        _mixer(**options).init(jax.random.key(0), X[:, :4])


def test_absolute_position_embeddings_in_the_lm():
    from longjax.train.config import base_config, validate
    from longjax.train.state import build_model

    config = base_config()
    config.model.update(d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=16,
                        position_embedding="learned", max_position=32)
    config.model.mixer_options.attention.position = "none"
    config.data.seq_len = 64
    with pytest.raises(ValueError, match="max_position=32 must cover"):
        validate(config)
    config.model.position_embedding = "absolute"
    with pytest.raises(ValueError, match="position_embedding='absolute'; allowed"):
        validate(config)
    for kind in ("learned", "sinusoidal"):
        config.model.update(position_embedding=kind)
        model = build_model(config)
        tokens = jnp.arange(16)[None] % 7
        params = _random_params(model, like=tokens)
        logits = model.apply(params, tokens)[0]
        shuffled = model.apply(params, tokens, positions=jnp.arange(16)[None][:, ::-1])[0]
        assert not np.allclose(logits, shuffled, atol=1e-4)  # positions matter: NoPE + embeddings
    config.model.position_embedding = "learned"
    with pytest.raises(ValueError, match="exceed the learned position table"):
        model = build_model(config)
        model.apply(_random_params(model, like=tokens), jnp.zeros((1, 40), jnp.int32))


def test_extrapolation_config_family():
    """configs/extrapolation/config.py: every scheme and task validates; bad variants are
    named."""
    from longjax.train.cli import load_config_file
    from longjax.train.config import validate

    from conftest import REPO

    path = f"{REPO}/configs/extrapolation/config.py"
    for scheme in ("rope", "alibi", "t5", "kerple", "fire", "xpos", "nope", "sinusoidal",
                   "learned"):
        config = load_config_file(f"{path}:scheme={scheme}")
        validate(config)
        assert config.model.mixer_options.attention.train_length == 256
    config = load_config_file(f"{path}:scheme=t5,task=reverse,max_size=10,steps=70")
    validate(config)
    assert (config.data.task, config.data.seq_len, config.train.steps) == ("reverse", 21, 70)
    assert config.model.mixer_options.attention.position == "t5"
    with pytest.raises(ValueError, match="scheme='rotary'; allowed"):
        load_config_file(f"{path}:scheme=rotary")
    with pytest.raises(ValueError, match="task='lego'; allowed"):
        load_config_file(f"{path}:task=lego")


def test_fire_bias_is_its_mlp():
    """FireBias sums its MLP one hidden unit at a time: equal to Dense -> ReLU -> Dense
    on the normalised distance, per head."""
    from longjax.nn.position_bias import FireBias

    fire = FireBias(num_heads=3, hidden=8, threshold_init=6.0)
    q, k = jnp.asarray([[0, 5, 9, 20]]), jnp.asarray([[0, 3, 5, 9, 20]])
    params = fire.init(jax.random.key(1), q, k)
    p = params["params"]
    u = P.fire_inputs(q, k, jax.nn.softplus(p["c"]), jnp.abs(p["threshold"]))[..., None]
    hidden = jax.nn.relu(u @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    expected = jnp.moveaxis(hidden @ p["out"]["kernel"] + p["out"]["bias"], -1, 1)
    np.testing.assert_allclose(fire.apply(params, q, k), expected, atol=1e-5)
