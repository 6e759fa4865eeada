"""Positions in training rows: every training batch of the default configs stays below its
`seq_len` ("row" positions, the train-short setting), "document" positions are the
opt-in; PoSE's positions; fine-tuning extension stages (PI, YaRN, ABF, PoSE)."""

from collections import Counter

import numpy as np
import pytest

from longjax.data import packing, pipeline
from longjax.data.decomposition import DecomposedDataset
from longjax.train import config as config_lib
from longjax.train import loop, stages, train_and_evaluate
from longjax.train.cli import load_config_file

from conftest import REPO


def test_row_positions_restart_at_each_row_and_document():
    segment_ids = np.array([[1, 1, 1, 2, 2, 3, 0, 0],
                            [1, 1, 1, 1, 1, 1, 1, 1]])
    rows = {"tokens": np.zeros((2, 8), np.int32), "segment_ids": segment_ids,
            "positions": np.array([[500, 501, 502, 0, 1, 0, 0, 0], np.arange(900, 908)])}
    row = packing.rows_to_batch(rows)["positions"]
    np.testing.assert_array_equal(row, [[0, 1, 2, 0, 1, 0, 0], np.arange(7)])
    document = packing.rows_to_batch(rows, positions="document")["positions"]
    np.testing.assert_array_equal(document, rows["positions"][:, :-1])
    with pytest.raises(ValueError, match=r"config.data.positions='doc'; allowed: \['row'"):
        packing.rows_to_batch(rows, positions="doc")


DEFAULT_CONFIGS = ["quickstart.py", "lm_stdlib.py", "extrapolation/config.py",
                   "extrapolation/config.py:scheme=learned",
                   "extrapolation/config.py:task=copy", "mqar.py",
                   *(f"long_context_recipes.py:recipe={r}"
                     for r in ("concat", "best_fit", "decomposition", "extension"))]


def _every_training_row(config):
    """The positions of every row the training stream of `config` can hand out."""
    d = config.data
    if d.source == "task":  # generated per step: the first batches
        dataset = pipeline.make_dataset(config, "train")
        return np.concatenate([dataset.batch(s, d.batch_size)["positions"] for s in range(3)])
    if d.packing == "decomposition":
        dataset = DecomposedDataset(pipeline.load_token_docs(d, "train", seed=0),
                                    d.bucket_lengths)
        return np.concatenate([
            packing.rows_to_batch(dataset.rows(n, np.arange(dataset.num_rows(n))),
                                  positions=d.positions)["positions"].ravel()
            for n in dataset.bucket_lengths])
    dataset = pipeline.make_dataset(config, "train")
    return packing.rows_to_batch(dataset.rows, positions=d.positions)["positions"]


_CORPUS = {}


@pytest.fixture
def cached_corpus(monkeypatch):
    """The embedded corpus tokenised once for all tests here."""
    load = pipeline.load_token_docs

    def cached(d, split, *, seed):
        key = (d.source, d.path, split, seed)
        if key not in _CORPUS:
            _CORPUS[key] = load(d, split, seed=seed)
        return _CORPUS[key]

    monkeypatch.setattr(pipeline, "load_token_docs", cached)


@pytest.mark.parametrize("name", DEFAULT_CONFIGS)
def test_every_training_batch_of_the_default_configs_stays_below_seq_len(name, cached_corpus):
    config = load_config_file(f"{REPO}/configs/{name}")
    for stage in stages.schedule(config):
        stage_config = stages.stage_config(config, stage)
        positions = _every_training_row(stage_config)
        assert 0 <= positions.min() and positions.max() < stage_config.data.seq_len, name
        assert positions.max() == stage_config.data.seq_len - 1 or "task" in name


def test_document_positions_are_the_opt_in(cached_corpus):
    """The earlier default: a row late in a long file continues its positions."""
    config = load_config_file(f"{REPO}/configs/quickstart.py:data.positions='document'")
    assert _every_training_row(config).max() > 100 * config.data.seq_len
    config = load_config_file(f"{REPO}/configs/extrapolation/config.py:scheme=learned")
    config.data.positions = "document"
    with pytest.raises(ValueError, match="positions='document' feeds positions past the "
                                         "learned position table"):
        config_lib.validate(config)
    config.data.positions = "absolute"
    with pytest.raises(ValueError, match=r"config.data.positions='absolute'; allowed"):
        config_lib.validate(config)


