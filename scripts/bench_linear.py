"""Linear-attention benchmark: time and memory versus T per op and impl, against attention.

    python scripts/bench_linear.py                      # CPU defaults, a few minutes
    python scripts/bench_linear.py --lengths=2048,8192,32768 --ops=gla --impls=xla

For each op (`longjax.ops.linear_attention`) and impl ("reference": the token-by-token
recurrence, "xla": chunked), and for causal softmax attention (`dot_product_attention`,
impl "xla", blockwise) as the baseline, it times the jitted forward and forward+backward
(medians of `--repeats` runs after a warm-up) and reads the peak memory from
`compile().memory_analysis()` (arguments + outputs + temporaries). It prints a Markdown
table, the speed-up of "xla" over "reference" per op and length, and the crossover: the
shortest length at which each chunked op's forward+backward beats attention's. All of it
is appended to `--results` with the machine and date.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from longjax.benchmarking import append_results, fwd_bwd, heading, machine, measure
from longjax.ops import cpu_rewrites
from longjax.ops import linear_attention as la
from longjax.ops.attention import dot_product_attention

_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192"], "Sequence lengths.")
_OPS = flags.DEFINE_list("ops", ["retention", "gla", "delta_rule", "gated_delta_rule"],
                         "Linear ops to time.")
_IMPLS = flags.DEFINE_list("impls", ["reference", "xla"], "Implementations of the ops.")
_ATTENTION = flags.DEFINE_bool("attention", True, "Also time causal softmax attention (xla).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 4, "Heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Key and value head dimension.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median).")
_PORTABLE = flags.DEFINE_bool("portable", False, "Time the portable forms of the xla paths "
                               "(longjax.ops.cpu_rewrites off): what GPU and TPU lower.")
_RESULTS = flags.DEFINE_string("results", "benchmarks/RESULTS.md", "File to append to.")
_SECTION = "## Linear attention and gated recurrences (`scripts/bench_linear.py`)"


def _inputs(B, T, H, D, seed):
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    k = normal(B, T, H, D)
    return {
        "q": normal(B, T, H, D), "k": k / jnp.linalg.norm(k, axis=-1, keepdims=True),
        "v": normal(B, T, H, D), "do": normal(B, T, H, D),
        "g": jax.nn.log_sigmoid(normal(B, T, H) + 3.0),
        "g_dim": jax.nn.log_sigmoid(normal(B, T, H, D) + 3.0) / 16,
        "beta": jax.nn.sigmoid(normal(B, T, H)),
    }


def _op(name, impl):
    """`(f(*args), arg names)` with the differentiable arguments first."""
    if name == "attention":
        return (lambda q, k, v: dot_product_attention(q, k, v, causal=True, impl="xla"),
                ("q", "k", "v"))
    table = {
        "linear_attention": (la.linear_attention, ("q", "k", "v")),
        "retention": (la.retention, ("q", "k", "v")),
        "gla": (la.gla, ("q", "k", "v", "g_dim")),
        "delta_rule": (la.delta_rule, ("q", "k", "v", "beta")),
        "gated_delta_rule": (la.gated_delta_rule, ("q", "k", "v", "g", "beta")),
    }
    if name not in table:
        raise ValueError(f"--ops: unknown op {name!r}; allowed: {sorted(table)}")
    fn, names = table[name]
    return (lambda *args: fn(*args, impl=impl)), names


def main(argv):
    del argv
    B, H, D = _BATCH.value, _HEADS.value, _HEAD_DIM.value
    cases = [(op, impl) for op in _OPS.value for impl in _IMPLS.value]
    if _ATTENTION.value:
        cases.append(("attention", "xla"))
    with cpu_rewrites.portable() if _PORTABLE.value else contextlib.nullcontext():
        results = _run(cases, B, H, D)
    text = _report(results, B, H, D)
    print(text)
    append_results(_RESULTS.value, _SECTION, text)


def _run(cases, B, H, D):
    results = {}
    for T in (int(n) for n in _LENGTHS.value):
        x = _inputs(B, T, H, D, seed=T)
        for op, impl in cases:
            fn, names = _op(op, impl)
            args = [x[n] for n in names]
            fwd_mem, fwd_t = measure(fn, args, repeats=_REPEATS.value)
            bwd_mem, bwd_t = measure(fwd_bwd(fn), [*args, x["do"]], repeats=_REPEATS.value)
            results[op, impl, T] = (fwd_t, bwd_t, fwd_mem, bwd_mem)
            print(f"{op} {impl} T={T}: fwd {fwd_t:.4f}s fwd+bwd {bwd_t:.4f}s "
                  f"peak {fwd_mem:.0f}/{bwd_mem:.0f} MiB", flush=True)
    return results


def _report(results, B, H, D):
    lengths = sorted({T for _, _, T in results})
    lines = [
        heading(),
        "",
        f"Machine: {machine()}. B={B}, H={H}, Dk=Dv={D}, float32, "
        "default chunk size 64. Seconds (median), peak MiB from "
        "`compile().memory_analysis()`."
        + (" Portable forms (`--portable`: `longjax.ops.cpu_rewrites` off)."
           if _PORTABLE.value else ""),
        "",
        "| op | impl | T | fwd s | fwd+bwd s | fwd peak MiB | fwd+bwd peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for (op, impl, T), (ft, bt, fm, bm) in results.items():
        lines.append(f"| {op} | {impl} | {T} | {ft:.4f} | {bt:.4f} | {fm:.1f} | {bm:.1f} |")
    ops = sorted({op for op, impl, _ in results if op != "attention"})
    if all((op, impl, T) in results for op in ops for impl in ("reference", "xla")
           for T in lengths):
        lines += ["", "Forward+backward speed-up of `xla` (chunked) over `reference`:", "",
                  "| op | " + " | ".join(f"T={T}" for T in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for op in ops:
            ratios = [results[op, "reference", T][1] / results[op, "xla", T][1]
                      for T in lengths]
            lines.append(f"| {op} | " + " | ".join(f"{r:.1f}x" for r in ratios) + " |")
    if any(op == "attention" for op, _, _ in results):
        lines += ["", "Crossover with blockwise softmax attention (forward+backward):", ""]
        for op in ops:
            faster = [T for T in lengths if (op, "xla", T) in results
                      and results[op, "xla", T][1] < results["attention", "xla", T][1]]
            lines.append(f"- {op} (xla): " + (f"faster than attention from T={faster[0]}"
                                              if faster else "not faster at these lengths"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
