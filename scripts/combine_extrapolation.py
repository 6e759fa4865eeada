"""Several `evaluate_lengths.py` runs side by side: one table and one plot per metric.

    python scripts/combine_extrapolation.py --output_dir=docs/results/length_extrapolation \
        --runs=rope=workdirs/extrapolation/lm_rope,alibi=workdirs/extrapolation/lm_alibi

Each run is `label=<workdir>` (its `extrapolation/` folder, or the folder itself when it
holds results.csv). A run's method `none` becomes the row `label`, any other method
`label + method` (`--methods` keeps only some); the training length marked on the plots
is the first run's. Writes results.csv, loss_per_position.csv, results.md and the plots
of `longjax.eval.report` into `--output_dir`. Runs labelled `name#seed` (e.g. `rope#0`,
`rope#1`, `rope#2`) are seeds of one setting: `seeds.md` then gives their mean, standard
deviation and range per method and length.
"""

from __future__ import annotations

import collections
import csv
import json
import pathlib
import statistics
import sys

from absl import app, flags

from longjax.eval import report
from longjax.eval.extrapolation import Results

_RUNS = flags.DEFINE_list("runs", None, "label=workdir pairs, in table order.")
_METHODS = flags.DEFINE_list("methods", None, "Only these methods of each run (default: all).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder for the combined files.")


def _read(path: pathlib.Path, numbers: dict[str, type]) -> list[dict]:
    """The records of a CSV written by `longjax.eval.report`, with typed number fields."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: numbers.get(k, str)(v) for k, v in row.items()} for row in csv.DictReader(f)]


def combine(runs: list[tuple[str, pathlib.Path]], methods=None) -> Results:
    """One `Results` holding every run's rows and curves (of `methods`, default all),
    methods relabelled by run."""
    combined = None
    for label, folder in runs:
        if not (folder / "results.csv").exists():
            folder = folder / "extrapolation"
        if not (folder / "results.csv").exists():
            raise ValueError(f"--runs {label}: no results.csv in {folder} or its parent; run "
                             f"scripts/evaluate_lengths.py on that workdir first")
        rows = _read(folder / "results.csv", {"length": int, "value": float})
        curves = _read(folder / "loss_per_position.csv",
                       {"length": int, "start": int, "stop": int, "count": int, "loss": float})
        if methods is not None:
            rows = [r for r in rows if r["method"] in methods]
            curves = [c for c in curves if c["method"] in methods]
        if combined is None:
            config = json.loads((folder.parent / "config.json").read_text())
            combined = Results(workdir=", ".join(label for label, _ in runs), step=None,
                               train_length=int(config["data"]["seq_len"]))
        for record in rows + curves:
            method = record["method"]
            record["method"] = label if method == "none" else f"{label} + {method}"
        combined.rows.extend(rows)
        combined.loss_curves.extend(curves)
    return combined


# The metrics seeds.md spreads: text, synthetic tasks, passkey and RULER rows.
SEED_METRICS = ("bits_per_byte", "exact_match", "accuracy")


def seed_spread(results: Results) -> str:
    """`seeds.md`: for rows whose label is `name#seed`, mean +- standard deviation [min,
    max] (n seeds) of each (name + method, mode, metric, length)."""
    groups = collections.defaultdict(list)
    for row in results.rows:
        label, _, method = row["method"].partition(" + ")
        name, sep, _ = label.partition("#")
        if sep and row["metric"] in SEED_METRICS:
            key = (row["mode"], row["metric"], name + (f" + {method}" if method else ""))
            groups[key + (row["length"],)].append(row["value"])
    lines = ["# Seeds: mean +- standard deviation [min, max] (n)"]
    for mode, metric in dict.fromkeys(k[:2] for k in groups):
        lengths = sorted({k[3] for k in groups if k[:2] == (mode, metric)})
        lines += ["", f"## {metric} ({mode})", "",
                  "| setting | " + " | ".join(map(str, lengths)) + " |",
                  "|---|" + "---|" * len(lengths)]
        for setting in dict.fromkeys(k[2] for k in groups if k[:2] == (mode, metric)):
            cells = []
            for n in lengths:
                v = groups.get((mode, metric, setting, n), [])
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                cells.append(f"{statistics.mean(v):.3f} +- {sd:.3f} [{min(v):.3f}, "
                             f"{max(v):.3f}] ({len(v)})" if v else "")
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if not _RUNS.value or not _OUTPUT_DIR.value:
        sys.exit("error: give --runs=label=workdir,... and --output_dir")
    runs = []
    for item in _RUNS.value:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            sys.exit(f"error: --runs item {item!r} is not label=workdir")
        runs.append((label, pathlib.Path(path)))
    try:
        results = combine(runs, _METHODS.value)
    except ValueError as e:
        sys.exit(f"error: {e}")
    for path in report.write_outputs(results, _OUTPUT_DIR.value):
        print(path)
    if any("#" in label for label, _ in runs):
        path = pathlib.Path(_OUTPUT_DIR.value) / "seeds.md"
        path.write_text(seed_spread(results))
        print(path)


if __name__ == "__main__":
    app.run(main)
