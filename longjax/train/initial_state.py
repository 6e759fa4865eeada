"""The states the recurrent layers start each training row from (`config.train.initial_state`).

- `"zeros"` (default): zero states; no cache goes into the model (S4 then trains in
  convolution mode).
- `"carry"`: the final states of the same batch slot's previous row: truncated
  backpropagation through time over `config.data.packing="contiguous"` slots, whose row
  k+1 continues row k. No gradient flows into the previous step (stop-gradient).
- `"other_sequence"`: the final states of another row of the previous step (row b takes
  row b-1's): the "state passing" intervention of Buitrago & Gu 2025, "Understanding and
  Improving Length Generalization in Recurrent Models", which trains on non-zero initial
  states so the model learns to read from states it has not built itself.
- `"noise"`: i.i.d. Gaussian states of std `config.train.initial_state_noise_std` (fresh
  per step from `config.seed` and the step; complex states split it over their real
  and imaginary parts): the same paper's "random noise" intervention.

The carried final states (with the layers' short-convolution tails and last segment ids:
their whole decode caches) live in `TrainState.carry`, so Orbax checkpoints them and a
resumed run continues exactly. States reset at document borders: inside a row through
`segment_ids`, and with `"carry"` at a row's first token when it starts a new document
(the mixers compare it with `cache["segment"]`). `"other_sequence"` and `"noise"` hand
their state to the row's first document, whichever it is, with empty convolution tails.
Only recurrent layers start from a state (`DecoderLM.init_state_cache`); attention layers
start every row afresh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from longjax.nn.lm import STATE_KEYS
from longjax.parallel.mesh import BATCH_AXES, auto_axes, replicated

INITIAL_STATES = ("zeros", "carry", "other_sequence", "noise")


def carries(train_config) -> bool:
    """Whether the run keeps the last step's final states in `TrainState.carry`."""
    return train_config.get("initial_state", "zeros") in ("carry", "other_sequence")


def initial_carry(config, model):
    """`TrainState.carry` of a new run: empty caches of `config.data.batch_size` rows, or
    None when `config.train.initial_state` carries nothing."""
    if not carries(config.train):
        return None
    return _storable(model.init_state_cache(config.data.batch_size))


def _storable(caches):
    """`caches` with their empty arrays (a short convolution of width 1 keeps no tail) as
    None: Orbax saves no zero-size arrays."""
    return jax.tree.map(lambda leaf: None if leaf.size == 0 else leaf, caches)


def _usable(stored, fresh):
    """The caches `stored` by `_storable`, their empty arrays taken from `fresh`."""
    return jax.tree.map(lambda s, f: f if s is None else s, stored, fresh,
                        is_leaf=lambda leaf: leaf is None)


def carry_shardings(carry, mesh):
    """Batch-sharded like the rows (over data x fsdp); scalar counters replicated."""
    rows = NamedSharding(auto_axes(mesh), PartitionSpec(BATCH_AXES))
    return jax.tree.map(lambda leaf: rows if leaf.ndim else replicated(mesh), carry)


def start_caches(train_config, model, carry, batch, key):
    """Per-layer caches the rows of `batch` start from (None for "zeros"). `carry`: the
    previous step's final caches (`TrainState.carry`); `key`: this step's noise key."""
    kind = train_config.initial_state
    if kind == "zeros":
        return None
    first_segment = batch["segment_ids"][:, 0]
    fresh = model.init_state_cache(first_segment.shape[0])
    if kind == "carry":
        return jax.lax.stop_gradient(_usable(carry, fresh))
    keys = jax.random.split(key, len(fresh)) if kind == "noise" else [None] * len(fresh)
    caches = []
    for i, (layer, layer_key) in enumerate(zip(fresh, keys, strict=True)):
        if layer is None:
            caches.append(None)
            continue
        layer = dict(layer, segment=first_segment)
        for name in STATE_KEYS & set(layer):
            if kind == "other_sequence":
                state = jnp.roll(jax.lax.stop_gradient(carry[i][name]), 1, axis=0)
            else:
                state = train_config.initial_state_noise_std * jax.random.normal(
                    layer_key, layer[name].shape, layer[name].dtype)
            layer[name] = state
        caches.append(layer)
    return tuple(caches)


def next_carry(train_config, final_caches):
    """`TrainState.carry` after a step: its final caches when the run carries them."""
    return jax.lax.stop_gradient(_storable(final_caches)) if carries(train_config) else None
