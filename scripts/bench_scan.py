"""SSM scan benchmark: forward and forward+backward time and peak memory versus T per impl.

    python scripts/bench_scan.py                     # CPU defaults (T = 1k .. 64k), minutes
    python scripts/bench_scan.py --ops=selective_scan --lengths=16384 \
        --channels=512,1536                          # Mamba's widths (d_inner of 130M: 1536)
    python scripts/bench_scan.py --ops=selective_scan --impls=reference,xla,pallas \
        --lengths=16384 --channels=1536              # GPU: the Pallas comparison

Ops: Mamba's `selective_scan` (u, delta `[B, T, channels]`, A `[channels, state]`, B, C
`[B, T, state]`, softplus) and Mamba-2's `ssd` (`channels / 64` heads of 64, `state`).
Peak memory is `jax.jit(f).lower(...).compile().memory_analysis()` (arguments + outputs +
temporaries, minus aliases), so it needs no run. Times are medians of `--repeats` runs
after a warm-up. The Markdown table is printed and appended to `--results` with the
machine and date, followed by the fwd+bwd speed-up of each impl over "reference".
"""

from __future__ import annotations

import contextlib
import functools
import itertools

import jax
import jax.numpy as jnp
from absl import app, flags

from longjax.benchmarking import append_results, fwd_bwd, heading, machine, measure
from longjax.ops import cpu_rewrites
from longjax.ops.selective_scan import selective_scan
from longjax.ops.ssd import ssd

_OPS = flags.DEFINE_list("ops", ["selective_scan", "ssd"], "Ops to time.")
_LENGTHS = flags.DEFINE_list("lengths", ["1024", "4096", "16384", "65536"], "Sequence lengths.")
_IMPLS = flags.DEFINE_list("impls", ["reference", "xla"], "Implementations to compare.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_CHANNELS = flags.DEFINE_list("channels", ["128"], "Channels D (selective scan) = H * 64 (SSD).")
_STATE = flags.DEFINE_integer("state", 16, "State size N.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Input dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median).")
_PORTABLE = flags.DEFINE_bool("portable", False, "Time the portable forms of the xla paths "
                               "(longjax.ops.cpu_rewrites off): what GPU and TPU lower.")
_RESULTS = flags.DEFINE_string("results", "benchmarks/RESULTS.md", "File to append to.")
_SECTION = "## SSM scans (`scripts/bench_scan.py`)"


def _inputs(op, D, T, key):
    B, N, dtype = _BATCH.value, _STATE.value, jnp.dtype(_DTYPE.value)
    k = jax.random.split(key, 6)
    normal = lambda i, shape: jax.random.normal(k[i], shape, jnp.float32).astype(dtype)
    if op == "selective_scan":
        A = -jnp.exp(jax.random.normal(k[2], (D, N)))
        args = (normal(0, (B, T, D)), normal(1, (B, T, D)), A, normal(3, (B, T, N)),
                normal(4, (B, T, N)))
        return args, normal(5, (B, T, D))
    H = D // 64
    dt = jax.nn.softplus(normal(1, (B, T, H)).astype(jnp.float32) - 2).astype(dtype)
    args = (normal(0, (B, T, H, 64)), dt, -jnp.exp(jax.random.normal(k[2], (H,))),
            normal(3, (B, T, 1, N)), normal(4, (B, T, 1, N)))
    return args, normal(5, (B, T, H, 64))


def _op(op, impl):
    if op == "selective_scan":
        return functools.partial(selective_scan, delta_softplus=True, impl=impl)
    return functools.partial(ssd, chunk_size=64, impl=impl)


def main(argv):
    del argv
    with cpu_rewrites.portable() if _PORTABLE.value else contextlib.nullcontext():
        rows = _run()
    table = _table(rows)
    print(table)
    append_results(_RESULTS.value, _SECTION, table)


def _run():
    rows = []
    for op, D, T in itertools.product(_OPS.value, (int(d) for d in _CHANNELS.value),
                                      (int(n) for n in _LENGTHS.value)):
        args, dy = _inputs(op, D, T, jax.random.PRNGKey(T))
        for impl in _IMPLS.value:
            f = _op(op, impl)
            fwd_mem, fwd_t = measure(f, args, repeats=_REPEATS.value)
            bwd_mem, bwd_t = measure(fwd_bwd(f), (*args, dy), repeats=_REPEATS.value)
            row = dict(op=op, impl=impl, D=D, T=T, fwd_t=fwd_t, bwd_t=bwd_t, fwd_mem=fwd_mem,
                       bwd_mem=bwd_mem)
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


def _format_row(r):
    return (f"| {r['op']} | {r['impl']} | {r['D']} | {r['T']} | {r['fwd_t']:.4f} | "
            f"{r['bwd_t']:.4f} | {r['fwd_mem']:.1f} | {r['bwd_mem']:.1f} | "
            f"{r['bwd_mem'] * 1024 / r['T']:.1f} |")


def _speedups(rows):
    key = lambda r: (r["op"], r["D"], r["T"])
    ref = {key(r): r["bwd_t"] for r in rows if r["impl"] == "reference"}
    return [f"- {r['op']} `{r['impl']}` at channels={r['D']}, T={r['T']}: fwd+bwd "
            f"{ref[key(r)] / r['bwd_t']:.1f}x faster than `reference`"
            for r in rows if r["impl"] != "reference" and key(r) in ref]


def _table(rows):
    lines = [
        heading(),
        "",
        f"Machine: {machine()}. Shapes: B={_BATCH.value}, channels D as listed, "
        f"state={_STATE.value}, {_DTYPE.value} (SSD: D / 64 heads of 64, chunk 64). "
        f"Time in seconds (median of "
        f"{_REPEATS.value}); peak memory from `compile().memory_analysis()` in MiB."
        + (" Portable forms (`--portable`: `longjax.ops.cpu_rewrites` off)."
           if _PORTABLE.value else ""),
        "",
        "| op | impl | D | T | fwd s | fwd+bwd s | fwd peak MiB | fwd+bwd peak MiB | "
        "fwd+bwd KiB / token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_format_row(r) for r in rows]
    lines += [""] + _speedups(rows)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
