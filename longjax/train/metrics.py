"""Metrics to `metrics.jsonl` and TensorBoard event files, and the loss-curve plot."""

from __future__ import annotations

import json
import pathlib

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends `{"step", "split", ...}` records; on resume drops records after `resume_step`.

    So a run killed after its last checkpoint and resumed writes the same metrics as an
    unbroken run (TensorBoard purges the same steps through `purge_step`). In a
    multi-process run only process 0 writes; the others' writer does nothing.
    """

    def __init__(self, workdir, *, resume_step: int = 0):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        self.path = pathlib.Path(workdir) / METRICS_FILE
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tensorboard = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        record = {"step": step, "split": split, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            self.tensorboard.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.active:
            self.tensorboard.close()


def read_metrics(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_loss_curve(workdir, key: str = "bits_per_byte") -> pathlib.Path:
    """`loss_curve.png`: metric `key` versus step for every split in the metrics file."""
    records = read_metrics(workdir)
    fig, ax = plt.subplots(figsize=(6, 4))
    for split in dict.fromkeys(r["split"] for r in records):
        points = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker=None if split == "train" else "o", label=split)
    ax.set_xlabel("step")
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
    path = pathlib.Path(workdir) / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
