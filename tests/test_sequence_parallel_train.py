"""The LM with its sequence axis split over devices computes one-device loss and gradients."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from longjax.data.pipeline import make_dataset
from longjax.parallel.mesh import MESH_AXES, batch_sharding, make_mesh
from longjax.train import build_model, create_train_state, put_batch, state_shardings
from longjax.train.config import apply_overrides
from longjax.train.step import BATCH_KEYS, loss_and_sums, make_train_step


@pytest.fixture(scope="module")
def setup(text_folder):
    """A one-layer GQA LM, one packed batch, its parameters, and one-device loss and grads."""
    from longjax.train.cli import load_config_file
    from longjax.train.config import apply_overrides

    from conftest import REPO, TINY

    config = load_config_file(f"{REPO}/configs/quickstart.py:{TINY}")
    config.data.source, config.data.path = "files", str(text_folder)
    apply_overrides(config, {"model.num_layers": 1, "model.num_heads": 4,
                             "model.num_kv_heads": 2})
    batch = make_dataset(config, "train").batch(0, config.data.batch_size)
    T = config.data.seq_len
    for row, start in enumerate((5, 11, 17, 23, 13, 29, 9, 19)):  # a second document ...
        batch["segment_ids"][row, start:] = batch["segment_ids"][row, 0] + 1
        batch["positions"][row, start:] = np.arange(T - start)
    batch["segment_ids"][0, -3:] = 0  # ... and padding
    batch["weights"][0, -3:] = 0
    one_device = make_mesh({"data": 1}, jax.devices()[:1])
    state = create_train_state(config, build_model(config), one_device, jax.random.key(0))
    params = jax.device_get(state.params)
    return config, batch, params, loss_and_grads(config, batch, params, one_device)


def loss_and_grads(config, batch, params, mesh):
    """Loss and parameter gradients of `batch`, computed as the train step does on `mesh`."""
    model = build_model(config)
    shardings = state_shardings(config, model, mesh).params
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(loss_and_sums, model=model),
                                         has_aux=True),
                      in_shardings=(shardings, batch_sharding(mesh)))
    with jax.set_mesh(mesh):
        (loss, _), grads = grad_fn(jax.device_put(params, shardings), put_batch(batch, mesh))
    return float(loss), jax.device_get(grads)


@pytest.mark.parametrize("mesh_sizes,strategy", [
    ({"data": 8}, "ring"),
    ({"data": 2, "sequence": 4}, "ring"),
    ({"fsdp": 2, "tensor": 2, "sequence": 2}, "ulysses"),
])
def test_loss_and_gradients_match_one_device(setup, mesh_sizes, strategy):
    config, batch, params, (want_loss, want_grads) = setup
    config = config.copy_and_resolve_references()
    config.model.mixer_options.attention.sequence_parallel = strategy
    loss, grads = loss_and_grads(config, batch, params, make_mesh(mesh_sizes))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    for path, got in jax.tree_util.tree_leaves_with_path(grads):
        want = flat_want[path]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("strategy", ["ring", "usp"])
def test_train_step_on_a_mesh_with_explicit_axes(setup, strategy):
    """jax.make_mesh's default mesh (explicit axes) with the batch already sharded over it
    (data x sequence): one train step equals the one-device step."""
    config, batch, _, _ = setup
    config = config.copy_and_resolve_references()
    config.model.mixer_options.attention.sequence_parallel = strategy
    if strategy == "usp":
        config.model.mixer_options.attention.ulysses_degree = 2
    model = build_model(config)
    explicit = jax.make_mesh((2, 1, 1, 4), MESH_AXES)
    assert set(explicit.axis_types) == {jax.sharding.AxisType.Explicit}
    sharded = jax.device_put(
        {k: batch[k] for k in BATCH_KEYS},
        NamedSharding(explicit, PartitionSpec(("data", "fsdp"), "sequence")))
    results = []
    for mesh, inputs in ((make_mesh({"data": 1}, jax.devices()[:1]), batch),
                         (explicit, sharded)):
        state = create_train_state(config, model, mesh, jax.random.key(0))
        results.append(jax.device_get(make_train_step(config, model, mesh)(state, inputs)))
    (want_state, want_metrics), (state, metrics) = results
    np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-5)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state.params),
                                 jax.tree.leaves(want_state.params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def _one_device_and_sharded(setup, mesh_sizes, **model_overrides):
    """(one-device, sharded) loss and gradients of the setup's batch for a model with
    `model_overrides`, and whether the sharded forward runs a `shard_map`."""
    config, batch, _, _ = setup
    config = config.copy_and_resolve_references()
    apply_overrides(config, {f"model.{k}": v for k, v in model_overrides.items()})
    model = build_model(config)
    one_device = make_mesh({"data": 1}, jax.devices()[:1])
    params = jax.device_get(create_train_state(config, model, one_device,
                                               jax.random.key(0)).params)
    mesh = make_mesh(mesh_sizes)
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(functools.partial(loss_and_sums, model=model))(
            params, put_batch(batch, mesh)))
    return (loss_and_grads(config, batch, params, one_device),
            loss_and_grads(config, batch, params, mesh), "shard_map" in jaxpr)


def _assert_close(got, want, tolerance=1e-4):
    (loss, grads), (want_loss, want_grads) = got, want
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=tolerance, atol=tolerance * np.abs(w).max(),
                                   err_msg=jax.tree_util.keystr(path))


# Every recurrent mixer runs its sequence-parallel form (a shard_map with state passing)
# on a data=2 x sequence=4 mesh and equals one device.
@pytest.mark.parametrize("mixer", ["mamba", "mamba2", "s4d", "s4", "linear_attention",
                                   "based", "retention", "gla", "deltanet",
                                   "gated_deltanet", "rglru", "swa"])
def test_every_mixer_sequence_parallel_equals_one_device(setup, mixer):
    want, got, split = _one_device_and_sharded(setup, {"data": 2, "sequence": 4},
                                               mixer=mixer)
    # S4 on one device convolves with its Cauchy kernel (fp32 rounding of its own), the
    # sequence-parallel form runs the scan
    _assert_close(got, want, tolerance=3e-4 if mixer == "s4" else 1e-4)
    assert split, "the sequence-parallel form (a shard_map) runs"


@pytest.mark.parametrize("preset,num_layers", [("griffin", 3), ("samba", 2), ("jamba", 8),
                                               ("based", 2)])
def test_hybrid_presets_sequence_parallel_equal_one_device(setup, preset, num_layers):
    from longjax.nn.presets import preset as preset_overrides

    overrides = preset_overrides(preset)
    want, got, _ = _one_device_and_sharded(
        setup, {"data": 2, "sequence": 4}, num_layers=num_layers, mixer=overrides["mixer"],
        **{f"mixer_options.{m}.{k}": v for m, o in overrides["mixer_options"].items()
           for k, v in o.items()})
    _assert_close(got, want)


def test_mixer_uses_the_configured_strategy_on_a_sequence_mesh(setup):
    config, batch, params, _ = setup
    config = config.copy_and_resolve_references()
    config.model.mixer_options.attention.sequence_parallel = "tree"
    with pytest.raises(ValueError, match="strategy must be one of"):
        loss_and_grads(config, batch, params, make_mesh({"data": 2, "sequence": 4}))
