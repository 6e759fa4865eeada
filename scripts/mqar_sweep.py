"""MQAR accuracy by mixer and model width (Arora et al. 2023, "Zoology"), as Markdown.

    taskset -c 0 python scripts/mqar_sweep.py --mixers=attention,linear_attention \
        --widths=16,32,64 --extra=num_kv_pairs=8,num_symbols=64 \
        --workdir_root=workdirs/mqar_sweep --output=docs/results/mqar.md

Each cell trains `configs/mqar.py:mixer=<m>,d_model=<w>,<extra>` with `train_and_evaluate`
in `<workdir_root>/<m>_d<w>`; a cell whose workdir already holds its final evaluation is
read back without training, so rerunning the command only rewrites the tables (use another
workdir root for another `--extra`). The tables: accuracy at the training length (mixer x
width), accuracy per test length at the largest width, parameter counts and CPU seconds per
run, then the command line. They go between the `mqar_sweep tables` markers of `--output`,
keeping the prose around them (a file without the markers is overwritten).
"""

from __future__ import annotations

import json
import pathlib
import shlex
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from longjax.train import build_model, train_and_evaluate
from longjax.train.cli import load_config_file
from longjax.train.metrics import read_metrics

CONFIG = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "mqar.py")
RUN_FILE = "mqar_sweep_run.json"  # CPU seconds of the run that trained the cell
BEGIN, END = "<!-- mqar_sweep tables: begin -->", "<!-- mqar_sweep tables: end -->"

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined on use, so tests can import this module beside other
    scripts that define `--output`)."""
    flags.DEFINE_list("mixers", ["attention", "based", "linear_attention", "retention", "gla",
                                 "deltanet", "mamba", "rglru"],
                      "Registered mixer names (or patterns).")
    flags.DEFINE_list("widths", ["16", "32", "64"], "Model widths (d_model).")
    flags.DEFINE_string("extra", "", "Config arg appended to every cell, "
                        "e.g. num_kv_pairs=8,num_symbols=64.")
    flags.DEFINE_string("workdir_root", "workdirs/mqar_sweep", "One workdir per cell.")
    flags.DEFINE_string("output", "docs/results/mqar.md", "The Markdown file.")


def cell_arg(mixer: str, width: int, extra: str = "") -> str:
    return ",".join(filter(None, [f"mixer={mixer}", f"d_model={width}", extra]))


def final_evals(workdir, steps: int) -> dict[int, float] | None:
    """`{test length: accuracy}` of the evaluation at `steps`, or None before it exists."""
    path = pathlib.Path(workdir)
    if not (path / "metrics.jsonl").exists():
        return None
    evals = {int(r["split"][len("eval_len"):]): r["accuracy"] for r in read_metrics(path)
             if r["split"].startswith("eval_len") and r["step"] == steps}
    return evals or None


def num_params(config) -> int:
    model = build_model(config)
    tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
    return sum(x.size for x in jax.tree.leaves(shapes))


def run_cell(mixer: str, width: int, extra: str, workdir: pathlib.Path) -> dict:
    """Trains the cell unless its workdir is finished; its accuracies, size and cost."""
    config = load_config_file(f"{CONFIG}:{cell_arg(mixer, width, extra)}")
    if final_evals(workdir, config.train.steps) is None:
        start = time.process_time()
        train_and_evaluate(config, workdir)
        (workdir / RUN_FILE).write_text(json.dumps({"cpu_seconds": time.process_time() - start}))
    run = workdir / RUN_FILE
    return {"accuracy": final_evals(workdir, config.train.steps),
            "params": num_params(config),
            "cpu_seconds": json.loads(run.read_text())["cpu_seconds"] if run.exists() else None,
            "train_len": config.data.seq_len}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def markdown(results: dict[tuple[str, int], dict], mixers: list[str], widths: list[int],
             command: str) -> str:
    """The sweep's tables; `results[(mixer, width)]` holds `accuracy` ({length: acc}),
    `params`, `cpu_seconds` and `train_len`."""
    some = next(iter(results.values()))
    train_len, top = some["train_len"], max(widths)
    lengths = sorted({n for r in results.values() for n in r["accuracy"]})
    by_width = [[f"`{m}`"] + [_pct(results[m, w]["accuracy"].get(train_len)) for w in widths]
                for m in mixers]
    by_length = [[f"`{m}`"] + [_pct(results[m, top]["accuracy"].get(n)) for n in lengths]
                 for m in mixers]
    params = [[f"`{m}`"] + [f"{results[m, w]['params']:,}" for w in widths] for m in mixers]
    seconds = [[f"`{m}`"] + ["—" if results[m, w]["cpu_seconds"] is None
                             else f"{results[m, w]['cpu_seconds']:.0f}" for w in widths]
               for m in mixers]
    width_cols = [f"d_model={w}" for w in widths]
    return "\n".join([
        f"Accuracy (%) on the answer positions at the training length ({train_len} tokens):",
        "", *_table(["mixer", *width_cols], by_width), "",
        f"Accuracy (%) by test length at d_model={top} (trained at {train_len} tokens):",
        "", *_table(["mixer", *[f"{n} tokens" for n in lengths]], by_length), "",
        "Parameters:", "", *_table(["mixer", *width_cols], params), "",
        "CPU seconds per run (training, evaluation and compilation):", "",
        *_table(["mixer", *width_cols], seconds), "",
        "Command:", "", "```", command, "```", "",
    ])


def splice(document: str, tables: str) -> str:
    """`document` with the text between its BEGIN and END markers replaced by `tables`
    (the prose around them is kept); just the marked tables when it has no markers."""
    head, begin, rest = document.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not (begin and end):
        head, tail = "", "\n"
    return f"{head}{BEGIN}\n{tables}{END}{tail}"


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    widths = [int(w) for w in FLAGS.widths]
    results = {}
    for mixer in FLAGS.mixers:
        for width in widths:
            workdir = pathlib.Path(FLAGS.workdir_root) / f"{mixer}_d{width}"
            results[mixer, width] = r = run_cell(mixer, width, FLAGS.extra, workdir)
            print(f"{mixer} d_model={width}: {r['accuracy']} ({r['params']:,} parameters)",
                  flush=True)
    command = shlex.join(["python", "scripts/mqar_sweep.py", *sys.argv[1:]])
    output = pathlib.Path(FLAGS.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    old = output.read_text() if output.exists() else ""
    output.write_text(splice(old, markdown(results, FLAGS.mixers, widths, command)))
    print(f"wrote {output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
