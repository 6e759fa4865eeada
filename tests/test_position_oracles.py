"""Every position scheme and training-free method of the attention mixer against a dense
float64 numpy definition written here from its paper (independently of
`longjax.ops.positions`): for each query t and key s, the positions the pair is encoded
at, whether s is visible, and the score's bias and scale; then one softmax.

The methods are configured as the evaluation applies them (`longjax.eval.methods`), so a
changed preset (a sink count, a cap) fails here too. The mixer runs its default path
(the blockwise "xla" attention on CPU), in the full forward and, for the cache rules,
in decoding. Queries and keys are scaled up so attention is peaked and an off-by-one
moves the output well past the tolerance.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_generate import _random_params

from longjax.eval.methods import method_overrides
from longjax.nn import build_mixer
from longjax.ops import positions as P

T, L, D, E = 40, 12, 8, 16  # sequence, training length, head dim, model width
BASE = 100.0  # a small RoPE base: more pairs turn within these short lengths
X = np.random.default_rng(0).standard_normal((1, T, E)).astype(np.float32)


def _mixer(**options):
    config = ml_collections.ConfigDict(dict(
        d_model=E, num_heads=2, num_kv_heads=1, head_dim=D, dtype="float32",
        mixer_options={"attention": {"rope_base": BASE, **options}}))
    return build_mixer("attention", config, parent=None)


def _params(mixer, sharpen=3.0):
    params = _random_params(mixer, like=jnp.asarray(X))
    p = params["params"]
    for name in ("query", "key"):
        p[name]["kernel"] = p[name]["kernel"] * sharpen
    return params


# ---- definitions from the papers ----------------------------------------------------------

def theta(base=BASE, dim=D):
    """RoFormer (Su et al. 2021): theta_i = base^(-2i/d)."""
    return base ** (-np.arange(0, dim, 2) / dim)


def rotate(x, position, freqs):
    """x `[..., D]` rotated by position * freqs, dims i and i + D/2 forming pair i."""
    a = np.asarray(position, np.float64)[..., None] * freqs
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)],
                          -1)


def yarn_freqs(s, beta_fast=32, beta_slow=1):
    """YaRN (Peng et al. 2023) as its released code ramps: pair i keeps theta_i up to the
    pair index where theta turns beta_fast times over L (floored) and takes theta_i / s
    from the one where it turns beta_slow times (ceiled), linear in i in between."""
    def index(turns):
        return D * math.log(L / (turns * 2 * math.pi)) / (2 * math.log(BASE))

    lo, hi = max(math.floor(index(beta_fast)), 0), min(math.ceil(index(beta_slow)), D - 1)
    interpolate = np.clip((np.arange(D // 2) - lo) / max(hi - lo, 1e-3), 0, 1)
    return interpolate * theta() / s + (1 - interpolate) * theta()


def llama3_freqs(s, low=1.0, high=4.0):
    """Llama 3.1 (Meta 2024): wavelengths under L / high kept, over L / low divided by s,
    in between (1 - a) theta / s + a theta with a = (L / wavelength - low) / (high - low)."""
    out = []
    for f in theta():
        wavelength = 2 * math.pi / f
        if wavelength < L / high:
            out.append(f)
        elif wavelength > L / low:
            out.append(f / s)
        else:
            a = (L / wavelength - low) / (high - low)
            out.append((1 - a) * f / s + a * f)
    return np.array(out)


def dense_pairs(method):
    """`(q_pos, k_pos, visible, logit_scale, freqs)`: `[T, T]` positions each (query t,
    key s) is encoded at, the visible pairs, a per-query logit scale `[T, 1]`, and the
    rotary frequencies, for a method applied to a model trained at L."""
    t, s = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    q_pos, k_pos, visible = t.astype(np.float64), s.astype(np.float64), s <= t
    scale, freqs = np.ones((T, 1)), theta()
    if method == "linear:4":  # Position Interpolation (Chen et al. 2023): positions / s
        q_pos, k_pos = q_pos / 4, k_pos / 4
    elif method == "ntk:4":  # NTK-aware: base * s^(d / (d - 2))
        freqs = theta(BASE * 4 ** (D / (D - 2)))
    elif method == "dynamic_ntk:4":  # s' = s n / L - (s - 1) at the current length n = T
        freqs = theta(BASE * max(1.0, 4 * T / L - 3) ** (D / (D - 2)))
    elif method == "yarn:4":  # frequencies + temperature sqrt(1/t) = 0.1 ln s + 1 on q and k
        freqs, scale = yarn_freqs(4), np.full((T, 1), (0.1 * math.log(4) + 1) ** 2)
    elif method == "llama3:4":
        freqs = llama3_freqs(4)
    elif method == "giraffe":
        # Giraffe's truncated basis (Pal et al. 2023): theta_i >= b kept, a < theta_i < b
        # set to rho, theta_i <= a set to 0; here b = 2 pi / L, a = rho = 2 pi / n (n = T).
        a, b = 2 * math.pi / T, 2 * math.pi / L
        freqs = np.array([f if f >= b else a if f > a else 0.0 for f in theta()])
        assert 0 < (freqs == a).sum() < D // 2 and (freqs == 0).any()  # every band is used
    elif method == "logn":  # logits times log(n) / log(L) for n = t + 1 visible tokens past L
        scale = np.maximum(1.0, np.log(np.arange(T) + 1.0) / math.log(L))[:, None]
    elif method == "window":  # the last L tokens
        visible &= t - s < L
    elif method == "lm_infinite":
        # LM-Infinite (Han et al. 2023): a Lambda mask (the 10 starting tokens and the last
        # L) and no distance beyond L; the released code encodes the query at min(t, L)
        # against the starting tokens.
        sinks = s < 10
        visible &= sinks | (t - s < L)
        q_pos = np.where(sinks, np.minimum(t, L), t)
    elif method == "streaming":
        # StreamingLLM (Xiao et al. 2023): the cache holds the 4 first tokens and the last
        # L - 4; positions are ranks inside the cache.
        for query in range(T):
            cache = sorted({*range(min(4, query + 1)), *range(max(0, query - (L - 4) + 1),
                                                             query + 1)})
            visible[query] = np.isin(np.arange(T), cache)
            rank = {key: i for i, key in enumerate(cache)}
            k_pos[query] = [rank.get(key, 0) for key in range(T)]
            q_pos[query] = rank[query]
    elif method == "self_extend:3:4":
        # Self-Extend (Jin et al. 2024): neighbours (t - s < W = 4) as trained; beyond,
        # floor(s / G) against floor(t / G) + W - floor(W / G), G = 3.
        far = t - s >= 4
        q_pos = np.where(far, t // 3 + 4 - 4 // 3, t)
        k_pos = np.where(far, s // 3, s)
    else:
        assert method == "none", method
    return q_pos, k_pos, visible, scale, freqs


def dense_attention(params, x, q_pos, k_pos, visible, scale, freqs, bias=None,
                    encode=None):
    """The mixer's math in float64: scores = <enc(q_t), enc(k_s)> scale_t / sqrt(D)
    + bias[h, t, s] over the visible keys, one softmax, values, output projection."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x = np.asarray(x[0], np.float64)
    q = np.einsum("te,ehd->thd", x, p["query"]["kernel"])
    k = np.einsum("te,ekd->tkd", x, p["key"]["kernel"])[:, 0]
    v = np.einsum("te,ekd->tkd", x, p["value"]["kernel"])[:, 0]
    encode = encode or (lambda vec, pos, t, s, key: rotate(vec, pos, freqs))
    H = q.shape[1]
    scores = np.full((H, T, T), -np.inf)
    for t in range(T):
        keys = encode(k, k_pos[t], t, np.arange(T), True)  # [S, D]
        for h in range(H):
            query = encode(q[t, h][None], q_pos[t], t, np.arange(T), False)  # [S, D]
            row = (query * keys).sum(-1) * scale[t] / math.sqrt(D)
            if bias is not None:
                row = row + bias[h, t]
            scores[h, t] = np.where(visible[t], row, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("hts,sd,hde->te", weights, v, p["out"]["kernel"])


def _stream(mixer, params, x, prefill=5):
    step = jax.jit(lambda x, c: mixer.apply(params, x, cache=c))
    cache, outs = mixer.init_cache(1, 2 * T), []
    for lo, hi in zip([0, *range(prefill, T)], range(prefill, T + 1), strict=True):
        y, cache = step(x[:, lo:hi], cache)
        outs.append(y)
    return np.concatenate(outs, 1)


METHODS = ["none", "linear:4", "ntk:4", "dynamic_ntk:4", "yarn:4", "llama3:4", "giraffe", "logn",
           "window", "lm_infinite", "streaming", "self_extend:3:4"]


@pytest.mark.parametrize("method", METHODS)
def test_training_free_methods_equal_their_definition(method):
    mixer = _mixer(**method_overrides(method, train_length=L, eval_length=T))
    params = _params(mixer)
    expected = dense_attention(params, X, *dense_pairs(method))
    np.testing.assert_allclose(mixer.apply(params, jnp.asarray(X))[0][0], expected, atol=1e-4)
    if method in ("lm_infinite", "streaming", "window", "self_extend:3:4", "logn"):
        np.testing.assert_allclose(_stream(mixer, params, jnp.asarray(X))[0], expected,
                                   atol=1e-4)


def test_dynamic_ntk_prefills_and_decodes_at_the_current_length():
    """Dynamic NTK in chunked prefill (chunks of 7) and decoding: the outputs of a call
    that ends at length n equal the definition at length n (all its queries and keys
    encoded with n's base)."""
    mixer = _mixer(**method_overrides("dynamic_ntk:4", train_length=L, eval_length=T))
    params = _params(mixer)
    streamed = _stream(mixer, params, jnp.asarray(X), prefill=L + 3)[0]
    step = jax.jit(lambda x, c: mixer.apply(params, x, cache=c))
    cache, chunks = mixer.init_cache(1, T), []
    for lo in range(0, T, 7):
        y, cache = step(jnp.asarray(X[:, lo:lo + 7]), cache)
        chunks.append(y[0])
    chunked = np.concatenate(chunks)

    def definition(n):
        q_pos, k_pos, visible, scale, _ = dense_pairs("none")
        freqs = theta(BASE * max(1.0, 4 * n / L - 3) ** (D / (D - 2)))
        return dense_attention(params, X, q_pos, k_pos, visible, scale, freqs)

    for n in (L + 3, L + 4, T):
        np.testing.assert_allclose(streamed[n - 1], definition(n)[n - 1], atol=1e-4)
    for lo in (7, 14, 35):  # chunks ending at 14, 21 (past L = 12) and 40
        n = min(lo + 7, T)
        np.testing.assert_allclose(chunked[lo:n], definition(n)[lo:n], atol=1e-4)


# ---- position schemes -----------------------------------------------------------------------

def _scheme_bias(position, p, start):
    """Score biases `[H, T, T]` from the papers, with the module's parameters `p`, for
    queries and keys at `start` + 0 .. T - 1."""
    t, s = np.meshgrid(start + np.arange(T), start + np.arange(T), indexing="ij")
    n = t - s
    if position == "alibi":  # Press et al. 2022: -m_h (t - s), m_h = 2^(-8h / H)
        return -np.array([2.0 ** -4, 2.0 ** -8])[:, None, None] * n
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p["position_bias"])
    softplus = lambda z: np.log1p(np.exp(z))  # noqa: E731
    if position == "t5":  # Raffel et al. 2020, causal buckets: 32 buckets, max distance 128
        m = np.maximum(n, 0)
        exact = 16
        log_bucket = exact + (np.log(np.maximum(m, 1) / exact) / math.log(128 / exact)
                              * (32 - exact)).astype(int)
        bucket = np.where(m < exact, m, np.minimum(log_bucket, 31))
        return np.moveaxis(p["table"][bucket], -1, 0)
    if position == "kerple":  # Chi et al. 2022: -r1 log(1 + r2 |t - s|)
        r1, r2 = softplus(p["r1"]), softplus(p["r2"])
        return -r1[:, None, None] * np.log1p(r2[:, None, None] * np.abs(n))
    if position == "fire":  # Li et al. 2023: f(psi(t - s) / psi(max(L, t))), psi = log(cx + 1)
        c, threshold = softplus(p["c"]), abs(p["threshold"])
        assert start == 0 or start > threshold  # both branches of max(L, t) are tested
        psi = lambda z: np.log(c * z + 1)  # noqa: E731
        u = psi(np.maximum(n, 0)) / psi(np.maximum(threshold, t))
        hidden = np.maximum(u[..., None] * p["hidden"]["kernel"][0] + p["hidden"]["bias"], 0)
        return np.moveaxis(hidden @ p["out"]["kernel"] + p["out"]["bias"], -1, 0)
    raise AssertionError(position)


