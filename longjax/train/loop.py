"""`train_and_evaluate(config, workdir)`: the training loop behind scripts/train.py."""

from __future__ import annotations

import pathlib
import time

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from longjax.data.pipeline import make_dataset
from longjax.parallel.mesh import make_mesh
from longjax.train import config as config_lib
from longjax.train.checkpoint import Checkpointer
from longjax.train.metrics import MetricsWriter, plot_loss_curve
from longjax.train.state import build_model, create_train_state
from longjax.train.step import make_eval_step, make_train_step, put_batch, summarize

# Evaluation batches of a synthetic task when config.eval.num_batches is -1.
TASK_EVAL_BATCHES = 8


def evaluate(eval_step, params, dataset, mesh, *, batch_size, num_batches) -> dict[str, float]:
    """Loss, bits per byte and accuracy over `num_batches` batches (-1: the whole split)."""
    if num_batches == -1:
        num_batches = (dataset.num_batches(batch_size) if hasattr(dataset, "num_batches")
                       else TASK_EVAL_BATCHES)
    totals = None
    for i in range(num_batches):
        sums = eval_step(params, put_batch(dataset.batch(i, batch_size), mesh))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    return summarize(totals)


def eval_datasets(config) -> dict[str, object]:
    """Named evaluation sets: the eval split, or a task at each of `data.eval_seq_lens`."""
    d = config.data
    if d.source == "task":
        lengths = tuple(d.eval_seq_lens) or (d.seq_len,)
        return {f"eval_len{n}": make_dataset(config, "validation", seq_len=n) for n in lengths}
    return {"validation": make_dataset(config, "validation")}


def train_and_evaluate(config, workdir) -> dict[str, dict[str, float]]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the
    final evaluation metrics per evaluation set."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(config.parallel.to_dict())
    config_lib.validate(config, num_data_shards=mesh.shape["data"] * mesh.shape["fsdp"])
    t, d = config.train, config.data

    train_data = make_dataset(config, "train")
    eval_sets = eval_datasets(config)
    model = build_model(config)
    checkpointer = Checkpointer(workdir, config)
    state = create_train_state(config, model, mesh, jax.random.key(config.seed))
    state, data_state = checkpointer.restore(state)
    start = 0 if data_state is None else int(data_state["batches_consumed"])
    if start:
        logging.info("Resumed from the checkpoint at step %d in %s", start, workdir)
    checkpointer.write_config()
    writer = MetricsWriter(workdir, resume_step=start)
    train_step = make_train_step(config, model, mesh)
    eval_step = make_eval_step(config, model, mesh)

    def run_eval(step):
        results = {}
        for name, dataset in eval_sets.items():
            results[name] = evaluate(eval_step, state.params, dataset, mesh,
                                     batch_size=config.eval.batch_size,
                                     num_batches=config.eval.num_batches)
            writer.write(step, name, results[name])
            logging.info("step %d %s: %s", step, name, _fmt(results[name]))
        return results

    progress = tqdm(total=t.steps, initial=start, disable=not t.progress_bar,
                    unit="step", dynamic_ncols=True)
    results, tick, tokens_since = {}, time.perf_counter(), 0
    for step in range(start, t.steps):
        state, metrics = train_step(state, put_batch(train_data.batch(step, d.batch_size), mesh))
        tokens_since += d.batch_size * d.seq_len
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - tick
            record = dict(summarize({k: metrics[k] for k in ("loss_sum", "weight", "bytes",
                                                             "correct")}),
                          grad_norm=metrics["grad_norm"], learning_rate=metrics["learning_rate"],
                          tokens_per_sec=tokens_since / elapsed)
            writer.write(done, "train", record)
            progress.set_postfix(bpb=f"{record['bits_per_byte']:.3f}",
                                 tok_s=f"{record['tokens_per_sec']:.0f}")
            logging.info("step %d train: %s", done, _fmt(record))
            tick, tokens_since = time.perf_counter(), 0
        if done % config.eval.every_steps == 0 or done == t.steps:
            results = run_eval(done)
        if done % config.checkpoint.every_steps == 0 or done == t.steps:
            checkpointer.save(done, state, {"batches_consumed": done})
        progress.update(1)
    progress.close()
    if not results:  # resumed at the end: evaluate the final state once more
        results = run_eval(t.steps)
    checkpointer.wait()
    writer.close()
    plot = plot_loss_curve(workdir, "bits_per_byte" if d.source != "task" else "accuracy")
    logging.info("Checkpoints: %s; metrics: %s; plot: %s", workdir / "checkpoints",
                 workdir / "metrics.jsonl", plot)
    return results


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if np.isfinite(v))
