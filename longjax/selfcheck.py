"""`python -m longjax.selfcheck`: every implementation this device runs, against the reference.

The first command to run on a new GPU or TPU. For each op (attention, the selective scan,
SSD, GLA as the linear-attention family's representative) and each implementation the
platform offers (`longjax.ops.impl.available`), it compares outputs and gradients with
the op's reference in fp32 and bf16 over a few shapes and masks, then times forward and
forward + backward side by side at a few lengths. It prints both tables, appends them
with the device, jax version and date to `benchmarks/RESULTS.md` with `--record`, and
exits non-zero when a check fails. `--quick` (bf16 on one case per op, one small length,
no interpreter) runs in the test suite. What `impl="auto"` picks follows these figures
(`longjax/ops/impl.py`).

    python -m longjax.selfcheck [--quick] [--record]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from longjax import benchmarking
from longjax.ops import impl as impl_lib
from longjax.ops.attention import dot_product_attention
from longjax.ops.linear_attention import gla
from longjax.ops.selective_scan import selective_scan
from longjax.ops.ssd import ssd

_QUICK = flags.DEFINE_bool("quick", False, "bf16 on one case per op, one small length, "
                           "no interpreter (under a minute on CPU).")
_RECORD = flags.DEFINE_bool("record", False, "Append the tables to --results.")
_RESULTS = flags.DEFINE_string("results", "benchmarks/RESULTS.md", "Results file.")
SECTION = "## Self-check (`python -m longjax.selfcheck`)"
TOLERANCE = {jnp.float32: 2e-4, jnp.bfloat16: 2e-2}  # of the reference's largest value


@dataclasses.dataclass(frozen=True)
class Case:
    """One op call: `inputs(T, dtype, key) -> differentiable args` and
    `call(impl, *args) -> output`; `impl` names what the op takes."""
    op: str
    name: str
    inputs: object
    call: object


def _normal(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _attention_inputs(T, dtype, key, H=4, K=2, D=32):
    kq, kk, kv = jax.random.split(key, 3)
    return (_normal(kq, (1, T, H, D), dtype), _normal(kk, (1, T, K, D), dtype),
            _normal(kv, (1, T, K, D), dtype))


def _segments(T):
    return jnp.asarray(np.repeat([1, 2, 3], [T // 2, T // 4, T - T // 2 - T // 4])[None])


def _scan_inputs(T, dtype, key, E=64, N=16):
    ks = jax.random.split(key, 6)
    return (_normal(ks[0], (1, T, E), dtype), _normal(ks[1], (1, T, E), dtype, 0.5),
            -jnp.exp(_normal(ks[2], (E, N), jnp.float32, 0.5)),
            _normal(ks[3], (1, T, N), dtype), _normal(ks[4], (1, T, N), dtype),
            _normal(ks[5], (1, T, E), dtype))


def _ssd_inputs(T, dtype, key, H=4, P=16, N=16):
    ks = jax.random.split(key, 5)
    return (_normal(ks[0], (1, T, H, P), dtype),
            jax.nn.softplus(_normal(ks[1], (1, T, H), jnp.float32)).astype(dtype),
            -jnp.exp(_normal(ks[2], (H,), jnp.float32, 0.5)),
            _normal(ks[3], (1, T, 1, N), dtype), _normal(ks[4], (1, T, 1, N), dtype))


def _gla_inputs(T, dtype, key, H=2, D=16):
    ks = jax.random.split(key, 4)
    g = jax.nn.log_sigmoid(_normal(ks[3], (1, T, H, D), jnp.float32) + 3.0) / 4
    return (_normal(ks[0], (1, T, H, D), dtype), _normal(ks[1], (1, T, H, D), dtype),
            _normal(ks[2], (1, T, H, D), dtype), g.astype(dtype))


CASES = (
    Case("attention", "causal", _attention_inputs,
         lambda impl, q, k, v: dot_product_attention(q, k, v, causal=True, impl=impl)),
    Case("attention", "window+sinks", _attention_inputs,
         lambda impl, q, k, v: dot_product_attention(q, k, v, causal=True, window=16,
                                                     num_sinks=2, impl=impl)),
    Case("attention", "segments", _attention_inputs,
         lambda impl, q, k, v: dot_product_attention(
             q, k, v, causal=True, segment_ids=_segments(q.shape[1]), impl=impl)),
    Case("selective_scan", "z, D, softplus", _scan_inputs,
         lambda impl, u, dt, A, B, C, z: selective_scan(
             u, dt, A, B, C, D=jnp.ones(u.shape[-1]), z=z, delta_softplus=True, impl=impl)),
    Case("ssd", "chunk 16", _ssd_inputs,
         lambda impl, x, dt, A, B, C: ssd(x, dt, A, B, C, chunk_size=16, impl=impl)),
    Case("linear_attention", "gla", _gla_inputs,
         lambda impl, q, k, v, g: gla(q, k, v, g, chunk_size=16, impl=impl)),
)


def _impls(op, platform, quick):
    """The implementations to check (the reference is the oracle); the interpreter is
    slow, so `quick` leaves it out."""
    return [i for i in impl_lib.available(op, platform)[1:]
            if not (quick and i == "pallas_interpret")]


def _runs(case, impl, dtype):
    """True when `impl` takes `dtype` for this op (cuDNN: bf16 / fp16, and only the
    calls it serves)."""
    return impl != "cudnn" or (dtype == jnp.bfloat16 and case.name == "causal")


def _value_and_grads(case, impl, args):
    def loss(*args):
        out = case.call(impl, *args).astype(jnp.float32)
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out * weights), out

    grads, out = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True))(
        *args)
    return out, grads


def _error(got, want):
    """Largest absolute difference over the reference's largest magnitude."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def check(platform, quick, T=64):
    """Rows `(op, case, impl, dtype, output error, gradient error, ok)`; `quick` checks
    bf16 on each op's first case only."""
    rows = []
    first = {case.op: case for case in reversed(CASES)}
    for case in CASES:
        dtypes = (jnp.float32,) if quick and first[case.op] is not case else (
            jnp.float32, jnp.bfloat16)
        for dtype in dtypes:
            args = case.inputs(T, dtype, jax.random.key(0))
            # The oracle: the reference in fp32 on the same (rounded) inputs.
            want = _value_and_grads(case, "reference",
                                    [a.astype(jnp.float32) for a in args])
            for impl in _impls(case.op, platform, quick):
                if not _runs(case, impl, dtype):
                    continue
                out, grads = _value_and_grads(case, impl, args)
                out_err = _error(out, want[0])
                grad_err = max(_error(g, w) for g, w in zip(grads, want[1], strict=True))
                ok = max(out_err, grad_err) <= TOLERANCE[dtype]
                rows.append((case.op, case.name, impl, jnp.dtype(dtype).name, out_err,
                             grad_err, ok))
    return rows