def xpos_encode(offset=0.0):
    """xPos (Sun et al. 2022): RoPE, then zeta_i^(n / 512) on a query at n and
    zeta_i^(-m / 512) on a key at m, zeta_i = (i / (D/2) + 0.4) / 1.4; in float64 taken
    relative to the query (a common shift of n and m changes nothing)."""
    zeta = (np.arange(D // 2) / (D // 2) + 0.4) / 1.4

    def encode(vec, pos, t, s, key):
        rel = (pos - (t + offset)) * (-1 if key else 1)
        decay = zeta ** (np.asarray(rel, np.float64)[..., None] / 512)
        return rotate(vec, pos, theta()) * np.concatenate([decay, decay], -1)

    return encode


@pytest.mark.parametrize("position", ["rope", "xpos", "alibi", "t5", "kerple", "fire", "none"])
@pytest.mark.parametrize("start", [0, 400_000])
def test_position_schemes_equal_their_definition(position, start):
    """The mixer at positions start .. start + T - 1 equals the definitions, which depend
    on relative positions only (FIRE's normaliser on the query's position too: its
    threshold L starts at 512, so start = 0 takes psi(L) and 4e5 takes psi(t))."""
    mixer = _mixer(position=position)
    params = _params(mixer)
    positions = jnp.asarray(start + np.arange(T))[None]
    q_pos, k_pos, visible, scale, freqs = dense_pairs("none")
    if position == "none":
        freqs = np.zeros(D // 2)
    bias = encode = None
    if position in ("alibi", "t5", "kerple", "fire"):
        freqs = np.zeros(D // 2)
        bias = _scheme_bias(position, params["params"], start)
    if position == "xpos":
        encode = xpos_encode()
    expected = dense_attention(params, X, q_pos, k_pos, visible, scale, freqs, bias, encode)
    got = mixer.apply(params, jnp.asarray(X), positions=positions)[0][0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_xpos_is_finite_at_any_position():
    """Positions near 1e6 and 2^30 (the decay factors alone overflow float32 past ~4e4)."""
    mixer = _mixer(position="xpos")
    params = _params(mixer)
    expected = dense_attention(params, X, *dense_pairs("none")[:4], theta(),
                               encode=xpos_encode())
    for start in (10**6, 2**30):
        positions = jnp.asarray(start + np.arange(T))[None]
        np.testing.assert_allclose(mixer.apply(params, jnp.asarray(X), positions=positions)[0][0],
                                   expected, atol=1e-4)
        # decoding: the cache holds keys from far back
        cache = mixer.init_cache(1, T)
        y, _ = mixer.apply(params, jnp.asarray(X), positions=positions, cache=cache)
        np.testing.assert_allclose(y[0], expected, atol=1e-4)
    with pytest.raises(ValueError, match="position='xpos' encodes at most"):
        mixer.apply(params, jnp.zeros((1, P.XPOS_MAX_SPAN + 2, E)))


def test_rope_angles_and_sinusoids_are_exact_at_large_positions():
    """cos / sin of position * theta against float64 at 4e5 .. 2^31 - 1, where float32
    itself is spaced 0.03 .. 128 apart."""
    positions = np.array([[0, 1, 255, 400_000, 400_001, 10**7, 2**31 - 1]])
    inv_freq = P.rope_frequencies(64, base=500000.0)
    cos, sin = P.rope_angles(jnp.asarray(positions), inv_freq)
    angles = positions[..., None].astype(np.float64) * inv_freq
    np.testing.assert_allclose(cos, np.cos(angles), atol=3e-6)
    np.testing.assert_allclose(sin, np.sin(angles), atol=3e-6)
    pe = P.sinusoidal_embedding(jnp.asarray(positions), 16)
    w = 10000.0 ** (-np.arange(0, 16, 2) / 16)
    a = positions[..., None].astype(np.float64) * w
    np.testing.assert_allclose(pe, np.stack([np.sin(a), np.cos(a)], -1).reshape(1, 7, 16),
                               atol=3e-6)


def test_learned_positions_past_the_table_are_an_error_not_a_clamp():
    from longjax.nn.position_bias import AbsolutePositions

    table = AbsolutePositions("learned", 4, 8)
    params = table.init(jax.random.key(0), jnp.arange(8)[None])
    with pytest.raises(ValueError, match=r"positions 0..8 fall outside the learned position "
                                         r"table of config.model.max_position=8 rows"):
        table.apply(params, jnp.arange(9)[None])
    traced = jax.jit(table.apply)(params, jnp.arange(10)[None])[0]
    assert np.isfinite(traced[:8]).all() and np.isnan(traced[8:]).all()


def test_giraffe_at_the_training_length_keeps_the_pairs_that_turn_within_it():
    """At n = L the band (a, b) is empty: pairs turning at least once over L keep theta,
    the others get 0 (the evaluation's 1x column)."""
    overrides = method_overrides("giraffe", train_length=L, eval_length=L)
    params = dict(overrides["rope_scaling_params"])
    got = P.rope_frequencies(D, base=BASE, scaling="truncated", params=params)
    np.testing.assert_allclose(got, np.where(theta() >= 2 * math.pi / L, theta(), 0.0))
    assert _mixer(**overrides).apply(_params(_mixer(**overrides)), jnp.asarray(X[:, :L]))
