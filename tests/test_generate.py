"""Generation: the generate() path (left-padded batch, chunked prefill, decode loop) equals
the full forward pass; sampling; rolling / StreamingLLM attention caches; scripts/generate.py.

(Prefill + token-by-token decode == full forward for each mixer and hybrid preset is
tested in tests/test_lm.py, test_linear_mixers.py and test_ssm_mixers.py.)
"""

import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from longjax.data import tokenizer
from longjax.generate import generate, left_pad, load_model, sample_logits
from longjax.nn import DecoderLM, build_mixer

from conftest import REPO

# Attention (RoPE at left-padded positions), retention (RoPE + decay, chunked), Mamba
# (short convolution and selective scan): the position- and state-carrying paths.
MODEL = dict(vocab_size=264, d_model=16, num_layers=3, num_heads=2, num_kv_heads=1,
             head_dim=8, mlp_dim=32, dtype="float32", norm_eps=1e-6, tie_embeddings=False,
             remat=False, mixer="attention,retention,mamba",
             mixer_options={"retention": {"chunk_size": 4}, "mamba": {"d_state": 4}})
PROMPTS = [np.arange(3, 12), np.arange(40, 45)]  # lengths 9 and 5
NEW = 6


def _lm(**overrides):
    return DecoderLM(ml_collections.FrozenConfigDict({**MODEL, **overrides}))


def _random_params(module, seed=0, like=None):
    """Random parameters of the module's shapes, without compiling its init."""
    like = jnp.zeros((1, 4), jnp.int32) if like is None else like
    abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), like))
    rng = np.random.default_rng(seed)

    def draw(s):
        scale = 0.5 * (s.shape[0] ** -0.5 if len(s.shape) > 1 else 1.0)
        return jnp.asarray(rng.standard_normal(s.shape) * scale, s.dtype)

    return jax.tree.map(draw, abstract)


@pytest.fixture(scope="module")
def lm_params():
    lm = _lm()
    return lm, _random_params(lm)


def _run(lm_params, **kwargs):
    lm, params = lm_params
    return generate(lm, params, PROMPTS, max_new_tokens=NEW, prefill_chunk=4,
                    return_logits=True, **kwargs)


