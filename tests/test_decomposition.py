"""Dataset decomposition: single-document sequences, constant tokens per step, the
curriculum, one compile per bucket, exact resume, and clear config errors."""

import json
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from longjax.data import decomposition
from longjax.data.pipeline import make_train_stream
from longjax.parallel.mesh import make_mesh
from longjax.train import (
    build_model,
    create_train_state,
    make_train_step,
    put_batch,
    train_and_evaluate,
)
from longjax.train import config as config_lib
from longjax.train import step as step_lib
from longjax.train.metrics import read_metrics

BUCKETS = (8, 16, 32)


def _docs(lengths):
    """Document i is filled with token i % 256 (so a row's tokens name its documents)."""
    return [np.full(n, i % 256, np.int32) for i, n in enumerate(lengths)]


def test_binary_decomposition_of_a_document():
    # 32 * 2 + 16 + 4 targets; bucket 4 takes the 4, nothing is dropped.
    pieces = decomposition.decompose(np.array([85]), (4, 8, 16, 32))
    assert {n: p.tolist() for n, p in pieces.items()} == {
        4: [[0, 80]], 8: [], 16: [[0, 64]], 32: [[0, 0], [0, 32]]}
    # Without a bucket of 4 the last 4 targets are dropped.
    assert decomposition.decompose(np.array([85]), (8, 16, 32))[8].shape == (0, 2)


def test_no_sequence_crosses_a_document():
    lengths = np.random.default_rng(0).integers(1, 200, 80)
    data = decomposition.DecomposedDataset(_docs(lengths), BUCKETS)
    covered = np.zeros(len(lengths), np.int64)
    for n in BUCKETS:
        rows = data.rows(n, np.arange(data.num_rows(n)))
        assert rows["tokens"].shape == (data.num_rows(n), n + 1)
        assert np.all(rows["tokens"] == rows["tokens"][:, :1])  # one document per row
        assert np.all(np.diff(rows["positions"], axis=1) == 1)
        assert np.all(rows["segment_ids"] == 1)
        doc, start = data.pieces[n].T
        assert np.all(start + n + 1 <= lengths[doc])
        np.add.at(covered, doc, n)
    # every target is in one piece; what is left is shorter than the shortest bucket
    left = np.maximum(lengths - 1, 0) - covered
    assert np.all((left >= 0) & (left < BUCKETS[0]))
    assert data.stats()["dropped_targets"] == pytest.approx(left.sum() / (lengths - 1).sum())


def _sampler(curriculum="uniform", cycle_steps=40, rows=(1000, 200, 100)):
    odds = decomposition.curriculum_odds(curriculum, BUCKETS)
    return decomposition.CurriculumSampler(dict(zip(BUCKETS, rows, strict=True)), odds,
                                           tokens_per_step=256, cycle_steps=cycle_steps, seed=3)


def test_tokens_per_step_constant_and_cycle_shares():
    sampler = _sampler(cycle_steps=40)
    drawn = [sampler.next() for _ in range(40)]
    assert all(len(picks) * n == 256 for n, picks in drawn)
    counts = {n: sum(m == n for m, _ in drawn) for n in BUCKETS}
    # a cycle gives each bucket its share of the tokens: 1000*8 : 200*16 : 100*32
    assert counts == {8: 22, 16: 9, 32: 9}
    # pieces of a bucket are not repeated before the bucket is used up
    picks = np.concatenate([p for n, p in drawn if n == 8])
    assert len(set(picks.tolist())) == len(picks)


def test_every_bucket_gets_a_batch_per_cycle():
    # A bucket with a tiny share of the tokens still has a batch in every cycle of at least
    # one step per bucket (the embedded corpus: 0.6% of the targets in buckets 32..128).
    assert decomposition._split(25, [10752, 20736, 36608, 11163136]) == [1, 1, 1, 22]
    assert decomposition._split(2, [1, 1, 98]) == [0, 0, 2]  # fewer steps than buckets
    sampler = _sampler(cycle_steps=10, rows=(2, 2, 1000))
    assert sorted(sampler.next()[0] for _ in range(10)) == [8, 16] + [32] * 8


def test_grow_curriculum_goes_short_to_long_each_cycle():
    def mean_step(lengths, n):  # the mean place of bucket n in a cycle
        return np.mean([i for i, m in enumerate(lengths) if m == n])

    sampler = _sampler("grow_p100", cycle_steps=30)
    lengths = [sampler.next()[0] for _ in range(60)]
    for cycle in (lengths[:30], lengths[30:]):
        assert sorted(cycle) == sorted(lengths[:30])  # every cycle has the same shares
        assert mean_step(cycle, 8) < mean_step(cycle, 16) < mean_step(cycle, 32)
    uniform = _sampler("uniform", cycle_steps=30)
    lengths = [uniform.next()[0] for _ in range(30)]
    assert max(mean_step(lengths, n) for n in BUCKETS) - min(
        mean_step(lengths, n) for n in BUCKETS) < 8


