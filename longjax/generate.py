"""Text generation with the per-mixer decode caches: prefill, then a jitted decode loop.

    out = generate(model, params, [prompt_a, prompt_b], max_new_tokens=64,
                   rng=jax.random.key(0), temperature=0.8, top_p=0.95)
    out.tokens   # [B, max_new_tokens] (PAD after each row's EOS), out.lengths [B]

How it works:

1. `left_pad` aligns the prompts of a batch on the right: row b gets `P - len_b` padding
   tokens with segment id 0 (which attention never sees and which resets every recurrent
   state), and positions that start at 0 on its first real token. Every row then writes
   the same cache slots at each step, and gives what it gives alone.
2. `prefill` runs the model over the prompt in one parallel call, or, for prompts longer
   than `prefill_chunk`, in chunks of `prefill_chunk` tokens through the cache
   (`lax.scan`), so activations stay `O(prefill_chunk)` whatever the prompt length
   (chunked prefill, as in Sarathi / vLLM).
3. `decode` is a `lax.while_loop` of one-token model calls with the caches of
   `DecoderLM.init_cache` (full, rolling or StreamingLLM KV caches for attention,
   constant-size states for SSM and linear-attention mixers); it stops when every row has
   produced EOS or `max_new_tokens` tokens.

Sampling (`sample_logits`): greedy (`temperature=0`), temperature, top-k (Fan et al. 2018)
and nucleus / top-p (Holtzman et al. 2020). The step-t key is `fold_in(rng, t)` (each
row draws from it independently), so a seed reproduces the same tokens. Everything runs
in one jitted function; the sampling settings and the EOS / PAD ids are traced, so
changing them does not recompile.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from longjax.data import tokenizer
from longjax.train import config as config_lib
from longjax.train import stages as stages_lib
from longjax.train.state import build_model


class Generation(NamedTuple):
    """tokens `[B, N]` (PAD after EOS), lengths `[B]` (tokens up to and including EOS),
    logits `[B, N, V]` fp32 (those each token was sampled from; None unless asked) and the
    final per-layer caches."""

    tokens: jax.Array
    lengths: jax.Array
    logits: jax.Array | None
    cache: Any


def left_pad(prompts, *, pad_id=tokenizer.PAD, multiple=1):
    """Right-aligned batch of 1-D token sequences.

    Returns `(tokens, segment_ids, positions)`, each `[B, P]` int32, with `P` the longest
    prompt rounded up to `multiple`; padding has segment 0 and position 0, real tokens
    segment 1 and positions `0 .. len - 1`.
    """
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("prompts must be a non-empty list of non-empty token sequences")
    P = -(-max(len(p) for p in prompts) // multiple) * multiple
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    segments = np.zeros((len(prompts), P), np.int32)
    positions = np.zeros((len(prompts), P), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = p
        segments[b, P - len(p):] = 1
        positions[b, P - len(p):] = np.arange(len(p))
    return tokens, segments, positions


def sample_logits(logits, rng, *, temperature=0.0, top_k=0, top_p=1.0):
    """One token per row from logits `[B, V]` -> `[B]` int32.

    `temperature <= 0` is greedy (argmax). Otherwise the logits are divided by the
    temperature, restricted to the `top_k` most likely tokens (`top_k <= 0`: all) and to
    the smallest set whose probability reaches `top_p` (the most likely token is always
    kept), and sampled with `rng` (one key; rows draw independently). All settings may be
    traced values.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    V = logits.shape[-1]
    scaled = logits / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V)
    k = jnp.where(jnp.asarray(top_k) > 0, jnp.asarray(top_k), V)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better tokens
    keep = (rank < k) & ((mass_before < top_p) | (rank == 0))
    choice = jax.random.categorical(rng, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(jnp.asarray(temperature) > 0, sampled, greedy)


def prefill(model, params, tokens, segment_ids, positions, cache, *, prefill_chunk=None):
    """Runs the prompt `[B, P]` through the model into `cache`.

    With `prefill_chunk` (which must divide `P`) the prompt goes in chunks of that many
    tokens under `lax.scan`; otherwise in one call. Returns (logits of the last prompt
    token `[B, V]` fp32, cache).
    """
    B, P = tokens.shape

    def call(cache, chunk):
        t, s, p = chunk
        logits, cache = model.apply(params, t, segment_ids=s, positions=p, cache=cache)
        return cache, logits[:, -1]

    if prefill_chunk is None or prefill_chunk >= P:
        cache, last = call(cache, (tokens, segment_ids, positions))
        return last, cache
    if P % prefill_chunk:
        raise ValueError(f"prefill_chunk={prefill_chunk} must divide the padded prompt "
                         f"length {P}")
    n = P // prefill_chunk

    def chunks(x):
        return jnp.swapaxes(x.reshape(B, n, prefill_chunk), 0, 1)

    cache, lasts = jax.lax.scan(call, cache, (chunks(tokens), chunks(segment_ids),
                                              chunks(positions)))
    return lasts[-1], cache


def decode(model, params, logits, cache, next_position, rng, *, max_new_tokens,
           temperature, top_k, top_p, eos_id, pad_id, return_logits):
    """The decode loop: sample from `logits` `[B, V]`, feed the token, repeat.

    `next_position` `[B]` is each row's position of the first new token. Rows stop after
    EOS (later tokens are `pad_id`); the loop stops when all rows have, or after
    `max_new_tokens`. Returns a `Generation`.
    """
    B, V = logits.shape
    N = max_new_tokens

    def cond(carry):
        step, _, _, done, *_ = carry
        return (step < N) & ~jnp.all(done)

    def body(carry):
        step, logits, cache, done, tokens, lengths, all_logits = carry
        token = sample_logits(logits, jax.random.fold_in(rng, step), temperature=temperature,
                              top_k=top_k, top_p=top_p)
        token = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, step].set(token)
        lengths = lengths + (~done).astype(jnp.int32)
        if return_logits:
            all_logits = all_logits.at[:, step].set(logits)
        done = done | (token == eos_id)
        ones = jnp.ones((B, 1), jnp.int32)
        logits, cache = model.apply(params, token[:, None], segment_ids=ones,
                                    positions=(next_position + step)[:, None], cache=cache)
        return step + 1, logits[:, -1], cache, done, tokens, lengths, all_logits

    carry = (jnp.zeros((), jnp.int32), logits, cache, jnp.zeros((B,), bool),
             jnp.full((B, N), pad_id, jnp.int32), jnp.zeros((B,), jnp.int32),
             jnp.zeros((B, N, V) if return_logits else (0,), jnp.float32))
    _, _, cache, _, tokens, lengths, all_logits = jax.lax.while_loop(cond, body, carry)
    return Generation(tokens, lengths, all_logits if return_logits else None, cache)


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "prefill_chunk", "return_logits"))
def _generate(model, params, tokens, segment_ids, positions, rng, temperature, top_k, top_p,
              eos_id, pad_id, *, max_new_tokens, prefill_chunk, return_logits):
    B, P = tokens.shape
    cache = model.init_cache(B, P + max_new_tokens)
    logits, cache = prefill(model, params, tokens, segment_ids, positions, cache,
                            prefill_chunk=prefill_chunk)
    next_position = positions[:, -1] + 1
    return decode(model, params, logits, cache, next_position, rng,
                  max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                  top_p=top_p, eos_id=eos_id, pad_id=pad_id, return_logits=return_logits)