def test_left_pad():
    tokens, segments, positions = left_pad([[5, 6, 7], [8]], pad_id=0, multiple=4)
    np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(segments, [[0, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(positions, [[0, 0, 1, 2], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="non-empty"):
        left_pad([[]])


def test_generate_equals_full_forward_row_by_row(lm_params):
    """A batch of prompts of lengths 9 and 5, left-padded to 12 and prefilled in chunks of
    4 (row 2's first chunk is all padding), then 6 greedy steps: every step's logits equal
    the full forward pass over that row alone, so each row gets the tokens it gets alone."""
    lm, params = lm_params
    out = _run(lm_params)
    assert out.tokens.shape == (2, NEW) and out.logits.shape == (2, NEW, 264)
    # Each row alone, right-padded into one batch (padding after a row changes nothing).
    rows = [np.concatenate([p, out.tokens[b]]) for b, p in enumerate(PROMPTS)]
    tokens, segments, _ = left_pad([r[::-1] for r in rows], pad_id=0)
    full, _ = jax.jit(lm.apply)(params, tokens[:, ::-1], segment_ids=segments[:, ::-1])
    for b, p in enumerate(PROMPTS):
        expected = full[b, len(p) - 1: len(p) - 1 + NEW]
        np.testing.assert_allclose(out.logits[b], expected, atol=2e-5, rtol=1e-4)
        np.testing.assert_array_equal(out.tokens[b], np.argmax(expected, -1))


def test_greedy_eos_and_seeds(lm_params):
    greedy = _run(lm_params)
    np.testing.assert_array_equal(_run(lm_params).tokens, greedy.tokens)
    # Stop on EOS per row: make row 0's third token the EOS.
    eos = int(greedy.tokens[0, 2])
    stopped = _run(lm_params, eos_id=eos, pad_id=-1)
    first = int(np.argmax(np.asarray(greedy.tokens[0]) == eos))
    np.testing.assert_array_equal(stopped.tokens[0, :first + 1], greedy.tokens[0, :first + 1])
    assert (np.asarray(stopped.tokens[0, first + 1:]) == -1).all()
    assert int(stopped.lengths[0]) == first + 1
    # Seeds reproduce sampling; top_k=1 is greedy.
    hot = dict(temperature=3.0, top_p=0.99)
    a = _run(lm_params, rng=jax.random.key(1), **hot).tokens
    np.testing.assert_array_equal(_run(lm_params, rng=jax.random.key(1), **hot).tokens, a)
    assert not np.array_equal(_run(lm_params, rng=jax.random.key(2), **hot).tokens, a)
    np.testing.assert_array_equal(
        _run(lm_params, rng=jax.random.key(1), temperature=3.0, top_k=1).tokens, greedy.tokens)


def test_sample_logits_respects_top_k_and_top_p():
    probs = np.array([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = jnp.broadcast_to(jnp.log(probs), (512, 5))
    sample = jax.jit(lambda t, k, p: sample_logits(logits, jax.random.key(0), temperature=t,
                                                   top_k=k, top_p=p))

    def support(temperature=1.0, top_k=0, top_p=1.0):
        return set(np.unique(sample(temperature, top_k, top_p)).tolist())

    assert support(top_k=2) == {0, 1}
    assert support(top_p=0.7) == {0, 1}
    assert support(top_p=0.85) == {0, 1, 2}
    assert support(top_p=0.01) == {0}
    assert support() == {0, 1, 2, 3, 4}
    assert support(temperature=0.0) == {0}  # greedy


S, W = 2, 4  # sinks and window of the bounded attention caches
X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 17, 16)), jnp.float32)


def _attention(mode):
    config = ml_collections.ConfigDict(dict(
        d_model=16, num_heads=2, num_kv_heads=1, head_dim=8, dtype="float32",
        mixer_options={"attention": {"window": W, "num_sinks": S, "cache_mode": mode,
                                     "impl": "reference"}}))
    return build_mixer("attention", config, parent=None)


def _stream(mixer, params, x, prefill=5):
    """A prefill of `prefill` tokens then one token at a time through `mixer`'s cache."""
    step = jax.jit(lambda x, c: mixer.apply(params, x, cache=c))
    cache = mixer.init_cache(x.shape[0], 10_000)
    outs = []
    for lo, hi in zip([0, *range(prefill, x.shape[1])], range(prefill, x.shape[1] + 1),
                      strict=True):
        y, cache = step(x[:, lo:hi], cache)
        outs.append(y)
    return jnp.concatenate(outs, 1), cache


@pytest.fixture(scope="module")
def attention_runs():
    """The windowed (Lambda-mask) full forward of X and its jitted function, and X streamed
    through the rolling and the streaming cache."""
    full = _attention("full")
    params = _random_params(full, like=X)
    forward = jax.jit(lambda x: full.apply(params, x)[0])
    runs = {mode: _stream(_attention(mode), params, X) for mode in ("rolling", "streaming")}
    return forward, forward(X), runs


def test_rolling_cache_equals_windowed_attention(attention_runs):
    """The rolling cache (num_sinks + window slots) gives the full forward's math of the
    sliding window with sinks (the Lambda mask), however long the stream."""
    _, expected, runs = attention_runs
    got, cache = runs["rolling"]
    assert cache["k"].shape == (2, S + W, 1, 8)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bounded_caches_hold_through_chunked_prefill(attention_runs):
    """Chunks of 7 tokens, more than the cache's num_sinks + window = 6 slots: the rolling
    cache still gives the windowed full forward, and the streaming cache what it gives
    token by token (within a chunk too, keys leave the window and sinks stay)."""
    _, expected, runs = attention_runs
    params = _random_params(_attention("full"), like=X)
    for mode, want in (("rolling", expected), ("streaming", runs["streaming"][0])):
        mixer = _attention(mode)
        step = jax.jit(lambda x, c, m=mixer: m.apply(params, x, cache=c))
        cache, outs = mixer.init_cache(X.shape[0], 10_000), []
        for lo in range(0, X.shape[1], 7):
            y, cache = step(X[:, lo:lo + 7], cache)
            outs.append(y)
        assert cache["k"].shape == (2, S + W, 1, 8)
        np.testing.assert_allclose(jnp.concatenate(outs, 1), want, atol=1e-5)


def test_streaming_cache_reassigns_positions_inside_the_cache(attention_runs):
    """StreamingLLM: at every step the output equals attention over the compacted sequence
    [sinks, last `window` tokens] at positions 0 .. S + W - 1, i.e. the windowed full
    forward over those tokens alone."""
    forward, expected, runs = attention_runs
    got, cache = runs["streaming"]
    assert cache["k"].shape == (2, S + W, 1, 8)
    positions = np.asarray(cache["positions"][0])  # sinks, then a ring: position p at p % W
    np.testing.assert_array_equal(positions, [0, 1, 16, 13, 14, 15])
    # Until the cache fills, nothing is evicted: the windowed full forward.
    np.testing.assert_allclose(got[:, :S + W], expected[:, :S + W], atol=1e-5)
    for t in range(S + W, X.shape[1]):
        idx = list(range(S)) + list(range(t - W + 1, t + 1))
        np.testing.assert_allclose(got[:, t], forward(X[:, idx])[:, -1], atol=1e-5)
    assert not np.allclose(got[:, -1], expected[:, -1], atol=1e-3)  # positions differ


_spec = importlib.util.spec_from_file_location("generate_script", REPO / "scripts/generate.py")
generate_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate_script)


def test_generate_script_streams_from_a_checkpoint(tmp_path, capsys):
    """scripts/generate.py restores the latest checkpoint of a workdir and prints the text
    (missing workdir, config.json or checkpoint: clear errors). The model's attention has
    a sinks + window StreamingLLM cache: 10x the window keeps the cache size constant."""
    from longjax.train.checkpoint import Checkpointer
    from longjax.train.cli import load_config_file
    from longjax.train.optimizer import make_optimizer
    from longjax.train.state import TrainState, build_model

    config = load_config_file(f"{REPO}/configs/quickstart.py:d_model=16,num_layers=1,"
                              "model.num_heads=2,model.num_kv_heads=1,model.mlp_dim=32,"
                              "seq_len=16")
    config.model.mixer_options.attention.update(window=W, num_sinks=S, cache_mode="streaming")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    checkpointer = Checkpointer(tmp_path, config)
    checkpointer.write_config()
    with pytest.raises(ValueError, match="has no checkpoint"):
        load_model(tmp_path)
    params = _random_params(build_model(config))["params"]
    state = TrainState(step=jnp.int32(7), params=params,
                       opt_state=make_optimizer(config.train).init(params))
    checkpointer.save(7, state, {"batches_consumed": 7})
    checkpointer.wait()
    model, restored, step = load_model(tmp_path)
    assert step == 7
    jax.tree.map(np.testing.assert_array_equal, restored["params"], params)

    new = 10 * W
    generate_script.flags.FLAGS(["generate.py", f"--workdir={tmp_path}", "--prompt=def f(",
                                 f"--max_new_tokens={new}", "--temperature=0"])
    generate_script.main([])
    prompt = tokenizer.encode("def f(", add_eos=False)
    out = generate(model, restored, [prompt], max_new_tokens=new)  # the same compiled call
    text = tokenizer.decode(out.tokens[0, :int(out.lengths[0])])
    assert capsys.readouterr().out == "def f(" + text + "\n"
    assert jax.tree.map(jnp.shape, out.cache) == jax.tree.map(jnp.shape,
                                                              model.init_cache(1, 10_000))
    end = len(prompt) + int(out.lengths[0])  # tokens fed, the last generated one included
    if int(out.lengths[0]) == new:  # no EOS: the cache holds the sinks and the last window
        positions = np.asarray(out.cache[0]["positions"][0])
        np.testing.assert_array_equal(positions[:S], [0, 1])
        np.testing.assert_array_equal(np.sort(positions[S:]), np.arange(end - W, end))


def test_bad_arguments_are_named():
    config = ml_collections.ConfigDict(dict(
        d_model=16, num_heads=2, num_kv_heads=1, head_dim=8, dtype="float32",
        mixer_options={"attention": {"cache_mode": "ring"}}))
    with pytest.raises(ValueError, match="attention.cache_mode must be one of"):
        build_mixer("attention", config, parent=None).init_cache(1, 8)
    config.mixer_options.attention.cache_mode = "streaming"
    with pytest.raises(ValueError, match="needs a positive int window"):
        build_mixer("attention", config, parent=None).init_cache(1, 8)
    lm = _lm()
    for kwargs, message in [({"max_new_tokens": 0}, "max_new_tokens"),
                            ({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature"),
                            ({"prefill_chunk": 0}, "prefill_chunk")]:
        with pytest.raises(ValueError, match=message):
            generate(lm, {}, PROMPTS, **{"max_new_tokens": 2, **kwargs})
