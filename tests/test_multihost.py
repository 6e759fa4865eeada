"""Two processes with 4 CPU devices each train like one process with 8 devices.

The test starts this file twice as a script (`python tests/test_multihost.py ...`): each
process joins through `jax.distributed` with a localhost coordinator and gloo collectives,
and trains the quickstart model (tiny sizes) on a data=2 x sequence=4 mesh spanning both.
"""

import json
import socket
import subprocess
import sys

import numpy as np

MESH = {"data": 2, "sequence": 4}
STEPS = 3


def tiny_config(repo, tiny, text_folder):
    from longjax.train.cli import load_config_file
    from longjax.train.config import apply_overrides

    config = load_config_file(f"{repo}/configs/quickstart.py:{tiny}")
    config.data.source, config.data.path = "files", str(text_folder)
    return apply_overrides(config, {"model.num_layers": 1})


def train_losses(config):
    """Losses of the first `STEPS` train steps on `MESH` over all processes' devices."""
    import jax

    from longjax.data.pipeline import make_dataset
    from longjax.parallel.mesh import make_mesh
    from longjax.train import build_model, create_train_state, make_train_step, put_batch

    mesh = make_mesh(MESH)
    model = build_model(config)
    state = create_train_state(config, model, mesh, jax.random.key(config.seed))
    step = make_train_step(config, model, mesh)
    data = make_dataset(config, "train")
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, put_batch(data.batch(i, config.data.batch_size), mesh))
        losses.append(float(metrics["loss"]))
    return losses


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(text_folder):
    import jax

    from conftest import REPO, TINY

    port = _free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, str(REPO), TINY, str(text_folder), str(port), str(i)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    expected = train_losses(tiny_config(REPO, TINY, text_folder))
    assert len(jax.devices()) == 8 and jax.process_count() == 1
    for worker in workers:
        try:
            out, err = worker.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            raise
        assert worker.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert report["process_count"] == 2 and report["devices"] == 8
        assert report["local_devices"] == 4
        np.testing.assert_allclose(report["losses"], expected, rtol=1e-5)


def _worker(repo, tiny, text_folder, port, process_id):
    import os

    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, repo)
    from longjax.parallel.mesh import initialize_distributed

    initialize_distributed(f"localhost:{port}", 2, int(process_id), cpu_devices=4)
    import jax

    losses = train_losses(tiny_config(repo, tiny, text_folder))
    print(json.dumps({"losses": losses, "process_count": jax.process_count(),
                      "devices": jax.device_count(), "local_devices": jax.local_device_count()}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    _worker(*sys.argv[1:])
