"""Shared pieces of `scripts/bench_*.py`: compiled memory, median time, the results file.

Peak memory is read from XLA's compiled memory analysis (arguments + outputs + temporaries
- aliases), which is exact and repeatable even on a busy machine, and needs no run; times
are medians of repeated calls of the compiled function, so compare them within one run.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time

import jax


def fwd_bwd(fn):
    """`f(*inputs, cotangent) -> input gradients`: one forward and one backward of `fn`."""

    def f(*args):
        *inputs, cotangent = args
        _, vjp = jax.vjp(fn, *inputs)
        return vjp(cotangent)

    return f


def peak_mib(compiled) -> float:
    """Peak bytes of a compiled function, in MiB (nan when the backend does not say)."""
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return (total - m.alias_size_in_bytes) / 2**20


def median_seconds(compiled, args, repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    return interleaved_median_seconds([(compiled, args)], repeats)[0]


def interleaved_median_seconds(runs, repeats: int) -> list[float]:
    """Median wall times of `(compiled, args)` runs, each warmed up once, then timed in
    turns (first, second, ..., first, ...), so that a change of the machine's load weighs
    on all of them alike: side-by-side comparisons on a shared machine."""
    for compiled, args in runs:
        jax.block_until_ready(compiled(*args))
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run_times, (compiled, args) in zip(times, runs, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            run_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def measure(fn, args, *, repeats: int, timed: bool = True):
    """`(peak MiB, median seconds or None)` of `jax.jit(fn)` on `args`."""
    compiled = jax.jit(fn).lower(*args).compile()
    return peak_mib(compiled), (median_seconds(compiled, args, repeats) if timed else None)


def heading(devices: str | None = None) -> str:
    """A Markdown heading with the UTC time and the devices (default: the first device)."""
    if devices is None:
        device = jax.devices()[0]
        devices = f"{device.platform}: {device.device_kind}"
    return f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {devices}"


def machine() -> str:
    """The host, its processor, the CPUs this process may run on (fewer than the machine's
    under `taskset`), their 1-minute load average now (other processes share them) and the
    jax version."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{cpus} of {os.cpu_count()} CPUs{load}; jax {jax.__version__}")


def append_results(path: str, section: str, text: str) -> None:
    """Adds `text` at the end of the `section` heading's part of the Markdown file `path`
    (before the next `## ` heading), or a new section at the end if there is none."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    existing = open(path).read() if os.path.exists(path) else ""
    text = text.rstrip("\n") + "\n"
    if section not in existing:
        updated = existing.rstrip("\n") + f"\n\n{section}\n\n{text}"
    else:
        start = existing.index(section) + len(section)
        following = re.search(r"^## ", existing[start:], flags=re.MULTILINE)
        end = start + following.start() if following else len(existing)
        updated = existing[:end].rstrip("\n") + f"\n\n{text}\n" + existing[end:]
    with open(path, "w") as f:
        f.write(updated.lstrip("\n"))
