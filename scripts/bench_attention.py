"""Attention benchmark: forward and forward+backward time and peak memory per impl.

    python scripts/bench_attention.py                       # CPU defaults, a few minutes
    python scripts/bench_attention.py --lengths=8192 --dtype=bfloat16 --head_dim=128 \
        --impls=pallas,cudnn,jax_pallas --causal=true       # GPU: the TFLOP/s comparison

Peak memory is `jax.jit(f).lower(...).compile().memory_analysis()` (arguments + outputs
+ temporaries; deterministic, needs no run), so it is reported for every length even
where running would not fit. Times are medians of `--repeats` runs after a warm-up, for
lengths up to `--max_time_len` (`--max_reference_time_len` for "reference").
TFLOP/s counts 4*B*H*T*S*D flops for the forward (half when causal) and 2.5x that for
the backward, as FlashAttention-2 (Dao 2023) does. "jax_pallas" is JAX's bundled Pallas
GPU attention (`jax.experimental.pallas.ops.gpu.attention.mha`, causal or not, no GQA).
The Markdown table is printed and appended to `--results` with the machine and date.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import app, flags

from longjax.benchmarking import append_results, fwd_bwd, heading, machine, measure
from longjax.ops.attention import dot_product_attention

_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384", "32768",
                                         "65536"], "Sequence lengths.")
_IMPLS = flags.DEFINE_list("impls", ["reference", "xla"], "Implementations to compare.")
_CAUSAL = flags.DEFINE_list("causal", ["false", "true"], "Causal settings to run.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 4, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", None, "Key/value heads (default: heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "dtype.")
_MAX_TIME_LEN = flags.DEFINE_integer("max_time_len", 16384, "Longest length to time.")
_MAX_REF_TIME_LEN = flags.DEFINE_integer("max_reference_time_len", 8192,
                                         "Longest length to time the reference at.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median).")
_RESULTS = flags.DEFINE_string("results", "benchmarks/RESULTS.md", "File to append to.")
_SECTION = "## Attention core (`scripts/bench_attention.py`)"


def _attention(impl, causal):
    if impl == "jax_pallas":
        from jax.experimental.pallas.ops.gpu import attention as jax_attention

        def f(q, k, v):
            return jax_attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal)

        return f
    return functools.partial(dot_product_attention, causal=causal, impl=impl)


def main(argv):
    del argv
    B, H, D = _BATCH.value, _HEADS.value, _HEAD_DIM.value
    K = _KV_HEADS.value or H
    dtype = jnp.dtype(_DTYPE.value)
    rows = []
    for causal in (c.lower() == "true" for c in _CAUSAL.value):
        for T in (int(n) for n in _LENGTHS.value):
            keys = jax.random.split(jax.random.PRNGKey(T), 4)
            q = jax.random.normal(keys[0], (B, T, H, D), dtype)
            k = jax.random.normal(keys[1], (B, T, K, D), dtype)
            v = jax.random.normal(keys[2], (B, T, K, D), dtype)
            do = jax.random.normal(keys[3], (B, T, H, D), dtype)
            flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
            for impl in _IMPLS.value:
                limit = _MAX_REF_TIME_LEN.value if impl == "reference" else _MAX_TIME_LEN.value
                attn = _attention(impl, causal)
                try:
                    fwd_mem, fwd_t = measure(attn, (q, k, v), repeats=_REPEATS.value,
                                             timed=T <= limit)
                    bwd_mem, bwd_t = measure(fwd_bwd(attn), (q, k, v, do), repeats=_REPEATS.value,
                                             timed=T <= limit)
                except Exception as e:  # noqa: BLE001 - an impl may not apply (e.g. cuDNN)
                    print(f"{impl} T={T} causal={causal}: {type(e).__name__}: {e}"[:300])
                    continue
                row = dict(impl=impl, causal=causal, T=T, fwd_mem=fwd_mem, bwd_mem=bwd_mem,
                           fwd_t=fwd_t, bwd_t=bwd_t,
                           fwd_tflops=None if fwd_t is None else flops / fwd_t / 1e12,
                           bwd_tflops=None if bwd_t is None else 3.5 * flops / bwd_t / 1e12)
                rows.append(row)
                print(_format_row(row), flush=True)
    table = _table(rows, B, H, K, D, dtype)
    print(table)
    append_results(_RESULTS.value, _SECTION, table)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _format_row(r):
    return (f"| {r['impl']} | {r['causal']} | {r['T']} | {_fmt(r['fwd_t'], '.4f')} | "
            f"{_fmt(r['bwd_t'], '.4f')} | {_fmt(r['fwd_tflops'], '.3f')} | "
            f"{_fmt(r['bwd_tflops'], '.3f')} | {r['fwd_mem']:.1f} | {r['bwd_mem']:.1f} |")


def _table(rows, B, H, K, D, dtype):
    lines = [
        heading(),
        "",
        f"Machine: {machine()}. Shapes: B={B}, H={H}, "
        f"KV heads={K}, head_dim={D}, {dtype.name}. Time in seconds (median), peak memory "
        "from `compile().memory_analysis()` (arguments + outputs + temporaries) in MiB.",
        "",
        "| impl | causal | T | fwd s | fwd+bwd s | fwd TFLOP/s | fwd+bwd TFLOP/s | "
        "fwd peak MiB | fwd+bwd peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_format_row(r) for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
