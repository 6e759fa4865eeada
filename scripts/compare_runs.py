"""Compare training runs: tokens/s, training time to a target bits per byte, final bpb.

    python scripts/compare_runs.py --workdirs=workdirs/recipes/concat,workdirs/recipes/best_fit \
        [--target_bpb=2.5] [--final=training] [--output=docs/results/table.md]

Reads each workdir's `metrics.jsonl`, `config.json` and `train_data_stage*.json` (written
by `longjax.train.loop`) and prints a Markdown table, written to `--output` when given:

- tokens/s: training tokens (steps x `data.batch_size` x `data.seq_len`, padding included)
  over `train_seconds`, the training time without evaluation and checkpoints;
- time to target: the training seconds at which validation bits per byte (at
  `data.seq_len`) first reaches `--target_bpb`, interpolated linearly between the eval
  point before and the first eval point at or below it; also that first eval step.
  The target defaults to the worst (highest) last in-training validation bpb among the
  runs, so every run reaches it; speed-up is the first run's time over each run's;
- final bpb at `data.seq_len` and at each longer eval length: the last eval record (a
  re-evaluation of the final state on more text, when there is one), or with
  `--final=training` the last in-training eval;
- train data: truncation and padding statistics of the packing (`train_data_stage*.json`).
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags

from longjax.train.metrics import read_metrics

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Run directories to compare, baseline first.")
_TARGET = flags.DEFINE_string("target_bpb", "auto", "Target validation bits per byte, or "
                              "'auto': the worst last in-training validation bpb of the runs.")
_OUTPUT = flags.DEFINE_string("output", "", "Markdown file to write the table to.")
_FINAL = flags.DEFINE_enum("final", "last", ["last", "training"], "Final bpb from the last "
                           "eval record, or from the last in-training eval (same text as the "
                           "target, for runs of which only some were re-evaluated).")

# Statistics of `train_data_stage*.json` shown in the table, as percentages.
DATA_STATS = {"truncated_documents": "docs cut", "truncated_short_documents": "short docs cut",
              "padding": "padding", "dropped_targets": "targets dropped"}


def load_run(workdir) -> dict:
    """Config, metric records and training-data statistics of one run directory."""
    workdir = pathlib.Path(workdir)
    records = read_metrics(workdir)
    stats = [json.loads(p.read_text()) for p in sorted(workdir.glob("train_data_stage*.json"))]
    return {"name": workdir.name, "config": json.loads((workdir / "config.json").read_text()),
            "records": records, "data_stats": stats}


def recipe(config: dict) -> str:
    """`extension` when the run has length stages, else its packing."""
    return "extension" if config["train"].get("stages") else config["data"].get("packing", "concat")


def eval_curve(records: list[dict], split: str = "validation") -> list[dict]:
    """The in-training eval records of `split`, one per step (the first: a later record at
    the same step re-evaluates a resumed final state, maybe on more text)."""
    curve = {}
    for r in records:
        if r["split"] == split:
            curve.setdefault(r["step"], r)
    return [curve[s] for s in sorted(curve)]


def time_to_target(curve: list[dict], target: float) -> tuple[float, int] | None:
    """`(training seconds, first eval step)` at which `bits_per_byte` reaches `target`:
    seconds interpolated linearly between the eval point before and the first one at or
    below the target (that point's seconds when it is the first eval); None if never
    reached."""
    previous = None
    for r in curve:
        if r["bits_per_byte"] <= target:
            if previous is None or previous["bits_per_byte"] <= target:
                return r["train_seconds"], r["step"]
            (s0, b0), (s1, b1) = ((p["train_seconds"], p["bits_per_byte"]) for p in (previous, r))
            return s0 + (s1 - s0) * (b0 - target) / (b0 - b1), r["step"]
        previous = r
    return None


def format_stats(stats: list[dict]) -> str:
    """`docs cut 12.3%, padding 0.0%`; stages separated by ` / `."""
    parts = [", ".join(f"{label} {100 * s[key]:.1f}%" for key, label in DATA_STATS.items()
                       if key in s) for s in stats]
    return " / ".join(p for p in parts if p) or "-"


def compare(runs: list[dict], target: float | None = None, final: str = "last") -> str:
    """The Markdown table (with a note on the target) for runs from `load_run`; `final`:
    see `--final`."""
    curves = [eval_curve(run["records"]) for run in runs]
    if target is None:
        target = max(c[-1]["bits_per_byte"] for c in curves if c)
    seq_len = runs[0]["config"]["data"]["seq_len"]
    lengths = sorted({int(r["split"].removeprefix("validation_len")) for run in runs
                      for r in run["records"] if r["split"].startswith("validation_len")})
    header = (["run", "recipe", "tokens/s", "train s to target", "first eval step at target",
               "speed-up", f"final bpb @{seq_len}"] + [f"final bpb @{n}" for n in lengths]
              + ["train data"])
    rows, baseline = [], None
    for run, curve in zip(runs, curves, strict=True):
        d = run["config"]["data"]
        last_train = [r for r in run["records"] if r["split"] == "train"][-1]
        tokens_per_sec = last_train["step"] * d["batch_size"] * d["seq_len"] / last_train[
            "train_seconds"]
        reached = time_to_target(curve, target)
        if baseline is None:
            baseline = reached[0] if reached else None
        speedup = f"{baseline / reached[0]:.2f}x" if reached and baseline else "-"
        finals = [_final(run["records"], split, final) for split in
                  ["validation"] + [f"validation_len{n}" for n in lengths]]
        rows.append([run["name"], recipe(run["config"]), f"{tokens_per_sec:,.0f}",
                     f"{reached[0]:.0f}" if reached else "not reached",
                     str(reached[1]) if reached else "-", speedup, *finals,
                     format_stats(run["data_stats"])])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = (f"Target: validation bits per byte <= {target:.4f} at {seq_len} tokens. Train s to "
            "target: training seconds (without evaluation) interpolated linearly between the "
            "eval point before and the first eval point at or below the target; speed-up: the "
            f"first run's ({runs[0]['name']}) time over each run's.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def _final(records: list[dict], split: str, final: str) -> str:
    values = [r["bits_per_byte"] for r in (eval_curve(records, split) if final == "training"
                                           else records) if r["split"] == split]
    return f"{values[-1]:.4f}" if values else "-"


def main(argv):
    del argv
    runs = [load_run(w) for w in _WORKDIRS.value]
    table = compare(runs, None if _TARGET.value == "auto" else float(_TARGET.value),
                    _FINAL.value)
    print(table)
    if _OUTPUT.value:
        path = pathlib.Path(_OUTPUT.value)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table)


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdirs"])
    app.run(main)
