"""The files of a length-extrapolation run (`longjax.eval.extrapolation.Results`).

`write_outputs(results, output_dir)` writes `results.csv` (one row per method x mode x
length x metric), `loss_per_position.csv`, `ruler_samples.csv` (one row per RULER
sample: its answers, generation and score), `results.md` (a Markdown table per mode and
metric: rows = methods, columns = lengths) and the plots: `bpb_vs_length.png`,
`loss_vs_position.png` (at the longest length), `passkey.png` and `ruler_<task>.png`
(accuracy over length x needle depth, a panel per method), `ruler.png` (RULER accuracy
over length x task, a panel per method) and, for task checkpoints, `task_accuracy.png`.
"""

from __future__ import annotations

import csv
import itertools
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from longjax.eval.extrapolation import PASSKEY, RULER, Results  # noqa: E402
from longjax.eval.ruler import RECORD_FIELDS  # noqa: E402

RESULT_FIELDS = ("method", "mode", "length", "metric", "value")
CURVE_FIELDS = ("method", "length", "start", "stop", "count", "loss")
PANELS_PER_ROW = 4
LINE_STYLES = {"-": "solid", "--": "dashed", "-.": "dash-dot", ":": "dotted"}


def write_outputs(results: Results, output_dir) -> list[pathlib.Path]:
    """Writes every file `results` has data for into `output_dir`; returns their paths."""
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_write_csv(out / "results.csv", RESULT_FIELDS, results.rows)]
    if results.loss_curves:
        paths.append(_write_csv(out / "loss_per_position.csv", CURVE_FIELDS,
                                results.loss_curves))
    if results.ruler_samples:
        paths.append(_write_csv(out / "ruler_samples.csv", RECORD_FIELDS,
                                results.ruler_samples))
    paths.append(out / "results.md")
    paths[-1].write_text(markdown(results))
    plots = ((plot_bpb_vs_length, "bpb_vs_length.png", _modes(results, "bits_per_byte")),
             (plot_loss_vs_position, "loss_vs_position.png", results.loss_curves),
             (plot_ruler, "ruler.png", _ruler_tasks(results)),
             (plot_task_accuracy, "task_accuracy.png", _modes(results, "exact_match")))
    for plot, name, data in plots:
        if data:
            plot(results, out / name)
            paths.append(out / name)
    for family in _depth_families(results):
        name = "passkey.png" if family == PASSKEY else f"{family.replace(':', '_')}.png"
        plot_depth_heatmap(results, out / name, family)
        paths.append(out / name)
    return paths


def _write_csv(path: pathlib.Path, fields, records) -> pathlib.Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    return path


def _modes(results: Results, metric: str) -> list[str]:
    """The modes that have `metric`, in the order they were measured."""
    return list(dict.fromkeys(r["mode"] for r in results.rows if r["metric"] == metric))


def _depth_families(results: Results) -> dict[str, list[str]]:
    """`{family: its modes "<family>@<depth>"}` of the accuracies measured per needle
    depth (passkey, each RULER task with needles)."""
    families: dict[str, list[str]] = {}
    for mode in _modes(results, "accuracy"):
        if "@" in mode:
            families.setdefault(mode.split("@")[0], []).append(mode)
    return families


def _ruler_tasks(results: Results) -> list[str]:
    """The RULER modes "ruler:<task>" measured (accuracy over depths and samples)."""
    return [m for m in _modes(results, "accuracy") if m.startswith(f"{RULER}:") and "@" not in m]


def markdown(results: Results) -> str:
    """`results.md`: what was evaluated, then one table per (mode, metric)."""
    lines = [f"# Length extrapolation: {results.workdir or 'checkpoint'}", "",
             (f"Checkpoint step {results.step}" if results.step is not None
              else "Each run's last checkpoint") + f", training length {results.train_length}."]
    if results.scored_tokens:
        lines.append(f"Text: {results.scored_tokens} validation targets scored per length "
                     f"and mode (the same text at every length); perplexity per token "
                     f"(byte); passkey accuracy: rows with every key digit the argmax.")
    if results.task_seq_lens:
        sizes = ", ".join(f"{n}: {t}" for n, t in results.task_seq_lens.items())
        lines.append(f"Task: columns are test sizes; their sequence lengths: {sizes}.")
    if results.ruler_samples:
        lines.append("RULER accuracy: the share of each sample's answers in its greedy "
                     "generation, averaged over the samples (and needle depths)"
                     + ("; JRT-Prompt: each context read twice." if results.jrt else "."))
    metrics = dict.fromkeys(r["metric"] for r in results.rows)
    families = _depth_families(results)
    for metric in metrics:
        for mode in _modes(results, metric):
            if "@" not in mode:
                mean = " over needle depths" if mode in families else ""
                lines += _table(f"{metric} ({mode}{mean})", results.table(mode, metric))
    for family, depth_modes in families.items():
        by_depth = {f"{method} @ {mode.split('@')[1]}": results.table(mode, "accuracy")[method]
                    for method in results.table(family, "accuracy") for mode in depth_modes}
        lines += _table(f"{family} accuracy by needle depth (method @ depth)", by_depth)
    return "\n".join(lines) + "\n"