def test_pose_positions():
    """Chunks of consecutive positions, the first from 0, skips non-decreasing, all below
    the target; distances past the row length appear; deterministic in the generator."""
    T, target = 32, 128
    row = np.broadcast_to(np.arange(T, dtype=np.int32), (200, T))
    pos = packing.pose_positions(row, target, np.random.default_rng(0))
    again = packing.pose_positions(row, target, np.random.default_rng(0))
    np.testing.assert_array_equal(pos, again)
    steps = np.diff(pos, axis=1)
    assert (pos[:, 0] == 0).all() and (steps >= 1).all() and (pos < target).all()
    assert ((steps > 1).sum(1) <= 1).all()  # two chunks: at most one skip
    assert (pos[:, -1] - pos[:, 0] >= T).mean() > 0.5 and pos.max() > 100
    three = packing.pose_positions(row, target, np.random.default_rng(1), num_chunks=3)
    assert ((np.diff(three, axis=1) > 1).sum(1) <= 2).all() and (three < target).all()
    with pytest.raises(ValueError, match="target length >= the row length 32"):
        packing.pose_positions(row, 16, np.random.default_rng(0))


def _config(**overrides):
    return config_lib.apply_overrides(config_lib.base_config(), overrides)


def test_extension_stages():
    config = _config(**{"train.stages": (
        (600, 256, 1e4), (100, 1024, 1e4, "linear:4"), (100, 1024, 1e4, "yarn:4"),
        (50, 1024, 5e5), (50, 1024, 1e4, "giraffe"), (100, 256, 1e4, "pose:1024+yarn:4"))})
    schedule = stages.schedule(config)
    assert schedule[1] == stages.Stage(600, 100, 1024, 1e4, "linear", 4.0, 0)
    assert schedule[5] == stages.Stage(900, 100, 256, 1e4, "yarn", 4.0, 1024)
    attention = [stages.stage_config(config, s).model.mixer_options.attention for s in schedule]
    assert [(a.rope_scaling, a.rope_scaling_factor, a.train_length, a.rope_base)
            for a in attention] == [("none", 1.0, None, 1e4), ("linear", 4.0, 256, 1e4),
                                    ("yarn", 4.0, 256, 1e4), ("none", 1.0, None, 5e5),
                                    ("truncated", 1.0, 256, 1e4), ("yarn", 4.0, 256, 1e4)]
    assert dict(attention[4].rope_scaling_params) == pytest.approx(
        {"a": 2 * np.pi / 1024, "b": 2 * np.pi / 256, "rho": 2 * np.pi / 1024})
    assert [stages.stage_config(config, s).data.pose_length for s in schedule] == \
        [0, 0, 0, 0, 0, 1024]
    config_lib.validate(config)


@pytest.mark.parametrize("extension, message", [
    ("pi:4", "part .pi:4.; allowed"),
    ("yarn:0", "part 'yarn:0'"), ("pose:100", r"'pose:N' with N >= the stage's seq_len 256"),
    ("dynamic_ntk:2", "part 'dynamic_ntk:2'"),
])
def test_bad_extensions_are_named(extension, message):
    config = _config(**{"train.stages": ((500, 256, 1e4), (500, 256, 1e4, extension))})
    with pytest.raises(ValueError, match=r"config\.train\.stages\[1\] has .*" + message):
        config_lib.validate(config)


def test_pose_needs_row_positions_and_concat_text():
    config = _config(**{"train.stages": ((500, 256, 1e4), (500, 256, 1e4, "pose:1024"))})
    config.data.positions = "document"
    with pytest.raises(ValueError, match="PoSE .* needs a text source with config.data."
                                         "positions='row'"):
        config_lib.validate(config)


def test_a_run_fine_tunes_through_extension_stages(tiny_config, tmp_path, monkeypatch):
    """Pretrain at 32, then PI at 128, PoSE over 128 at 32, ABF at 128: each stage trains
    the model and the positions it names; evaluation uses the last stage's model."""
    built, positions = [], Counter()
    make_step, put = loop.make_train_step, loop.put_batch

    def recording_step(config, model, mesh):
        a = config.model.mixer_options.attention
        built.append((config.data.seq_len, a.rope_base, a.rope_scaling, a.rope_scaling_factor,
                      a.train_length, config.data.pose_length))
        return make_step(config, model, mesh)

    def recording_put(batch, mesh, **kwargs):
        if "positions" in batch:
            positions[len(built) - 1] = max(positions[len(built) - 1],
                                            int(np.max(batch["positions"])))
        return put(batch, mesh, **kwargs)

    monkeypatch.setattr(loop, "make_train_step", recording_step)
    monkeypatch.setattr(loop, "put_batch", recording_put)
    config = tiny_config(train__stages=((2, 32, 1e4), (2, 128, 1e4, "linear:4"),
                                        (2, 32, 1e4, "pose:128"), (2, 128, 5e5)),
                         train__steps=8, data__batch_size=32, eval__every_steps=8,
                         checkpoint__every_steps=8)
    results = train_and_evaluate(config, tmp_path / "run")
    assert built == [(32, 1e4, "none", 1.0, None, 0), (128, 1e4, "linear", 4.0, 32, 0),
                     (32, 1e4, "none", 1.0, None, 128), (128, 5e5, "none", 1.0, None, 0)]
    assert positions[0] == 31 and 31 < positions[2] < 128
    assert np.isfinite(results["validation"]["loss"])
