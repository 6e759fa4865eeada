"""The decoder LM: mixer patterns, the registry, and cached decoding."""

import dataclasses

import flax.linen as nn
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


CYCLE, REPEATS = 2, 2  # the scan tests' pattern "retention,attention" over 4 layers


def _unrolled(scanned):
    """The layer scan's `layers/block_<j>` parameters -> unrolled `layer_<i>`, layer
    r * CYCLE + j being repeat r of block j (written here, not taken from longjax.nn.lm)."""
    tree = {k: v for k, v in scanned.items() if k != "layers"}
    for r in range(REPEATS):
        for j in range(CYCLE):
            tree[f"layer_{r * CYCLE + j}"] = jax.tree.map(lambda x, r=r: x[r],
                                                          scanned["layers"][f"block_{j}"])
    return tree


def test_scanned_layers_equal_unrolled_layers_loss_grads_and_cache():
    kwargs = dict(mixer="retention,attention", num_layers=CYCLE * REPEATS, remat=True)
    unrolled, scanned = _tiny_lm(**kwargs), _tiny_lm(**kwargs, scan_layers=True)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 259)
    stacked = nn.unbox(jax.jit(scanned.init)(jax.random.key(1), tokens)["params"])
    params = _unrolled(stacked)

    def loss(lm, p):
        logits, _ = lm.apply({"params": p}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                             tokens[:, 1:, None], -1))

    want, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p)))(params)
    got, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(stacked)
    assert np.isfinite(want)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5),
                 _unrolled(got_grads), want_grads)
    # a cached call from caches that differ per layer (random float states) returns the
    # unrolled model's per-layer cache tuple
    cache = unrolled.init_cache(2, 12)
    leaves, treedef = jax.tree.flatten(cache)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    cache = treedef.unflatten([jax.random.normal(key, x.shape, x.dtype)
                               if jnp.issubdtype(x.dtype, jnp.floating) else x
                               for key, x in zip(keys, leaves, strict=True)])
    want = jax.jit(unrolled.apply)({"params": params}, tokens, cache=cache)
    got = jax.jit(scanned.apply)({"params": stacked}, tokens, cache=cache)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5), got, want)
    # the states training carries (train.initial_state="carry": `init_state_cache`, None
    # for the attention layers), continuing the rows' document (segment 1) or not (-1)
    def states(segment):
        return tuple(None if layer is None else dict(
            layer, state=jax.random.normal(jax.random.key(i), layer["state"].shape),
            segment=jnp.full_like(layer["segment"], segment))
            for i, layer in enumerate(unrolled.init_state_cache(2)))

    segment_ids = jnp.ones_like(tokens)
    carried = jax.jit(lambda lm, p, c: lm.apply({"params": p}, tokens, segment_ids=segment_ids,
                                                cache=c), static_argnums=0)
    want = carried(unrolled, params, states(1))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5),
                 carried(scanned, stacked, states(1)), want)
    fresh = carried(unrolled, params, states(-1))[0]  # another document: states reset
    assert not np.allclose(want[0], fresh, atol=1e-3)  # so the carried states were read


def test_scanned_layers_keep_each_layers_sharding_with_the_layer_axis_replicated():
    from longjax.parallel.mesh import make_mesh
    from longjax.train import build_model, state_shardings

    config = load_config_file(f"{REPO}/configs/quickstart.py:{TINY}")
    config.model.update(mixer="retention,attention", num_layers=CYCLE * REPEATS)
    config.parallel.update(data=2, fsdp=2, tensor=2)
    mesh = make_mesh(config.parallel.to_dict())
    unrolled = state_shardings(config, build_model(config), mesh).params
    config.model.scan_layers = True
    scanned = state_shardings(config, build_model(config), mesh).params
    for j in range(CYCLE):
        jax.tree.map(lambda s, u: assert_spec(s.spec, (None, *u.spec)),
                     scanned["layers"][f"block_{j}"], unrolled[f"layer_{j}"])


def assert_spec(got, want):
    assert tuple(got) + (None,) * (len(want) - len(got)) == tuple(want), (got, want)


def test_scanned_layers_refuse_hugging_face_checkpoints():
    from longjax.hf.config import hf_config
    from longjax.train.config import with_hf_init

    config = load_config_file(f"{REPO}/configs/quickstart.py:{TINY},model.scan_layers=True")
    with pytest.raises(ValueError, match="scan_layers=True stacks the layers"):
        hf_config(config.model)
    config.init.hf = "any/checkpoint"
    with pytest.raises(ValueError, match="config.model.scan_layers must be False"):
        with_hf_init(config)
