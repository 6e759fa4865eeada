"""Every registered mixer and every hybrid preset trains from config alone: loss falls."""

import jax
import numpy as np
import pytest

from longjax.data.pipeline import make_dataset
from longjax.nn import mixer_names
from longjax.nn.pattern import expand_pattern
from longjax.nn.presets import PRESETS
from longjax.parallel.mesh import make_mesh
from longjax.train import build_model, create_train_state, make_train_step, put_batch
from longjax.train.config import apply_preset, validate

STEPS = 24


def _loss_curve(config):
    validate(config)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    model = build_model(config)
    state = create_train_state(config, model, mesh, jax.random.key(0))
    train_step = make_train_step(config, model, mesh)
    data = make_dataset(config, "train")
    losses = []
    for step in range(STEPS):
        state, metrics = train_step(state, put_batch(data.batch(step, 8), mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses)


def _smoke_config(tiny_config, **overrides):
    return tiny_config(train__steps=STEPS, train__warmup_steps=2, train__learning_rate=1e-2,
                       **overrides)


@pytest.mark.parametrize("mixer", mixer_names())
def test_lm_trains_with_mixer(mixer, tiny_config):
    losses = _loss_curve(_smoke_config(tiny_config, model__mixer=mixer))
    assert np.isfinite(losses).all()
    assert losses[-4:].mean() < losses[:4].mean() - 0.5, losses


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_lm_trains_with_hybrid_preset(preset, tiny_config):
    config = _smoke_config(tiny_config)
    apply_preset(config, preset)
    config.model.num_layers = len(expand_pattern(config.model.mixer))  # one cycle
    losses = _loss_curve(config)
    assert np.isfinite(losses).all()
    assert losses[-4:].mean() < losses[:4].mean() - 0.5, losses
