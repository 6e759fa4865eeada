"""The train loop: outputs, exact resume after SIGKILL, data parallelism, bad workdirs."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from longjax.parallel.mesh import make_mesh
from longjax.train import (
    build_model,
    create_train_state,
    make_train_step,
    put_batch,
    train_and_evaluate,
)
from longjax.train.metrics import read_metrics

from conftest import REPO, TINY


def test_train_and_evaluate_writes_metrics_checkpoints_and_plot(tiny_config, tmp_path):
    results = train_and_evaluate(tiny_config(), tmp_path)
    assert set(results) == {"validation"} and np.isfinite(results["validation"]["bits_per_byte"])
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in records if r["split"] == "validation"] == [3, 6]
    assert {"loss", "bits_per_byte", "learning_rate", "grad_norm", "tokens_per_sec"} <= set(
        records[0])
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert list((tmp_path / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 6]


def test_data_parallel_step_matches_one_device(tiny_config):
    config = tiny_config()
    model = build_model(config)
    from longjax.data.pipeline import make_dataset

    batch = make_dataset(config, "train").batch(0, config.data.batch_size)
    losses = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = make_mesh({"data": -1}, devices)
        state = create_train_state(config, model, mesh, jax.random.key(0))
        step = make_train_step(config, model, mesh)
        for _ in range(2):
            state, metrics = step(state, put_batch(batch, mesh))
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_batch_must_divide_over_devices(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="batch_size=12.*8 data-parallel shards"):
        train_and_evaluate(tiny_config(data__batch_size=12), tmp_path)


def test_workdir_of_another_model_is_refused(tiny_config, tmp_path):
    train_and_evaluate(tiny_config(train__steps=3, train__warmup_steps=0), tmp_path)
    with pytest.raises(ValueError, match=r"different model.*d_model: checkpoint 32 vs config 48"):
        train_and_evaluate(tiny_config(model__d_model=48), tmp_path)
    (tmp_path / "config.json").unlink()  # without the record, the arrays still disagree
    mismatch = r"does not match the model: .*embed/embedding: checkpoint \(264, 32\) vs model"
    with pytest.raises(ValueError, match=mismatch):
        train_and_evaluate(tiny_config(model__d_model=48), tmp_path)


def test_workdir_of_an_older_longjax_resumes(tiny_config, tmp_path):
    """A config.json saved before some mixer options existed (here the attention cache
    options, whose defaults are a tuple and None) is read with their defaults."""
    config = tiny_config(train__steps=3, train__warmup_steps=0)
    train_and_evaluate(config, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for field in ("cache_options", "cache_budget"):
        del saved["model"]["mixer_options"]["attention"][field]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    train_and_evaluate(tiny_config(train__steps=4, train__warmup_steps=0), tmp_path)


def _train_command(workdir, folder, steps=120):
    """scripts/train.py on the tiny config for `steps`, logging 12 times, checkpointing 6
    times and evaluating twice."""
    arg = TINY.replace("steps=6", f"steps={steps}")
    arg = arg.replace("train.log_every=2", f"train.log_every={steps // 12}")
    arg = arg.replace("checkpoint.every_steps=3", f"checkpoint.every_steps={steps // 6}")
    arg = arg.replace("eval.every_steps=3", f"eval.every_steps={steps // 2}")
    return [sys.executable, str(REPO / "scripts/train.py"), f"--config=configs/quickstart.py:{arg}",
            f"--workdir={workdir}", "--config.data.source=files", f"--config.data.path={folder}"]


def _final_params(workdir, step=120):
    """The parameters saved at `step` (by one process or several), on one device here."""
    manager = ocp.CheckpointManager(pathlib.Path(workdir, "checkpoints").absolute(),
                                    item_handlers={"state": ocp.StandardCheckpointHandler()})
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                          manager.item_metadata(step)["state"])
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return jax.tree.leaves(restored["state"]["params"])


def _curve(workdir):
    return [(r["step"], r["split"], r["loss"], r.get("grad_norm"))
            for r in read_metrics(workdir)]


# A Mamba + attention hybrid whose Mamba layer carries its final states into the next row
# of its batch slot: a resumed run must restore the carried states and the stream's place.
CARRIED_STATES = ["--config.model.mixer=mamba,attention", "--config.data.packing=contiguous",
                  "--config.train.initial_state=carry"]


def test_sigkill_mid_training_resumes_exactly(text_folder, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    killed, unbroken = tmp_path / "killed", tmp_path / "unbroken"

    def command(workdir):
        return _train_command(workdir, text_folder) + CARRIED_STATES

    process = subprocess.Popen(command(killed), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        logged = metrics.exists() and any(json.loads(l)["step"] >= 50 for l in
                                          metrics.read_text().splitlines() if l)
        if logged and (killed / "checkpoints" / "40").exists():  # killed after step 50
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(r["step"] for r in read_metrics(killed)) < 120
    for workdir in (killed, unbroken):
        subprocess.run(command(workdir), cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _curve(killed) == _curve(unbroken)
    for a, b in zip(_final_params(killed), _final_params(unbroken), strict=True):
        np.testing.assert_array_equal(a, b)
