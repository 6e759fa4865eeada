"""Stuffed Mamba's training-free methods (Chen et al. 2024) on the Mamba-2 mixer
(longjax.nn.ssm.Mamba2Mixer options, set by longjax.eval.methods): the chunked SSD, the
token-by-token reference and cached decode steps each against a dense numpy Mamba-2
block written from Dao & Gu 2024 with dt, A and B scaled and each channel's state
clipped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.eval.methods import apply_method
from longjax.nn.ssm import Mamba2Mixer
from longjax.parallel import recurrent
from longjax.parallel.mesh import make_mesh
from longjax.train.config import base_config

B, T, DM, N, P, G, CHUNK = 2, 10, 8, 4, 4, 2, 4  # E = 16 channels, H = 4 heads
SCALES = {"delta_scale": 1.7, "decay_scale": 3.0, "input_scale": 0.5}


def _silu(x):
    return x / (1.0 + np.exp(-x))


def numpy_mamba2(p, x, *, delta_scale=1.0, decay_scale=1.0, input_scale=1.0,
                 state_norm=None):
    """Mamba-2 (Dao & Gu 2024, Section 7) token by token: h_t = exp(s_dt dt_t s_A A) h_{t-1}
    + s_dt dt_t x_t (s_B B_t)^T per head, y_t = h_t C_t + D x_t, each state row h[h, p, :]
    clipped to L2 norm `state_norm` after its update; gated RMSNorm, output projection."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    E, H = 2 * DM, 2 * DM // P
    z, xBC, dt = np.split(x @ p["in_proj"]["kernel"], [E, 2 * E + 2 * G * N], axis=-1)
    w = p["conv"]["kernel"]  # [K, channels], w[-1] taps the current token
    conv = sum(np.pad(xBC, ((0, 0), (s, 0), (0, 0)))[:, :T] * w[-1 - s] for s in range(len(w)))
    u, Bm, Cm = np.split(_silu(conv + p["conv_bias"]), [E, E + G * N], axis=-1)
    u = u.reshape(B, T, H, P)
    Bm = np.repeat(Bm.reshape(B, T, G, N), H // G, axis=2) * input_scale
    Cm = np.repeat(Cm.reshape(B, T, G, N), H // G, axis=2)
    dt = np.logaddexp(0.0, dt + p["dt_bias"]) * delta_scale  # [B, T, H]
    A = -np.exp(p["A_log"]) * decay_scale  # [H]
    y = np.zeros((B, T, H, P))
    for b in range(B):
        h = np.zeros((H, P, N))
        for t in range(T):
            h = (np.exp(dt[b, t] * A)[:, None, None] * h
                 + (dt[b, t][:, None] * u[b, t])[..., None] * Bm[b, t][:, None, :])
            if state_norm is not None:
                h = h * np.minimum(1.0, state_norm / np.linalg.norm(h, axis=-1, keepdims=True))
            y[b, t] = np.einsum("hpn,hn->hp", h, Cm[b, t]) + p["D"][:, None] * u[b, t]
    y = y.reshape(B, T, E) * _silu(z)
    y = y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + 1e-6) * p["norm"]["scale"]
    return y @ p["out_proj"]["kernel"]


@pytest.fixture(scope="module")
def block():
    """Inputs and random parameters of the mixer's shapes (traced, not compiled)."""
    x = jax.random.normal(jax.random.key(0), (B, T, DM))
    mixer = Mamba2Mixer(d_model=DM, d_state=N, head_dim=P, n_groups=G, chunk_size=CHUNK)
    shapes = jax.eval_shape(mixer.init, jax.random.key(1), x)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(0.0, 0.5, a.value.shape).astype(np.float32),
                          shapes, is_leaf=lambda a: hasattr(a, "value"))
    return x, params


@pytest.mark.parametrize("options", [SCALES, {**SCALES, "state_norm": 0.02}])
def test_every_path_follows_the_dense_definition(block, options):
    """The chunked SSD (impl xla, T = 10 over chunks of 4; with `state_norm` the
    token-by-token scan), and through a cache a prefill of T - 1 tokens (the same path,
    from the cached state) then one decode step (the reference scan): one compilation."""
    x, params = block
    mixer = Mamba2Mixer(d_model=DM, d_state=N, head_dim=P, n_groups=G, chunk_size=CHUNK,
                        impl="xla", **options)

    @jax.jit
    def paths(x):
        full, _ = mixer.apply({"params": params}, x)
        prefill, cache = mixer.apply({"params": params}, x[:, :-1],
                                     cache=mixer.init_cache(B, T))
        step, _ = mixer.apply({"params": params}, x[:, -1:], cache=cache)
        return full, jnp.concatenate([prefill, step], axis=1)

    want = numpy_mamba2(params, np.asarray(x, np.float64), **options)
    for out in paths(x):
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    plain = numpy_mamba2(params, np.asarray(x, np.float64),
                         **({**options, "state_norm": None} if "state_norm" in options else {}))
    assert np.abs(plain - want).max() > 1e-3  # each option set acts


def test_the_methods_reach_mamba2_layers_and_misuse_is_named():
    config = base_config().model
    config.update(vocab_size=32, d_model=DM, num_layers=2, mixer="(mamba2,attention)*1",
                  mlp="none", num_heads=2, num_kv_heads=2, head_dim=4, mlp_dim=16)
    method = apply_method(config, "decay_scale:2+input_scale:0.5+state_norm:3",
                          train_length=8, eval_length=16)
    options = method.mixer_options.mamba2
    assert (options.decay_scale, options.input_scale, options.state_norm) == (2.0, 0.5, 3.0)
    with pytest.raises(ValueError, match="decimation needs a mamba layer"):
        apply_method(config, "decimation:0:4", train_length=8, eval_length=16)
    with pytest.raises(ValueError, match="mixer_options.mamba2.delta_scale must be a number"):
        Mamba2Mixer(d_model=DM, d_state=N, head_dim=P, delta_scale=0).init(
            jax.random.key(0), np.zeros((1, 4, DM)))
    with jax.set_mesh(make_mesh({"sequence": 2}, jax.devices()[:2])), pytest.raises(
            ValueError, match="ssd: state_norm .* has no sequence-parallel form"):
        recurrent.ssd(np.ones((1, 4, 2, 2)), np.ones((1, 4, 2)), -np.ones(2),
                      *(np.ones((1, 4, 1, 2)),) * 2, state_norm=1.0)
