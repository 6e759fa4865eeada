"""The loss, the jitted train step and the eval step."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from longjax.parallel.mesh import LOGICAL_RULES, auto_axes, batch_sharding, replicated
from longjax.train import initial_state
from longjax.train.optimizer import learning_rate_schedule, make_optimizer
from longjax.train.state import state_shardings

BATCH_DTYPES = {"tokens": np.int32, "targets": np.int32, "weights": np.float32,
                "segment_ids": np.int32, "positions": np.int32}
BATCH_KEYS = tuple(BATCH_DTYPES)


def loss_and_sums(params, batch, model):
    """Mean next-token cross-entropy over weighted targets, and the sums behind it.

    Sums: `loss_sum` (nats), `weight` (targets counted), `bytes` (targets that are bytes,
    for bits per byte), `correct` (argmax hits), `rows` (rows with a weighted target) and
    `rows_correct` (those whose weighted targets are all argmax hits: exact match).
    """
    with nn.logical_axis_rules(LOGICAL_RULES):
        logits, _ = model.apply({"params": params}, batch["tokens"],
                                segment_ids=batch["segment_ids"], positions=batch["positions"])
    return _scored(logits, batch)


def loss_sums_and_caches(params, batch, model, caches):
    """`loss_and_sums` for rows whose recurrent layers start from the per-layer `caches`
    (`longjax.train.initial_state`): `(loss, (sums, final caches))`."""
    with nn.logical_axis_rules(LOGICAL_RULES):
        logits, final = model.apply({"params": params}, batch["tokens"],
                                    segment_ids=batch["segment_ids"],
                                    positions=batch["positions"], cache=caches)
    loss, sums = _scored(logits, batch)
    return loss, (sums, final)


def _scored(logits, batch):
    targets, weights = batch["targets"], batch["weights"]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    hits = jnp.argmax(logits, -1) == targets
    scored = jnp.any(weights > 0, axis=-1)
    exact = jnp.all(hits | (weights == 0), axis=-1)
    sums = {
        "loss_sum": jnp.sum(nll * weights),
        "weight": jnp.sum(weights),
        "bytes": jnp.sum(weights * (targets < 256)),
        "correct": jnp.sum(weights * hits),
        "rows": jnp.sum(scored, dtype=jnp.float32),
        "rows_correct": jnp.sum(scored & exact, dtype=jnp.float32),
    }
    return sums["loss_sum"] / jnp.maximum(sums["weight"], 1.0), sums


def summarize(sums) -> dict[str, float]:
    """Loss, bits per byte, accuracy (of the weighted tokens) and sequence accuracy (of
    the rows: exact match) from (accumulated) sums."""
    sums = {k: float(v) for k, v in sums.items()}
    weight = max(sums["weight"], 1.0)
    return {
        "loss": sums["loss_sum"] / weight,
        "bits_per_byte": sums["loss_sum"] / (math.log(2) * max(sums["bytes"], 1.0)),
        "accuracy": sums["correct"] / weight,
        "sequence_accuracy": sums["rows_correct"] / max(sums["rows"], 1.0),
    }


def process_rows(mesh, batch_size: int) -> np.ndarray:
    """Indices of the rows of a global batch of `batch_size` rows that this process's
    devices hold (in order; all rows when one process holds the whole mesh)."""
    shards = batch_sharding(mesh).addressable_devices_indices_map(
        (batch_size, mesh.shape["sequence"]))
    spans = sorted({idx[0].indices(batch_size)[:2] for idx in shards.values()})
    return np.concatenate([np.arange(start, stop) for start, stop in spans])


def put_batch(batch: dict[str, np.ndarray], mesh, *,
              batch_size: int | None = None) -> dict[str, jax.Array]:
    """Numpy batch -> global arrays sharded over (data x fsdp, sequence).

    `batch` holds the rows `process_rows(mesh, batch_size)` of a global batch of
    `batch_size` rows; without `batch_size` it is the whole global batch (every process
    passes the same one).
    """
    sharding = batch_sharding(mesh)
    rows = len(batch["tokens"]) if batch_size is None else batch_size
    return {k: jax.make_array_from_process_local_data(sharding, batch[k],
                                                      (rows, *batch[k].shape[1:]))
            for k in BATCH_KEYS}


def abstract_batch(mesh, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """A global batch `[batch_size, seq_len]` as `jax.ShapeDtypeStruct`s with the batch
    sharding of `mesh` (for ahead-of-time compilation)."""
    sharding = batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), BATCH_DTYPES[k], sharding=sharding)
            for k in BATCH_KEYS}


def make_train_step(config, model, mesh):
    """`train_step(state, batch) -> (state, metrics)`, jitted with the mesh's shardings.

    `mesh` may have explicit or auto axes; the step runs on its auto twin (`auto_axes`).
    """
    optimizer = make_optimizer(config.train)
    schedule = learning_rate_schedule(config.train)
    shardings = state_shardings(config, model, mesh)

    def step(state, batch):
        caches = initial_state.start_caches(
            config.train, model, state.carry, batch,
            jax.random.fold_in(jax.random.key(config.seed), state.step))
        if caches is None:
            grad_fn = jax.value_and_grad(loss_and_sums, has_aux=True)
            (loss, sums), grads = grad_fn(state.params, batch, model)
            final = None
        else:
            grad_fn = jax.value_and_grad(loss_sums_and_caches, has_aux=True)
            (loss, (sums, final)), grads = grad_fn(state.params, batch, model, caches)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = dict(sums, loss=loss, grad_norm=optax.global_norm(grads),
                       learning_rate=schedule(state.step))
        new_state = state.replace(step=state.step + 1, opt_state=opt_state,
                                  params=optax.apply_updates(state.params, updates),
                                  carry=initial_state.next_carry(config.train, final))
        return new_state, metrics

    in_shardings = (shardings, batch_sharding(mesh))
    jitted = jax.jit(step, in_shardings=in_shardings,
                     out_shardings=(shardings, replicated(mesh)), donate_argnums=0)

    def train_step(state, batch):
        with jax.set_mesh(auto_axes(mesh)):
            return jitted(*jax.device_put((state, batch), in_shardings))

    def lower(state, batch):
        with jax.set_mesh(auto_axes(mesh)):
            return jitted.lower(state, batch)

    train_step.lower = lower  # ahead-of-time: lower(abstract state, abstract batch)
    return train_step


def make_eval_step(config, model, mesh):
    """`eval_step(params, batch) -> sums` (see `loss_and_sums`)."""
    in_shardings = (state_shardings(config, model, mesh).params, batch_sharding(mesh))
    jitted = jax.jit(lambda params, batch: loss_and_sums(params, batch, model)[1],
                     in_shardings=in_shardings, out_shardings=replicated(mesh))

    def eval_step(params, batch):
        with jax.set_mesh(auto_axes(mesh)):
            return jitted(*jax.device_put((params, batch), in_shardings))

    return eval_step