def _table(title: str, table: dict[str, dict[int, float]]) -> list[str]:
    """A Markdown table: a row per key of `table`, a column per length."""
    lengths = sorted({n for row in table.values() for n in row})
    lines = ["", f"## {title}", "", "| method | " + " | ".join(map(str, lengths)) + " |",
             "|---|" + "---|" * len(lengths)]
    return lines + [f"| {name} | " + " | ".join(f"{row[n]:.3f}" if n in row else ""
                                                for n in lengths) + " |"
                    for name, row in table.items()]


def _length_axis(ax, results: Results, xlabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.axvline(results.train_length, color="gray", linestyle=":", label="training length")
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_bpb_vs_length(results: Results, path) -> None:
    """Bits per byte versus evaluation length, a color per method; one line style per
    mode (solid: non-overlapping windows, then dashed, dotted, ...)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors, styles = {}, {}
    for mode in _modes(results, "bits_per_byte"):
        styles[mode] = list(LINE_STYLES)[len(styles) % len(LINE_STYLES)]
        for method, row in results.table(mode, "bits_per_byte").items():
            lengths = sorted(row)
            line, = ax.plot(lengths, [row[n] for n in lengths], marker="o",
                            linestyle=styles[mode], color=colors.get(method),
                            label=None if method in colors else method)
            colors[method] = line.get_color()
    ax.set_title(", ".join(f"{LINE_STYLES[style]}: {mode}" for mode, style in styles.items()),
                 fontsize="small")
    ax.set_ylabel("bits per byte")
    _length_axis(ax, results, "evaluation length (tokens)")
    _save(fig, path)


def plot_loss_vs_position(results: Results, path) -> None:
    """Loss versus position (the mean over each bin, at its mean context length) at the
    longest evaluated length, per method."""
    longest = max(c["length"] for c in results.loss_curves)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(c["method"] for c in results.loss_curves):
        curve = [c for c in results.loss_curves
                 if c["method"] == method and c["length"] == longest]
        ax.plot([(c["start"] + c["stop"] + 1) / 2 for c in curve], [c["loss"] for c in curve],
                marker=".", label=method)
    ax.set_ylabel(f"loss (nats) at length {longest}")
    _length_axis(ax, results, "context length (tokens seen)")
    _save(fig, path)


def plot_depth_heatmap(results: Results, path, family: str = PASSKEY) -> None:
    """Accuracy of `family` (passkey, "ruler:<task>") over length (x) and needle depth
    (y), a panel per method."""
    depth_modes = _depth_families(results)[family]
    _heatmaps(results, path, depth_modes, [m.split("@")[1] for m in depth_modes],
              ylabel="needle depth", title=family)


def plot_ruler(results: Results, path) -> None:
    """RULER accuracy (mean over depths and samples) over length (x) and task (y), a
    panel per method."""
    modes = _ruler_tasks(results)
    _heatmaps(results, path, modes, [m.split(":", 1)[1] for m in modes], ylabel="task",
              title="RULER")


def _heatmaps(results: Results, path, modes, labels, *, ylabel: str, title: str) -> None:
    """Accuracy of `modes` (y, named by `labels`) over length (x), a panel per method."""
    methods = list(dict.fromkeys(m for mode in modes for m in results.table(mode, "accuracy")))
    lengths = sorted({r["length"] for r in results.rows if r["mode"] in modes})
    cols = min(len(methods), PANELS_PER_ROW)
    rows = -(-len(methods) // cols)
    label_chars = max(map(len, labels))
    fig, axes = plt.subplots(rows, cols, squeeze=False, layout="constrained",
                             figsize=(1.5 + (0.6 * len(lengths) + 0.08 * label_chars) * cols,
                                      (1.2 + 0.45 * len(modes)) * rows))
    for ax, method in itertools.zip_longest(axes.flat, methods):
        if method is None:
            ax.axis("off")
            continue
        grid = np.array([[results.table(mode, "accuracy").get(method, {}).get(n, np.nan)
                          for n in lengths] for mode in modes])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="x-small")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_title(f"{title}: {method}", fontsize="small")
        ax.set_xlabel("length")
        ax.set_ylabel(ylabel)
    fig.colorbar(image, ax=axes, label="accuracy", shrink=0.8)
    _save(fig, path, tight=False)  # constrained layout


def plot_task_accuracy(results: Results, path) -> None:
    """Exact match versus test size, per method."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in _modes(results, "exact_match"):
        for method, row in results.table(mode, "exact_match").items():
            sizes = sorted(row)
            ax.plot(sizes, [row[n] for n in sizes], marker="o", label=f"{method} ({mode})")
    ax.set_xlabel("test size")
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


def _save(fig, path, *, tight=True) -> None:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
