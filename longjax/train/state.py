"""The train state, its shardings on a mesh, and its creation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from longjax.nn import DecoderLM
from longjax.parallel.mesh import LOGICAL_RULES, logical_to_sharding, replicated
from longjax.train import initial_state
from longjax.train.optimizer import make_optimizer


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    # The recurrent layers' final caches of the last step, when config.train.initial_state
    # carries them (longjax.train.initial_state); None otherwise.
    carry: Any = None


def build_model(config) -> DecoderLM:
    return DecoderLM(ml_collections.FrozenConfigDict(config.model))


def _init_params(model, config, rng):
    tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
    with nn.logical_axis_rules(LOGICAL_RULES):
        return model.init(rng, tokens)["params"]


def state_shardings(config, model, mesh) -> TrainState:
    """`NamedSharding`s of the train state from the parameters' logical axis names."""
    optimizer = make_optimizer(config.train)
    boxed = jax.eval_shape(lambda r: _init_params(model, config, r), jax.random.key(0))
    param_shardings = logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    abstract_opt = jax.eval_shape(optimizer.init, nn.unbox(boxed))
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_opt, param_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )
    carry = jax.eval_shape(lambda: initial_state.initial_carry(config, model))
    return TrainState(step=replicated(mesh), params=param_shardings, opt_state=opt_shardings,
                      carry=initial_state.carry_shardings(carry, mesh))


def _state_init(config, model):
    """`init(rng) -> TrainState`: fresh parameters and optimizer state."""
    optimizer = make_optimizer(config.train)

    def init(rng):
        params = nn.unbox(_init_params(model, config, rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params),
                          carry=initial_state.initial_carry(config, model))

    return init


def create_train_state(config, model, mesh, rng) -> TrainState:
    """Initialises parameters and optimizer state directly in their shardings."""
    # No mesh context here: parameters get their shardings from `out_shardings`.
    return jax.jit(_state_init(config, model),
                   out_shardings=state_shardings(config, model, mesh))(rng)


def abstract_train_state(config, model, mesh) -> TrainState:
    """The train state as `jax.ShapeDtypeStruct`s with their shardings on `mesh`, made
    without computing anything (for ahead-of-time compilation)."""
    shapes = jax.eval_shape(_state_init(config, model), jax.random.key(0))
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                 sharding=sharding),
                        shapes, state_shardings(config, model, mesh))
