"""S4 / S4D on packed rows: the convolution path against the scan, forward and fwd+bwd.

    python scripts/bench_s4_packed.py                       # CPU defaults, a few minutes
    python scripts/bench_s4_packed.py --lengths=1024,4096 --channels=256 --batch=8  # GPU

Both paths compute one S4 layer's SSM `y = SSM(u)` on rows `[B, T, channels]` packed
with documents (segment ids drawn with a mean document length of `T / --docs_per_row`):
- `conv`: the kernel of length T computed once (S4: Cauchy sums, Algorithm 1 of Gu et
  al. 2022; S4D: Vandermonde), then `longjax.ops.s4.segment_causal_conv` (FFT, restarted
  at document borders): what `S4Mixer` trains with.
- `scan`: the discretised recurrence with resets (S4D: the chunked diagonal scan; S4:
  a sequential scan over its dense `N x N` state): what it trained with before.
Gradients flow to the input and all SSM parameters. Times are medians of `--repeats`
runs after a warm-up; peak memory from `compile().memory_analysis()`. The Markdown table
is printed and appended to `--results` with the machine and date.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from longjax.benchmarking import append_results, fwd_bwd, heading, machine, measure
from longjax.ops import s4

_VARIANTS = flags.DEFINE_list("variants", ["s4", "s4d"], "S4 (DPLR) and/or S4D.")
_LENGTHS = flags.DEFINE_list("lengths", ["256", "1024", "4096"], "Sequence lengths T.")
_CHANNELS = flags.DEFINE_integer("channels", 64, "Channels H (d_model).")
_STATE = flags.DEFINE_integer("state", 64, "State size N.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.")
_DOCS = flags.DEFINE_integer("docs_per_row", 4, "Mean documents per packed row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median).")
_RESULTS = flags.DEFINE_string("results", "benchmarks/RESULTS.md", "File to append to.")
_SECTION = "## S4 on packed rows (`scripts/bench_s4_packed.py`)"


def _segment_ids(B, T, docs, rng):
    """`[B, T]` ids of documents with geometric lengths of mean `T / docs`."""
    lengths = rng.geometric(min(1.0, docs / T), size=(B, T))
    starts = np.cumsum(lengths, axis=1)
    return jnp.asarray((np.arange(T)[None, :, None] >= starts[:, None, :]).sum(-1) + 1,
                       jnp.int32)


def _params(variant, H, N, rng):
    tile = lambda v: jnp.asarray(np.tile(v, (H, 1)), jnp.complex64)
    n = N // 2 if variant == "s4d" else N
    C = jnp.asarray(rng.normal(size=(H, n)) + 1j * rng.normal(size=(H, n)), jnp.complex64)
    dt = jnp.asarray(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), H)), jnp.float32)
    if variant == "s4d":
        Lambda, B = s4.s4d_init(N, "lin")
        return (tile(Lambda), tile(B), C, dt)
    Lambda, p, B = s4.dplr_legs(N)
    return (tile(Lambda), tile(p), tile(B), C, dt)


def _layer(variant, path, seg):
    """`f(u, *params) -> y` of one SSM on the packed rows `seg`."""

    def f(u, *params):
        T = u.shape[1]
        if variant == "s4d":
            Lambda, B, C, dt = params
            if path == "conv":
                return s4.segment_causal_conv(u, s4.s4d_kernel(Lambda, B, C, dt, T), seg)
            return s4.s4d_recurrence(u, *s4.discretize(Lambda, B, dt), C, segment_ids=seg)[0]
        Lambda, p, B, C, dt = params
        if path == "conv":
            return s4.segment_causal_conv(u, s4.s4_kernel(Lambda, p, B, C, dt, T), seg)
        return s4.s4_recurrence(u, *s4.s4_dense(Lambda, p, B, dt), C, segment_ids=seg)[0]

    return f


def main(argv):
    del argv
    rows, rng = [], np.random.default_rng(0)
    H, N, B = _CHANNELS.value, _STATE.value, _BATCH.value
    for variant, T in itertools.product(_VARIANTS.value, (int(n) for n in _LENGTHS.value)):
        seg = _segment_ids(B, T, _DOCS.value, rng)
        u = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
        dy = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
        params = _params(variant, H, N, rng)
        for path in ("scan", "conv"):
            f = _layer(variant, path, seg)
            fwd_mem, fwd_t = measure(f, (u, *params), repeats=_REPEATS.value)
            bwd_mem, bwd_t = measure(fwd_bwd(f), (u, *params, dy), repeats=_REPEATS.value)
            row = dict(variant=variant, path=path, T=T, fwd_t=fwd_t, bwd_t=bwd_t,
                       fwd_mem=fwd_mem, bwd_mem=bwd_mem)
            rows.append(row)
            print(_format_row(row), flush=True)
    table = _table(rows)
    print(table)
    append_results(_RESULTS.value, _SECTION, table)


def _format_row(r):
    return (f"| {r['variant']} | {r['path']} | {r['T']} | {r['fwd_t']:.4f} | {r['bwd_t']:.4f} "
            f"| {r['fwd_mem']:.1f} | {r['bwd_mem']:.1f} |")


def _speedups(rows):
    scan = {(r["variant"], r["T"]): r for r in rows if r["path"] == "scan"}
    lines = []
    for r in rows:
        if r["path"] == "conv":
            s = scan[r["variant"], r["T"]]
            lines.append(f"- {r['variant']} at T={r['T']}: conv {s['fwd_t'] / r['fwd_t']:.1f}x "
                         f"the scan's speed forward, {s['bwd_t'] / r['bwd_t']:.1f}x fwd+bwd")
    return lines


def _table(rows):
    lines = [
        heading(),
        "",
        f"Machine: {machine()}. B={_BATCH.value}, channels={_CHANNELS.value}, state "
        f"N={_STATE.value}, fp32, about {_DOCS.value} documents per row. Time in seconds "
        f"(median of {_REPEATS.value}); peak memory from `compile().memory_analysis()` in MiB.",
        "",
        "| variant | path | T | fwd s | fwd+bwd s | fwd peak MiB | fwd+bwd peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [_format_row(r) for r in rows]
    lines += [""] + _speedups(rows)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
