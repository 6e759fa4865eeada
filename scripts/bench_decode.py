"""Decode benchmark: tokens/s and cache memory versus context length, per model kind.

    python scripts/bench_decode.py                       # CPU defaults, a few minutes
    python scripts/bench_decode.py --lengths=1024,8192,32768 --models=attention,mamba
    python scripts/bench_decode.py --models=attention,streaming,h2o,snapkv \
        --cache_budget=256 --prefill_chunk=256             # the KV-cache policies

For each model (`--models`, below) and context length L, the decoder LM's caches are
built for L tokens already seen (`DecoderLM.init_cache`, `end = L`; the values do not
change the cost), or with `--prefill_chunk` filled by a real prefill of L random tokens
in chunks of that size (`longjax.generate.prefill`: the selection policies keep what they
choose), and a jitted `lax.scan` decodes `--steps` tokens greedily, one model
call per token, as `longjax.generate.decode` does. It reports the median time per token,
tokens/s, the cache size and the compiled step's peak memory
(`compile().memory_analysis()`), and how the per-token time grows from the shortest to
the longest context: flat for recurrent mixers (constant-size state) and for bounded
attention caches, growing for the full KV cache. All of it goes to `--results`.

Models (`--d_model`, `--num_layers`, heads of 64): `attention` (full KV cache, one query
against it through the split-cache decode path), `attention_blockwise` (the same through
the blockwise "xla" attention, a loop over key blocks),
`streaming` (attention with a StreamingLLM sinks + window cache, `--window`), `h2o` and
`snapkv` (attention with those cache policies, `--cache_budget` tokens per layer and KV
head; SnapKV's observation window 32), `mamba`,
`gla`, `retention`, and the presets `samba` (Mamba + sliding-window attention, window
2048) and `jamba` (one attention layer per eight; one cycle of 8 layers).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from longjax.benchmarking import append_results, heading, machine, median_seconds, peak_mib
from longjax.generate import cache_bytes, prefill
from longjax.nn import DecoderLM
from longjax.nn.pattern import expand_pattern
from longjax.nn.presets import preset

_LENGTHS = flags.DEFINE_list("lengths", ["256", "512", "1024", "2048", "4096", "8192"],
                             "Context lengths (tokens already in the cache).")
_MODELS = flags.DEFINE_list("models", ["attention", "streaming", "mamba", "gla", "samba",
                                       "jamba"], "Models to time.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width.")
_LAYERS = flags.DEFINE_integer("num_layers", 4, "Layers (jamba: its 8-layer cycle).")
_WINDOW = flags.DEFINE_integer("window", 1024, "Window of the `streaming` cache (4 sinks).")
_BUDGET = flags.DEFINE_integer("cache_budget", 256, "Tokens the `h2o` / `snapkv` caches keep "
                               "per layer and KV head.")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 0, "Fill the cache by prefilling L "
                                      "random tokens in chunks of this size (0: an empty "
                                      "cache at end = L).")
_STEPS = flags.DEFINE_integer("steps", 32, "Tokens decoded per timed call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median).")
_RESULTS = flags.DEFINE_string("results", "benchmarks/RESULTS.md", "File to append to.")
_SECTION = "## Decoding (`scripts/bench_decode.py`)"


def model_config(name, d_model, num_layers, window, budget=256):
    """`config.model` of benchmark model `name` (float32, heads of 64, vocab 264)."""
    options, mixer = {}, name
    if name == "streaming":
        mixer = "attention"
        options = {"attention": {"window": window, "num_sinks": 4, "cache_mode": "streaming"}}
    elif name in ("h2o", "snapkv"):
        mixer = "attention"
        options = {"attention": {"cache_mode": name, "cache_budget": budget}}
    elif name == "attention_blockwise":
        mixer, options = "attention", {"attention": {"impl": "xla"}}
    elif name in ("samba", "jamba"):
        overrides = preset(name)
        mixer, options = overrides["mixer"], overrides["mixer_options"]
        cycle = len(expand_pattern(mixer))
        num_layers = max(cycle, num_layers // cycle * cycle)
    elif name not in ("attention", "mamba", "gla", "retention"):
        raise ValueError(f"--models: unknown model {name!r}; allowed: attention, "
                         f"attention_blockwise, streaming, h2o, snapkv, mamba, gla, retention, "
                         f"samba, jamba")
    heads = max(1, d_model // 64)
    return dict(vocab_size=264, d_model=d_model, num_layers=num_layers, num_heads=heads,
                num_kv_heads=heads, head_dim=d_model // heads, mlp_dim=4 * d_model,
                dtype="float32", norm_eps=1e-6, tie_embeddings=True, remat=False, mixer=mixer,
                mixer_options=options)


def random_params(lm, seed=0):
    """Parameters of the model's shapes drawn with numpy (no init to compile)."""
    abstract = nn.unbox(jax.eval_shape(lm.init, jax.random.key(0),
                                       jnp.zeros((1, 4), jnp.int32)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(
        rng.standard_normal(s.shape) * 0.02, s.dtype), abstract)


def decode_fn(lm, steps):
    """`f(params, cache, token [B]) -> tokens [B, steps]`: greedy decoding in a scan."""

    def f(params, cache, token):
        def step(carry, _):
            cache, token = carry
            logits, cache = lm.apply(params, token[:, None], cache=cache)
            token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
            return (cache, token), token

        _, tokens = jax.lax.scan(step, (cache, token), None, length=steps)
        return tokens.T

    return f


def _at_length(cache, length):
    """The cache with every `end` counter at `length`."""
    def set_end(path, leaf):
        name = getattr(path[-1], "key", None)
        return jnp.full_like(leaf, length) if name == "end" else leaf

    return jax.tree_util.tree_map_with_path(set_end, cache)


def _prefilled(lm, params, length, chunk, max_length):
    """The caches (for `max_length` tokens) after a prefill of `length` random tokens in
    chunks of `chunk`."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, length)), jnp.int32)
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    fill = jax.jit(lambda p, t, s, pos, c: prefill(lm, p, t, s, pos, c,
                                                   prefill_chunk=min(chunk, length))[1])
    return fill(params, tokens, jnp.ones_like(tokens), positions,
                lm.init_cache(1, max_length))


def measure_decode(lm, params, length, steps, repeats, prefill_chunk=0):
    """`(seconds per token, cache MiB, peak MiB)` at context `length`."""
    if prefill_chunk:
        cache = _prefilled(lm, params, length, prefill_chunk, length + steps)
    else:
        cache = _at_length(lm.init_cache(1, length + steps), length)
    token = jnp.zeros((1,), jnp.int32)
    compiled = jax.jit(decode_fn(lm, steps)).lower(params, cache, token).compile()
    seconds = median_seconds(compiled, (params, cache, token), repeats)
    return seconds / steps, cache_bytes(cache) / 2**20, peak_mib(compiled)


def main(argv):
    del argv
    lengths = [int(n) for n in _LENGTHS.value]
    results, layers = {}, {}
    for name in _MODELS.value:
        config = model_config(name, _D_MODEL.value, _LAYERS.value, _WINDOW.value,
                              _BUDGET.value)
        layers[name] = config["num_layers"]
        lm = DecoderLM(ml_collections.FrozenConfigDict(config))
        params = random_params(lm)
        for L in lengths:
            results[name, L] = measure_decode(lm, params, L, _STEPS.value, _REPEATS.value,
                                              _PREFILL_CHUNK.value)
            t, cache_mib, peak = results[name, L]
            print(f"{name} L={L}: {1e3 * t:.2f} ms/token, cache {cache_mib:.2f} MiB, "
                  f"peak {peak:.1f} MiB", flush=True)
    text = _report(results, layers, lengths)
    print(text)
    append_results(_RESULTS.value, _SECTION, text)


def _report(results, layers, lengths):
    names = list(dict.fromkeys(name for name, _ in results))
    lines = [
        heading(),
        "",
        f"Machine: {machine()}. Batch 1, d_model={_D_MODEL.value}, heads of 64, float32, "
        f"greedy decoding of {_STEPS.value} tokens per call (median of {_REPEATS.value}) "
        f"after a context of L tokens ("
        + (f"prefilled in chunks of {_PREFILL_CHUNK.value}" if _PREFILL_CHUNK.value
           else "an empty cache at end = L") +
        f"); `streaming` is attention with a StreamingLLM cache "
        f"of 4 sinks + {_WINDOW.value}; `h2o` / `snapkv` keep {_BUDGET.value} tokens per "
        "layer and KV head; samba's sliding window is 2048. Cache MiB: the "
        "decode caches; peak MiB: the compiled decode call (`memory_analysis`).",
        "",
        "Milliseconds per token (tokens/s):",
        "",
        "| model | layers | " + " | ".join(f"L={L}" for L in lengths)
        + f" | L={lengths[-1]} / L={lengths[0]} |",
        "|---|---|" + "---|" * (len(lengths) + 1),
    ]
    for name in names:
        cells = [f"{1e3 * results[name, L][0]:.2f} ({1 / results[name, L][0]:.0f})"
                 for L in lengths]
        growth = results[name, lengths[-1]][0] / results[name, lengths[0]][0]
        lines.append(f"| {name} | {layers[name]} | " + " | ".join(cells) + f" | {growth:.1f}x |")
    lines += ["", "Cache MiB / peak MiB of the decode call:", "",
              "| model | " + " | ".join(f"L={L}" for L in lengths) + " |",
              "|---|" + "---|" * len(lengths)]
    for name in names:
        cells = [f"{results[name, L][1]:.2f} / {results[name, L][2]:.0f}" for L in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