def test_resume_mid_curriculum_gives_the_same_batches():
    unbroken, first = _sampler("grow_p2", 25), _sampler("grow_p2", 25)
    expected = [unbroken.next() for _ in range(70)]
    for _ in range(37):
        first.next()
    saved = json.loads(json.dumps(first.state()))
    resumed = _sampler("grow_p2", 25)
    resumed.restore(saved)
    for n, picks in expected[37:]:
        m, got = resumed.next()
        assert m == n and np.array_equal(got, picks)
    with pytest.raises(ValueError, match="same config.data.bucket_lengths"):
        decomposition.CurriculumSampler({8: 10, 16: 10}, {8: 1.0, 16: 1.0}, tokens_per_step=256,
                                        cycle_steps=5, seed=0).restore(saved)


@pytest.fixture(scope="module")
def short_texts(tmp_path_factory):
    """120 text files of 17-60 bytes: short documents that fill both buckets."""
    folder = tmp_path_factory.mktemp("short_texts")
    text = pathlib.Path(json.__file__).read_text()
    rng = np.random.default_rng(0)
    for i in range(120):
        n = int(rng.integers(17, 60))
        start = int(rng.integers(0, len(text) - n))
        (folder / f"doc{i:03d}.txt").write_text(text[start:start + n])
    return folder


def _decomposition_config(tiny_config, folder, **overrides):
    return tiny_config(data__path=str(folder), data__packing="decomposition",
                       data__bucket_lengths=(16, 32), **overrides)


def test_step_compiles_once_per_bucket(tiny_config, short_texts, monkeypatch):
    traces = []
    loss = step_lib.loss_and_sums

    def counted(params, batch, model):
        traces.append(batch["tokens"].shape)
        return loss(params, batch, model)

    monkeypatch.setattr(step_lib, "loss_and_sums", counted)
    config = _decomposition_config(tiny_config, short_texts, train__steps=8,
                                   data__curriculum_cycles=2)
    stream = make_train_stream(config)
    mesh = make_mesh({"data": -1})
    model = build_model(config)
    state = create_train_state(config, model, mesh, jax.random.key(0))
    train_step = make_train_step(config, model, mesh)
    shapes = []
    for _ in range(8):
        batch = stream.next()
        shapes.append(batch["tokens"].shape)
        assert batch["tokens"].size == 8 * 32 and batch["weights"].min() == 1
        state, _ = train_step(state, put_batch(batch, mesh))
    assert set(shapes) == {(16, 16), (8, 32)}
    assert sorted(traces) == sorted(set(shapes))  # one trace per bucket, none per batch


def test_train_loop_resumes_mid_curriculum_exactly(tiny_config, short_texts, tmp_path):
    config = _decomposition_config(tiny_config, short_texts, train__steps=6,
                                   data__curriculum="grow_p2", data__curriculum_cycles=2,
                                   checkpoint__every_steps=2, checkpoint__keep=3,
                                   eval__every_steps=6)
    unbroken, killed = tmp_path / "unbroken", tmp_path / "killed"
    train_and_evaluate(config, unbroken)
    shutil.copytree(unbroken, killed)
    for step in ("4", "6"):  # as if killed after the checkpoint at step 2, mid-cycle
        shutil.rmtree(killed / "checkpoints" / step)
    train_and_evaluate(config, killed)

    def curve(workdir):
        return [(r["step"], r["split"], r["loss"]) for r in read_metrics(workdir)]

    assert curve(killed) == curve(unbroken)
    saved = []
    for workdir in (killed, unbroken):
        manager = ocp.CheckpointManager((workdir / "checkpoints").absolute(), item_handlers={
            "state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
        restored = manager.restore(6, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
        saved.append((jax.tree.leaves(restored["state"]["params"]), restored["data"]["stream"]))
    assert saved[0][1] == saved[1][1]
    for a, b in zip(saved[0][0], saved[1][0], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("overrides, message", [
    ({"data.bucket_lengths": (64, 96)}, r"bucket_lengths=\(64, 96\) must be distinct powers "
                                        r"of two.*bad entries: \[96\]"),
    ({"data.bucket_lengths": (64, 64)}, "distinct powers of two"),
    ({"data.curriculum": "64:2,512:1"}, r"curriculum='64:2,512:1' names bucket 512, which "
                                        r"does not exist.*\[64, 128, 256\]"),
    ({"data.curriculum": "grow"}, r"config.data.curriculum='grow'; allowed: \['grow_linear'"),
    ({"data.curriculum": "64:0"}, "gives no bucket positive odds"),
    ({"data.curriculum_cycles": 0}, r"config.data.curriculum_cycles=0 must be"),
    ({"data.bucket_lengths": (64, 8192)}, "bucket_lengths entry 8192: the tokens per step"),
    ({"data.packing": "pack"}, r"config.data.packing='pack'; allowed"),
])
def test_bad_decomposition_configs(overrides, message):
    config = config_lib.base_config()
    config_lib.apply_overrides(config, {"data.packing": "decomposition", **overrides})
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


def test_batch_per_bucket_must_divide_over_shards():
    config = config_lib.base_config()  # 64 x 64 tokens: bucket 256 has batches of 16
    config_lib.apply_overrides(config, {"data.packing": "decomposition", "data.seq_len": 64,
                                        "data.batch_size": 64})
    config_lib.validate(config, num_data_shards=16)
    with pytest.raises(ValueError, match="entry 256.*batch of 16 rows.*32 data-parallel"):
        config_lib.validate(config, num_data_shards=32)
