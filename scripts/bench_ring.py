"""Sequence-parallel attention benchmark: ring (3 layouts), all-gather, Ulysses and USP,
next to the `ringattention` package (Liu et al.'s JAX ring attention) when it is installed
(`pip install -e .[bench]`).

    python scripts/bench_ring.py                      # 8 simulated CPU devices, a few minutes
    python scripts/bench_ring.py --strategies=ring:zigzag,usp2:zigzag,usp4:zigzag
    python scripts/bench_ring.py --lengths=8192,16384 --platform=gpu --devices=8
    python scripts/bench_ring.py --lengths=16384 --heads=4 --kv_heads=4 \
        --strategies=ring:zigzag,ringattention:contiguous --repeats=5   # ring vs the package

For each strategy and layout: forward+backward time and per-device peak memory of the
attention on `--devices` devices (inputs already laid out and sharded along the sequence),
next to one device attending over the whole length T and over T/P. Every strategy runs
the blockwise `impl="xla"` attention locally. The package's row runs its JAX ring
(`ringattention_jax.ring_attention`, the one it picks on CPU) with its causal tile skipping
on its only layout, contiguous, with `--ringattention_chunk` query and key chunks; it has
no GQA, so K/V are repeated to the query heads inside the timed function. Peak memory is
`compile().memory_analysis()` of the partitioned program (arguments + outputs +
temporaries of one device). On simulated CPU devices all devices
share the host's cores, so times add up the work of every device.
All runs of a length are compiled first, then timed in turns (`--repeats` rounds), so
that load changes on a shared machine weigh on every row alike. The Markdown table is
printed and appended to `--results` with the machine and date.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec

from longjax.benchmarking import (
    append_results,
    fwd_bwd,
    heading,
    interleaved_median_seconds,
    machine,
    peak_mib,
)
from longjax.ops.attention import dot_product_attention
from longjax.parallel import (
    all_gather_attention,
    ring_attention,
    to_layout,
    ulysses_attention,
    usp_attention,
)

_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096"], "Global sequence lengths.")
_STRATEGIES = flags.DEFINE_list(
    "strategies", ["ring:contiguous", "ring:zigzag", "ring:striped", "all_gather:zigzag",
                   "ulysses:zigzag", "usp2:zigzag", "usp4:zigzag"]
    + (["ringattention:contiguous"] if importlib.util.find_spec("ringattention") else []),
    "strategy:layout pairs; uspU is USP with Ulysses groups of U devices; ringattention "
    "(contiguous only) is the ringattention package's JAX ring.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Devices on the sequence axis.")
_PLATFORM = flags.DEFINE_string("platform", "cpu", "Backend whose devices to use.")
_CAUSAL = flags.DEFINE_boolean("causal", True, "Causal attention.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 8, "Query heads (Ulysses needs a multiple of P).")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype.")
_RING_BLOCK = flags.DEFINE_integer("ring_block_size", None,
                                   "Ring tile size (default: one layout chunk).")
_PACKAGE_CHUNK = flags.DEFINE_integer("ringattention_chunk", 512,
                                      "The ringattention package's query and key chunk.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median).")
_RESULTS = flags.DEFINE_string("results", "benchmarks/RESULTS.md", "File to append to.")
_SECTION = "## Sequence parallelism (`scripts/bench_ring.py`)"
_FNS = {"ring": ring_attention, "all_gather": all_gather_attention, "ulysses": ulysses_attention,
        "usp": usp_attention}


def _inputs(T, devices):
    B, H, K, D = _BATCH.value, _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
    dtype = jnp.dtype(_DTYPE.value)
    keys = jax.random.split(jax.random.key(T), 4)
    shapes = ((B, T, H, D), (B, T, K, D), (B, T, K, D), (B, T, H, D))
    arrays = [jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes,
                                                                         strict=True)]
    return [jax.device_put(x, devices[0]) for x in arrays]


def _parse(item):
    """"uspU:layout" -> ("usp", layout, U); "name:layout" -> (name, layout, None)."""
    strategy, layout = item.split(":")
    if strategy.startswith("usp"):
        return "usp", layout, int(strategy[3:])
    return strategy, layout, None


@functools.cache
def _ringattention_package():
    """The `ringattention` package's JAX `ring_attention(q, k, v, attn_bias, segment_ids,
    cache_idx, axis_name, float32_logits, blockwise_kwargs)`. Its `__init__` reads
    `jax.lib.xla_bridge`, which current jax no longer has, so the module is loaded from
    its file."""
    package = importlib.util.find_spec("ringattention")
    if package is None:
        raise ValueError("strategy ringattention needs the ringattention package "
                         "(pip install -e .[bench])")
    path = os.path.join(package.submodule_search_locations[0], "ringattention_jax.py")
    spec = importlib.util.spec_from_file_location("ringattention_jax", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ring_attention


def _package_local(q, k, v):
    """The package's ring on this device's contiguous shard (its causal tiles skipped by
    `causal_block_size=1`, as in its own training code)."""
    chunk = min(_PACKAGE_CHUNK.value, q.shape[1])
    options = dict(causal_block_size=1 if _CAUSAL.value else None, query_chunk_size=chunk,
                   key_chunk_size=chunk, deterministic=True, dropout_rng=None, attn_pdrop=0.0,
                   dtype=q.dtype, policy=jax.checkpoint_policies.nothing_saveable,
                   precision=None, prevent_cse=True)
    groups = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
    return _ringattention_package()(q, k, v, None, None, None, "sequence", True, options)


def _sharded(strategy, layout, mesh, ulysses_degree):
    spec = PartitionSpec(None, "sequence")
    if strategy == "ringattention":
        if layout != "contiguous":
            raise ValueError(f"ringattention runs the contiguous layout only; got {layout!r}")
        return jax.shard_map(_package_local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                             check_vma=False)
    options = {"block_size": _RING_BLOCK.value} if strategy in ("ring", "usp") else {}
    if ulysses_degree is not None:
        options["ulysses_degree"] = ulysses_degree
    local = functools.partial(_FNS[strategy], axis_name="sequence", causal=_CAUSAL.value,
                              layout=layout, impl="xla", **options)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                         check_vma=False)


def main(argv):
    del argv
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    devices = jax.devices(_PLATFORM.value)[:_DEVICES.value]
    P = len(devices)
    mesh = jax.make_mesh((P,), ("sequence",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Explicit,))
    single = functools.partial(dot_product_attention, causal=_CAUSAL.value, impl="xla")
    rows = []
    for T in (int(n) for n in _LENGTHS.value):
        args = _inputs(T, devices)
        runs = [(f"1 device, T={T}", fwd_bwd(single), args),
                (f"1 device, T/P={T // P}", fwd_bwd(single), [x[:, :T // P] for x in args])]
        for item in _STRATEGIES.value:
            strategy, layout, degree = _parse(item)
            sharding = NamedSharding(mesh, PartitionSpec(None, "sequence"))
            ring_size = P // (degree or 1)  # USP lays tokens out over its ring of groups
            laid = [jax.device_put(to_layout(x, layout, ring_size), sharding) for x in args]
            name = {"usp": f"usp (Ulysses {degree} x ring {ring_size})",
                    "ringattention": f"ringattention package, chunks {_PACKAGE_CHUNK.value}"
                    }.get(strategy, strategy)
            runs.append((f"{name} ({layout}), P={P}",
                         fwd_bwd(_sharded(strategy, layout, mesh, degree)), laid))
        runs = [(name, jax.jit(fn).lower(*x).compile(), x) for name, fn, x in runs]
        seconds = interleaved_median_seconds([run[1:] for run in runs], _REPEATS.value)
        for (name, compiled, _), sec in zip(runs, seconds, strict=True):
            rows.append((name, T, sec, peak_mib(compiled)))
            print(rows[-1], flush=True)
    table = _table(rows, devices[0])
    print(table)
    append_results(_RESULTS.value, _SECTION, table)


def _table(rows, device):
    lines = [
        heading(f"{_DEVICES.value} x {device.platform}: {device.device_kind}"),
        "",
        f"Machine: {machine()}. Forward+backward, causal="
        f"{_CAUSAL.value}, B={_BATCH.value}, H={_HEADS.value}, KV heads={_KV_HEADS.value}, "
        f"head_dim={_HEAD_DIM.value}, {_DTYPE.value}, ring tiles: "
        f"{_RING_BLOCK.value or 'the layout chunk, halved while above 512'}. Time: median "
        "seconds for the whole mesh, the rows timed in turns; peak: MiB per device "
        "(arguments + outputs + temporaries).",
        "",
        "| attention | T | fwd+bwd s | peak MiB / device |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {T} | {sec:.4f} | {mem:.1f} |" for name, T, sec, mem in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