def generate(model, params, prompts, *, max_new_tokens, rng=None, temperature=0.0, top_k=0,
             top_p=1.0, eos_id=tokenizer.EOS, pad_id=tokenizer.PAD, prefill_chunk=None,
             return_logits=False) -> Generation:
    """Continues each of `prompts` (a list of 1-D token sequences, lengths may differ).

    model: a `longjax.nn.DecoderLM`; params: its variables (`{"params": ...}`) or bare
    parameters. The prompts are left-padded (`left_pad`) to a multiple of `prefill_chunk`
    when given, prefilled (`prefill`) and continued for up to `max_new_tokens` tokens
    (`decode`) with `sample_logits(temperature, top_k, top_p)` and `rng` (default key 0).
    `eos_id=None` never stops early (a tokenizer without an end-of-text token).
    Each row's result equals generating that prompt alone (greedy: the same tokens; the
    sampled ones differ since rows draw different keys). One exception: attention with
    `num_sinks > 0` and the full cache takes the first cache slots as sinks, which are
    padding for shorter rows; its `cache_mode="rolling"` (the same math) takes each row's
    first tokens. Returns a `Generation`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive int or None; got {prefill_chunk}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    eos_id = -1 if eos_id is None else eos_id  # None: no end-of-text token, never stop
    tokens, segments, positions = left_pad(prompts, pad_id=pad_id, multiple=prefill_chunk or 1)
    if not (isinstance(params, dict) and "params" in params):
        params = {"params": params}
    rng = jax.random.key(0) if rng is None else rng
    return _generate(model, params, tokens, segments, positions, rng,
                     jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                     jnp.int32(eos_id), jnp.int32(pad_id), max_new_tokens=max_new_tokens,
                     prefill_chunk=prefill_chunk, return_logits=return_logits)


def cache_bytes(cache) -> int:
    """Bytes held by a cache pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def load_model(workdir):
    """`(model, params, step)` from the latest checkpoint of a training workdir.

    The model is built from `workdir/config.json` as its last training stage trained it
    (RoPE base included), and the parameters are restored onto the default device.
    Raises ValueError when the workdir, its config.json or a checkpoint is missing.
    """
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} does not exist; give the --workdir of a "
                         f"training run (scripts/train.py)")
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise ValueError(f"--workdir {workdir} has no config.json, so it is not a longjax "
                         f"training workdir; train one with scripts/train.py")
    config = config_lib.saved_config(config_path.read_text())
    config = stages_lib.stage_config(config, stages_lib.schedule(config)[-1])
    model = build_model(config)
    manager = ocp.CheckpointManager((workdir / "checkpoints").absolute(),
                                    item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    step = manager.latest_step()
    if step is None:
        raise ValueError(f"--workdir {workdir} has no checkpoint in {workdir / 'checkpoints'}; "
                         f"train longer than config.checkpoint.every_steps or until the end")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))["params"]
    # The parameters alone (partial_restore): checkpoints from before a TrainState field
    # existed (such as `carry`) load too.
    abstract = {"params": jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), params)}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)))
    return model, {"params": restored["state"]["params"]}, step
