"""Multi-process runs: two processes with 4 CPU devices each train like one process with 8
devices, each reading only its rows; `scripts/train.py` launched as two processes, killed
and restarted, resumes exactly; joining detects cluster launchers and refuses half-given
flags.

The tests start processes on localhost that join through `jax.distributed` with a local
coordinator (`longjax.distributed.join` and the scripts' `--coordinator_address`,
`--num_processes`, `--process_id` flags) and gloo collectives, on a data=2 x sequence=4
mesh spanning both.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from longjax import distributed

MESH = {"data": 2, "sequence": 4}
STEPS = 3


def tiny_config(repo, tiny, text_folder):
    from longjax.train.cli import load_config_file
    from longjax.train.config import apply_overrides

    config = load_config_file(f"{repo}/configs/quickstart.py:{tiny}")
    config.data.source, config.data.path = "files", str(text_folder)
    return apply_overrides(config, {"model.num_layers": 1})


def train_losses(config):
    """Losses of the first `STEPS` train steps on `MESH` over all processes' devices, and
    the rows of each global batch that this process read."""
    import jax

    from longjax.data.pipeline import make_train_stream
    from longjax.parallel.mesh import make_mesh
    from longjax.train import (
        build_model,
        create_train_state,
        make_train_step,
        process_rows,
        put_batch,
    )

    mesh = make_mesh(MESH)
    model = build_model(config)
    state = create_train_state(config, model, mesh, jax.random.key(config.seed))
    step = make_train_step(config, model, mesh)
    rows = process_rows(mesh, config.data.batch_size)
    stream = make_train_stream(config, rows=lambda _: rows)
    losses = []
    for _ in range(STEPS):
        batch = stream.next()
        assert len(batch["tokens"]) == len(rows)
        state, metrics = step(state, put_batch(batch, mesh, batch_size=config.data.batch_size))
        losses.append(float(metrics["loss"]))
    return losses, rows.tolist()


def _worker_env():
    """4 CPU devices per process, and this checkout's longjax."""
    from conftest import REPO

    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4", PYTHONPATH=str(REPO))


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _communicate(workers, timeout=240):
    outs = []
    for worker in workers:
        try:
            out, err = worker.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            raise
        assert worker.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def test_two_processes_train_like_one_reading_their_rows(text_folder):
    import jax

    from conftest import REPO, TINY

    port = _free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, str(REPO), TINY, str(text_folder), str(port), str(i)],
            cwd=REPO, env=_worker_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    expected, rows = train_losses(tiny_config(REPO, TINY, text_folder))
    assert len(jax.devices()) == 8 and jax.process_count() == 1 and rows == list(range(8))
    reports = [json.loads(out.strip().splitlines()[-1]) for out in _communicate(workers)]
    assert [r["rows"] for r in reports] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # data=2 halves
    for report in reports:
        assert report["process_count"] == 2 and report["devices"] == 8
        assert report["local_devices"] == 4 and report["launcher"] == "flags"
        np.testing.assert_allclose(report["losses"], expected, rtol=1e-5)


def _worker(repo, tiny, text_folder, port, process_id):
    found = distributed.join(f"localhost:{port}", 2, int(process_id))
    import jax

    losses, rows = train_losses(tiny_config(repo, tiny, text_folder))
    print(json.dumps({"losses": losses, "rows": rows, "launcher": found,
                      "process_count": jax.process_count(), "devices": jax.device_count(),
                      "local_devices": jax.local_device_count()}))
    jax.distributed.shutdown()


def _start_training(workdir, folder):
    """`scripts/train.py` as two processes of 4 CPU devices (data parallel), 60 steps."""
    from test_train import _train_command

    from conftest import REPO

    port = _free_port()
    command = _train_command(workdir, folder, steps=60)
    return [subprocess.Popen(
        [*command, f"--coordinator_address=localhost:{port}", "--num_processes=2",
         f"--process_id={i}"], cwd=REPO, env=_worker_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def test_two_process_training_killed_and_restarted_resumes_exactly(text_folder, tmp_path):
    from test_train import _curve, _final_params

    from longjax.train.metrics import read_metrics

    killed, unbroken = tmp_path / "killed", tmp_path / "unbroken"
    workers = _start_training(killed, text_folder)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and all(w.poll() is None for w in workers):
        logged = metrics.exists() and any(json.loads(l)["step"] >= 25 for l in
                                          metrics.read_text().splitlines() if l)
        if logged and (killed / "checkpoints" / "20").exists():  # killed after step 25
            break
        time.sleep(0.05)
    assert all(w.poll() is None for w in workers), "the run ended before it could be killed"
    for w in workers:
        w.send_signal(signal.SIGKILL)
        w.communicate()
    assert max(r["step"] for r in read_metrics(killed)) < 60
    for workdir in (killed, unbroken):
        outs = _communicate(_start_training(workdir, text_folder))
        assert "validation: loss" in outs[0] and "loss" not in outs[1]  # process 0 prints
    assert _curve(killed) == _curve(unbroken)
    records = [(r["step"], r["split"]) for r in read_metrics(unbroken)]
    assert len(set(records)) == len(records)  # one writer: process 0
    for a, b in zip(_final_params(killed, 60), _final_params(unbroken, 60), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, None),  # sbatch script, not inside srun
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "open_mpi"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu_pod"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "t0:8080"}, "tpu_pod"),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"}, "kubernetes"),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h0:1234"}, "jax_env"),
])
def test_launcher_is_detected_from_the_environment(environ, expected):
    assert distributed.launcher(environ) == expected


def test_join_leaves_a_lone_process_alone_and_refuses_half_given_flags(monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    monkeypatch.setattr("jax.distributed.initialize", lambda *a: calls.append(a))
    assert distributed.join(environ={}) is None
    with pytest.raises(ValueError, match="--num_processes, --process_id must be given"):
        distributed.join("localhost:1234", environ={})
    with pytest.raises(ValueError, match=r"--process_id=2: must be in \[0, --num_processes=2\)"):
        distributed.join("localhost:1234", 2, 2, environ={})
    assert not calls
    slurm = {"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}
    assert distributed.join(environ=slurm) == "slurm"  # JAX reads the rest from SLURM
    assert calls == [(None, None, None)]


if __name__ == "__main__":
    _worker(*sys.argv[1:])
