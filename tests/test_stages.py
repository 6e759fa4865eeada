"""Progressive length extension: the stage schedule, its errors, and a run that resumes
inside its second stage exactly."""

import shutil
from collections import Counter

import pytest

from longjax.train import config as config_lib
from longjax.train import loop, stages, train_and_evaluate
from longjax.train.metrics import read_metrics


def _config(**overrides):
    config = config_lib.base_config()  # 16 x 256 = 4096 tokens per step, 1000 steps
    return config_lib.apply_overrides(config, overrides)


def test_schedule_and_stage_config():
    assert stages.schedule(_config()) == [stages.Stage(0, 1000, 256, 10000.0)]
    config = _config(**{"train.stages": ((600, 128, 1e4), (400, 512, 5e5))})
    schedule = stages.schedule(config)
    assert schedule == [stages.Stage(0, 600, 128, 1e4), stages.Stage(600, 400, 512, 5e5)]
    assert [stages.stage_at(schedule, s) for s in (0, 599, 600, 999, 1000)] == [0, 0, 1, 1, 1]
    second = stages.stage_config(config, schedule[1])
    assert (second.data.seq_len, second.data.batch_size) == (512, 8)  # 4096 tokens per step
    assert second.model.mixer_options.attention.rope_base == 5e5
    assert (config.data.seq_len, config.model.mixer_options.attention.rope_base) == (256, 1e4)


@pytest.mark.parametrize("value, message", [
    (((-5, 128, 1e4), (1005, 256, 1e4)), r"stages\[0\] has steps=-5; a stage needs a positive"),
    (((0, 128, 1e4), (1000, 256, 1e4)), r"stages\[0\] has steps=0"),
    (((500, 128, 1e4), (400, 256, 1e4)), r"stages sum to 900, but config.train.steps=1000"),
    (((1000, 96, 1e4),), r"stages\[0\] has seq_len=96; .* = 4096"),
    (((1000, 256, -1.0),), r"stages\[0\] has rope_base=-1.0; it must be positive"),
    (((1000, 256),), r"stages\[0\]=\(1000, 256\) must be \(steps, seq_len, rope_base\)"),
])
def test_bad_stages_name_the_field(value, message):
    with pytest.raises(ValueError, match=r"config\.train\." + message):
        config_lib.validate(_config(**{"train.stages": value}))


def test_stage_batches_must_divide_over_shards_and_not_mix_with_decomposition():
    config = _config(**{"train.stages": ((500, 256, 1e4), (500, 1024, 5e5))})
    config_lib.validate(config, num_data_shards=4)
    with pytest.raises(ValueError, match=r"stages\[1\] \(seq_len=1024\) trains batches of 4"):
        config_lib.validate(config, num_data_shards=8)
    config.data.packing = "decomposition"
    with pytest.raises(ValueError, match="stages cannot be combined with .*'decomposition'"):
        config_lib.validate(config)


def test_run_killed_in_stage_two_resumes_in_stage_two_exactly(tiny_config, tmp_path,
                                                              monkeypatch):
    built, shapes = [], []
    make_step, put = loop.make_train_step, loop.put_batch

    def recording_step(config, model, mesh):
        built.append((config.data.seq_len, config.model.mixer_options.attention.rope_base))
        return make_step(config, model, mesh)

    def recording_put(batch, mesh, **kwargs):
        shapes.append(batch["tokens"].shape)
        return put(batch, mesh, **kwargs)

    monkeypatch.setattr(loop, "make_train_step", recording_step)
    monkeypatch.setattr(loop, "put_batch", recording_put)
    config = tiny_config(train__stages=((3, 16, 1e4), (3, 32, 5e5)), checkpoint__every_steps=2,
                         checkpoint__keep=4, eval__every_steps=6, data__eval_seq_lens=(128,))
    unbroken, killed = tmp_path / "unbroken", tmp_path / "killed"
    results = train_and_evaluate(config, unbroken)
    assert set(results) == {"validation", "validation_len128"}  # 4x the training length
    assert built == [(16, 1e4), (32, 5e5)]
    # training: 3 batches of 16 x 16, then 3 of 8 x 32; evaluation: 2 batches at 32 and
    # the 1 at 128 that holds as many tokens (rounded down, at least one)
    assert Counter(shapes) == {(16, 16): 3, (8, 32): 3 + 2, (8, 128): 1}
    assert sorted(p.name for p in (unbroken / "checkpoints").iterdir()) == ["2", "3", "4", "6"]

    shutil.copytree(unbroken, killed)
    shutil.rmtree(killed / "checkpoints" / "6")  # killed after the checkpoint at step 4
    built.clear()
    shapes.clear()
    train_and_evaluate(config, killed)
    assert built == [(32, 5e5)]  # resumed in stage two, with its length and RoPE base
    assert Counter(shapes) == {(8, 32): 2 + 2, (8, 128): 1}

    def curve(workdir):
        return [(r["step"], r["split"], r["loss"], r.get("grad_norm"))
                for r in read_metrics(workdir)]

    assert curve(killed) == curve(unbroken)
