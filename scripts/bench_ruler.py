"""RULER-style task generation time: milliseconds per sample versus prompt length.

    python scripts/bench_ruler.py                                  # bytes, 4k .. 128k
    python scripts/bench_ruler.py --tokenizer=path/to/checkpoint   # its tokenizer.json

For each task of `longjax.data.tasks.ruler` (default haystacks) and length, the median
wall time of `--repeats` calls of `ruler_sample` (samples 1, 2, ...; one call before
them warms the tokenizer's haystack cache, which is built once per tokenizer). Numpy only,
so the figures are CPU time whatever the device. Results go to `--results`.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from longjax.benchmarking import append_results, heading, machine
from longjax.data import tokenizer as tokenizer_lib
from longjax.data.tasks.ruler import RULER_TASKS, ruler_sample

_LENGTHS = flags.DEFINE_list("lengths", ["4096", "16384", "65536", "131072"],
                             "Prompt lengths in tokens.")
_TASKS = flags.DEFINE_list("tasks", list(RULER_TASKS), "Tasks to time.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Checkpoint folder with a "
                                 "tokenizer.json (default: bytes).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed samples per measurement (median).")
_RESULTS = flags.DEFINE_string("results", "benchmarks/RESULTS.md", "File to append to.")
_SECTION = "## RULER-style task generation (`scripts/bench_ruler.py`)"


def sample_ms(task: str, length: int, tok, repeats: int) -> float:
    """Median milliseconds of one `ruler_sample` of `task` at `length` (after a warm-up)."""
    ruler_sample(task, length=length, seed=0, index=0, depth=0.5, tok=tok)
    times = []
    for index in range(1, repeats + 1):
        tick = time.perf_counter()
        ruler_sample(task, length=length, seed=0, index=index, depth=0.5, tok=tok)
        times.append(time.perf_counter() - tick)
    return 1e3 * float(np.median(times))


def main(argv):
    del argv
    tok = tokenizer_lib.load(_TOKENIZER.value)
    lengths = [int(n) for n in _LENGTHS.value]
    lines = [heading("cpu: numpy"), "", f"Machine: {machine()}; tokenizer: "
             f"{_TOKENIZER.value or 'bytes'}; median of {_REPEATS.value} samples, ms.", "",
             "| task | " + " | ".join(map(str, lengths)) + " |",
             "|---|" + "---|" * len(lengths)]
    for task in _TASKS.value:
        row = [sample_ms(task, n, tok, _REPEATS.value) for n in lengths]
        lines.append(f"| {task} | " + " | ".join(f"{ms:.1f}" for ms in row) + " |")
        print(lines[-1], flush=True)
    append_results(_RESULTS.value, _SECTION, "\n".join(lines))
    print(f"Appended to {_RESULTS.value}")


if __name__ == "__main__":
    app.run(main)
