"""`train_and_evaluate(config, workdir)`: the training loop behind scripts/train.py.

Multi-host (after `longjax.distributed.join`): every process runs this loop on the global
mesh and reads only its rows of each batch; process 0 alone writes metrics, TensorBoard,
plots, the config and the progress bar; Orbax checkpoints are written by all together.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from longjax.data.pipeline import PackedDataset, make_dataset, make_train_stream, ruler_dataset
from longjax.parallel.mesh import make_mesh
from longjax.train import config as config_lib
from longjax.train import stages as stages_lib
from longjax.train.checkpoint import Checkpointer
from longjax.train.metrics import MetricsWriter, plot_loss_curve
from longjax.train.state import build_model, create_train_state
from longjax.train.step import (
    make_eval_step,
    make_train_step,
    process_rows,
    put_batch,
    summarize,
)

# Evaluation batches of a synthetic task when config.eval.num_batches is -1.
TASK_EVAL_BATCHES = 8


def evaluate(eval_step, params, dataset, mesh, *, batch_size, num_batches) -> dict[str, float]:
    """Loss, bits per byte, accuracy and sequence accuracy over `num_batches` batches
    (-1: the whole split)."""
    if num_batches == -1:
        num_batches = (dataset.num_batches(batch_size) if hasattr(dataset, "num_batches")
                       else TASK_EVAL_BATCHES)
    totals = None
    rows = process_rows(mesh, batch_size)
    for i in range(num_batches):
        sums = eval_step(params, put_batch(dataset.batch(i, batch_size, rows), mesh,
                                           batch_size=batch_size))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    return summarize(totals)


def eval_datasets(config) -> dict[str, object]:
    """Named evaluation sets: a task at each of `data.eval_seq_lens`, or the eval split in
    rows of `data.seq_len` ("validation") and of each other `data.eval_seq_lens` length
    ("validation_len{n}", e.g. 4x the training length), with `data.ruler_tasks` at each
    of these lengths ("ruler_len{n}": accuracy of the answer tokens, sequence accuracy of
    whole answers, teacher-forced)."""
    d = config.data
    if d.source == "task":
        lengths = tuple(d.eval_seq_lens) or (d.seq_len,)
        return {f"eval_len{n}": make_dataset(config, "validation", seq_len=n) for n in lengths}
    sets = {"validation": make_dataset(config, "validation")}
    for n in dict.fromkeys(d.eval_seq_lens):
        if n != d.seq_len:
            sets[f"validation_len{n}"] = make_dataset(config, "validation", seq_len=n)
    for n in dict.fromkeys((d.seq_len, *d.eval_seq_lens)) if d.ruler_tasks else ():
        sets[f"ruler_len{n}"] = ruler_dataset(config, "validation", seq_len=n)
    return sets


def train_and_evaluate(config, workdir) -> dict[str, dict[str, float]]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the
    final evaluation metrics per evaluation set.

    The run goes through the length stages of `config.train.stages` (one stage when
    empty), each with its own sequence length, RoPE base, model and jitted step, carrying
    parameters and optimizer state over. The checkpoint's data state records the step,
    the training stream's position and the training seconds so far.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = config_lib.with_hf_init(config)
    mesh = make_mesh(config.parallel.to_dict())
    config_lib.validate(config, num_data_shards=mesh.shape["data"] * mesh.shape["fsdp"],
                        num_sequence_shards=mesh.shape["sequence"])
    t = config.train
    stages = stages_lib.schedule(config)

    eval_sets = eval_datasets(config)
    checkpointer = Checkpointer(workdir, config)
    state = create_train_state(config, build_model(config), mesh, jax.random.key(config.seed))
    state, data_state = checkpointer.restore(state)
    if data_state is None and config.init.hf:  # a new run starts from the checkpoint
        from longjax import hf  # longjax.hf builds on longjax.train.config

        state = state.replace(params=hf.load_params(config.init.hf, build_model(config),
                                                    mesh=mesh))
        logging.info("Initialised from the Hugging Face checkpoint %s", config.init.hf)
    data_state = data_state or {}
    start = int(data_state.get("batches_consumed", 0))
    train_seconds = float(data_state.get("train_seconds", 0.0))
    if start:
        logging.info("Resumed from the checkpoint at step %d in %s", start, workdir)
    checkpointer.write_config()
    writer = MetricsWriter(workdir, resume_step=start)

    primary = jax.process_index() == 0
    progress = tqdm(total=t.steps, initial=start, disable=not (t.progress_bar and primary),
                    unit="step", dynamic_ncols=True)
    results = {}
    for number in range(stages_lib.stage_at(stages, start), len(stages)):
        stage = stages[number]
        stage_cfg = stages_lib.stage_config(config, stage)
        model = build_model(stage_cfg)
        train_step = make_train_step(stage_cfg, model, mesh)
        eval_step = make_eval_step(stage_cfg, model, mesh)
        first = max(start, stage.start)
        stream = make_train_stream(stage_cfg, index=first - stage.start,
                                   rows=functools.partial(process_rows, mesh))
        if first > stage.start and "stream" in data_state:
            stream.restore(data_state["stream"])
        if first == stage.start and primary:
            _write_json(workdir / f"train_data_stage{number}.json", stream.stats)
        if len(stages) > 1:
            logging.info("Stage %d: steps %d-%d at seq_len %d, RoPE base %g, scaling %s x%g, "
                         "PoSE length %d", number, stage.start, stage.stop, stage.seq_len,
                         stage.rope_base, stage.rope_scaling, stage.rope_scaling_factor,
                         stage.pose_length)
        tick, tokens_since, logged_seconds = time.perf_counter(), 0, 0.0
        for step in range(first, stage.stop):
            batch = stream.next()
            state, metrics = train_step(state, put_batch(batch, mesh,
                                                         batch_size=stream.batch_size))
            tokens_since += stream.batch_size * batch["tokens"].shape[1]
            done = step + 1
            log = done % t.log_every == 0 or done == stage.stop
            evaluate_now = done % config.eval.every_steps == 0 or done == t.steps
            save = done % config.checkpoint.every_steps == 0 or done in (stage.stop, t.steps)
            if log or evaluate_now or save:
                metrics = jax.device_get(metrics)  # waits for the step: the clock is exact
                now = time.perf_counter()
                train_seconds += now - tick
                logged_seconds += now - tick
                tick = now
            if log:
                record = dict(summarize({k: metrics[k] for k in ("loss_sum", "weight", "bytes",
                                                                 "correct", "rows",
                                                                 "rows_correct")}),
                              grad_norm=metrics["grad_norm"],
                              learning_rate=metrics["learning_rate"],
                              tokens_per_sec=tokens_since / logged_seconds,
                              train_seconds=train_seconds)
                writer.write(done, "train", record)
                progress.set_postfix(bpb=f"{record['bits_per_byte']:.3f}",
                                     tok_s=f"{record['tokens_per_sec']:.0f}")
                logging.info("step %d train: %s", done, _fmt(record))
                tokens_since, logged_seconds = 0, 0.0
            pause = time.perf_counter()  # evaluation and checkpoints are not training time
            if evaluate_now:
                results = _run_eval(eval_step, state.params, eval_sets, mesh, config, writer,
                                    done, train_seconds)
            if save:
                checkpointer.save(done, state, {"batches_consumed": done,
                                                "train_seconds": train_seconds,
                                                "stream": stream.state()})
            tick += time.perf_counter() - pause
            progress.update(1)
    progress.close()
    if not results:  # resumed at the end: evaluate the final state once more
        results = _run_eval(eval_step, state.params, eval_sets, mesh, config, writer, t.steps,
                            train_seconds)
    checkpointer.wait()
    writer.close()
    if primary:
        plot = plot_loss_curve(workdir, "bits_per_byte" if config.data.source != "task"
                               else "accuracy")
        logging.info("Checkpoints: %s; metrics: %s; plot: %s", workdir / "checkpoints",
                     workdir / "metrics.jsonl", plot)
    return results


def eval_num_batches(config, dataset) -> int:
    """`config.eval.num_batches` counts batches of `data.seq_len` tokens; text evaluated at
    a longer length gets the batches that hold the same tokens (-1: the whole split)."""
    n = config.eval.num_batches
    if n == -1 or not isinstance(dataset, PackedDataset) or dataset.seq_len <= config.data.seq_len:
        return n
    return max(1, n * config.data.seq_len // dataset.seq_len)


def _run_eval(eval_step, params, eval_sets, mesh, config, writer, step, train_seconds):
    results = {}
    for name, dataset in eval_sets.items():
        results[name] = evaluate(eval_step, params, dataset, mesh,
                                 batch_size=config.eval.batch_size,
                                 num_batches=eval_num_batches(config, dataset))
        writer.write(step, name, dict(results[name], train_seconds=train_seconds))
        logging.info("step %d %s: %s", step, name, _fmt(results[name]))
    return results


def _write_json(path: pathlib.Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n")
    logging.info("%s: %s", path.name, _fmt(record))


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if np.isfinite(v))