def time_impls(platform, lengths, repeats):
    """Rows `(op, impl, T, fwd ms, fwd+bwd ms)`: the first case of each op, bf16 on
    accelerators, fp32 on CPU."""
    dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
    rows = []
    seen = set()
    for case in CASES:
        if case.op in seen:
            continue
        seen.add(case.op)
        for T in lengths:
            args = case.inputs(T, dtype, jax.random.key(1))
            for impl in ["reference"] + _impls(case.op, platform, quick=True):
                if not _runs(case, impl, dtype):
                    continue
                fwd = lambda *a, impl=impl: case.call(impl, *a)  # noqa: E731
                _, fwd_s = benchmarking.measure(fwd, args, repeats=repeats)
                out = jax.eval_shape(fwd, *args)
                cotangent = jnp.ones(out.shape, out.dtype)
                _, both_s = benchmarking.measure(benchmarking.fwd_bwd(fwd),
                                                 [*args, cotangent], repeats=repeats)
                rows.append((case.op, impl, T, 1e3 * fwd_s, 1e3 * both_s))
    return rows


def tables(checks, timings):
    """The two Markdown tables."""
    lines = ["| op | case | impl | dtype | output err | grad err | ok |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {op} | {name} | {impl} | {dtype} | {o:.1e} | {g:.1e} | "
              f"{'yes' if ok else 'NO'} |" for op, name, impl, dtype, o, g, ok in checks]
    lines += ["", "| op | impl | T | fwd ms | fwd+bwd ms |", "|---|---|---|---|---|"]
    lines += [f"| {op} | {impl} | {T} | {f:.2f} | {b:.2f} |"
              for op, impl, T, f, b in timings]
    return "\n".join(lines)


def run(quick=False, results=None):
    """Checks and times every implementation on this platform; prints the tables and,
    with `results` (a path), appends them there. Returns the failed check rows."""
    platform = impl_lib.host_platform()
    checks = check(platform, quick)
    lengths = ((256,) if quick else (512, 1024, 2048) if platform == "cpu"
               else (1024, 4096, 16384))
    timings = time_impls(platform, lengths, repeats=3 if quick else 10)
    text = tables(checks, timings)
    note = (f"Machine: {benchmarking.machine()}. Platform {platform}, "
            f"{'--quick' if quick else 'full'}. Errors: max |impl - reference| / max "
            f"|reference|, the reference in fp32 on the same inputs, T=64; tolerance fp32 "
            f"{TOLERANCE[jnp.float32]}, bf16 {TOLERANCE[jnp.bfloat16]}. Times: median ms, "
            f"B=1, first case of each op.")
    print(f"{note}\n\n{text}")
    if results:
        benchmarking.append_results(results, SECTION,
                                    f"{benchmarking.heading()}\n\n{note}\n\n{text}\n")
    return [row for row in checks if not row[-1]]


def main(argv):
    del argv
    failed = run(_QUICK.value, _RESULTS.value if _RECORD.value else None)
    if failed:
        raise SystemExit(f"{len(failed)} check(s) failed: {failed}")


if __name__ == "__main__":
    app.run(main)
