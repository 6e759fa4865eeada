"""Ahead-of-time compilation for TPU topologies from any host (MaxText's `train_compile`).

`libtpu` describes a TPU slice by name (`topology_devices("v5p:4x4x4")`) without the
chips; `jax.jit(...).lower(abstract inputs).compile()` then runs the real TPU compiler
on this host. `compile_train_step` compiles the loop's own `train_step` with the config's
mesh, shardings and remat, `compile_decode_step` one decode token against a cache, and
`step_report` reads what the compiler knows about the step (a step the compiler cannot
fit in HBM raises `DoesNotFit`): memory per device
(`memory_analysis`) against the chip's HBM, FLOPs and bytes accessed (`cost_analysis`),
and the bytes each kind of collective moves per step (`collective_bytes` of the HLO).
"""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

GiB = 1 << 30
# HBM per chip (Cloud TPU system architecture pages), by `device_kind`.
HBM_PER_CHIP = {"TPU v2": 16 * GiB, "TPU v3": 32 * GiB, "TPU v4": 32 * GiB,
                "TPU v5 lite": 16 * GiB, "TPU v5": 95 * GiB, "TPU v6 lite": 32 * GiB}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
         "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
         "c64": 64, "c128": 128}


class DoesNotFit(Exception):
    """The TPU compiler ran out of HBM for the step (its message says how much it needed)."""


@contextlib.contextmanager
def _without_cpu_xla_flags():
    """XLA_FLAGS without `--xla_cpu_*` while the TPU compiler starts: libtpu reads
    XLA_FLAGS at its first compile and aborts the process on a flag it does not know (the
    host's CPU backend has read them already)."""
    flags = os.environ.get("XLA_FLAGS")
    if flags is not None:
        os.environ["XLA_FLAGS"] = " ".join(f for f in flags.split()
                                           if not f.startswith("--xla_cpu_"))
    try:
        yield
    finally:
        if flags is not None:
            os.environ["XLA_FLAGS"] = flags


def _compile(lowered) -> jax.stages.Compiled:
    try:
        with _without_cpu_xla_flags():
            return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" in str(e):
            raise DoesNotFit(str(e).splitlines()[0]) from e
        raise


def topology_devices(name: str) -> list[jax.Device]:
    """The devices of TPU slice `name` ("v5e:2x2", "v5p:4x4x4", "v6e:16x16", ...) as the
    installed libtpu describes it, to compile for from a host without TPUs."""
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # one host compiles for all
    # Compiling uses no chip: other processes may load libtpu too (no lockfile)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
        raise ValueError(f"--topology={name!r}: libtpu does not know it ({e}); use "
                         "<generation>:<chips per axis>, e.g. v5e:2x2 or v5p:4x4x4") from e


def hbm_per_device(devices) -> int:
    """Bytes of HBM per device: the chip's HBM over the devices (cores) on one chip."""
    kind = devices[0].device_kind
    if kind not in HBM_PER_CHIP:
        raise ValueError(f"HBM of {kind!r} is unknown; known: {sorted(HBM_PER_CHIP)}")
    chips = {tuple(getattr(d, "coords", (d.id,))) for d in devices}
    return HBM_PER_CHIP[kind] * len(chips) // len(devices)


def _mesh(config, devices):
    from longjax.parallel.mesh import make_mesh
    from longjax.train import config as config_lib

    mesh = make_mesh(config.parallel.to_dict(), devices)
    config_lib.validate(config, num_data_shards=mesh.shape["data"] * mesh.shape["fsdp"],
                        num_sequence_shards=mesh.shape["sequence"])
    return mesh


def compile_train_step(config, devices) -> jax.stages.Compiled:
    """The training loop's `train_step` for a global batch `[data.batch_size,
    data.seq_len]`, compiled for `devices` with `config.parallel`'s mesh."""
    from longjax.train import build_model
    from longjax.train.state import abstract_train_state
    from longjax.train.step import abstract_batch, make_train_step

    mesh = _mesh(config, devices)
    model = build_model(config)
    step = make_train_step(config, model, mesh)
    batch = abstract_batch(mesh, config.data.batch_size, config.data.seq_len)
    return _compile(step.lower(abstract_train_state(config, model, mesh), batch))


def compile_decode_step(config, devices) -> jax.stages.Compiled:
    """One decode token for `data.batch_size` rows against a cache of `data.seq_len`
    tokens (`model.apply(..., cache=)`, as `longjax.generate.decode` calls it), with the
    parameters in their training shardings and the cache's batch over data x fsdp."""
    from longjax.parallel.mesh import LOGICAL_RULES
    from longjax.train import build_model, state_shardings
    from longjax.train.state import abstract_train_state

    mesh = _mesh(config, devices)
    model = build_model(config)
    rows = ("data", "fsdp")
    batch, length = config.data.batch_size, config.data.seq_len
    params = abstract_train_state(config, model, mesh).params
    cache = jax.eval_shape(lambda: model.init_cache(batch, length))

    def cache_sharding(x):
        split = x.ndim and x.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
        return NamedSharding(mesh, PartitionSpec(rows) if split else PartitionSpec())

    def step(params, token, position, cache):
        import flax.linen as nn

        ones = jnp.ones_like(token)
        with nn.logical_axis_rules(LOGICAL_RULES):
            logits, cache = model.apply({"params": params}, token, segment_ids=ones,
                                        positions=position, cache=cache)
        return logits[:, -1], cache

    token_sharding = NamedSharding(mesh, PartitionSpec(rows))
    token = jax.ShapeDtypeStruct((batch, 1), np.int32, sharding=token_sharding)
    cache_shardings = jax.tree.map(cache_sharding, cache)
    jitted = jax.jit(step, in_shardings=(state_shardings(config, model, mesh).params,
                                         token_sharding, token_sharding, cache_shardings),
                     out_shardings=(token_sharding, cache_shardings), donate_argnums=3)
    with jax.set_mesh(mesh):
        return _compile(jitted.lower(params, token, token, cache))


def compile_on_one_device(fn, args, device) -> jax.stages.Compiled:
    """`jax.jit(fn)` compiled for `args` (`jax.ShapeDtypeStruct`s) on one `device` of a
    topology, under a one-device mesh: a Pallas TPU (Mosaic) kernel asks the mesh which
    chip it is built for."""
    one = jax.sharding.SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one) for a in args]
    with jax.set_mesh(jax.sharding.Mesh([device], ("x",))):
        return _compile(jax.jit(fn).lower(*args))


def _array_bytes(types: str) -> list[int]:
    """Bytes of each array type in an HLO result type like `(bf16[8,128]{1,0}, u32[])`."""
    sizes = []
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", types):
        if dtype in _BITS:
            count = int(np.prod([int(d) for d in dims.split(",") if d]))
            sizes.append(count * _BITS[dtype] // 8 if dims else -1)  # -1: a scalar
    return sizes


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes per device that each kind of collective produces in one run of the compiled
    module `hlo_text`: every collective's result, times the trips of the loops around it
    (a `while` whose condition compares its counter with a constant; other loops count
    once). An async `-start` op's result pairs operands with results: the results count.
    """
    computations, entry, name = {}, None, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY )?%(\S+) .*\{\s*$", line)
        if header:
            name = header.group(2)
            entry = name if header.group(1) else entry
            computations[name] = []
        elif name and line.startswith("  "):
            computations[name].append(line)

    def trips(condition: str) -> int:
        lines = computations.get(condition, [])
        root = next((l for l in lines if l.lstrip().startswith("ROOT")), "")
        bound = re.search(r"compare\(%[^,]+, %([^)]+)\), direction=LT", root)
        if bound:
            value = next((re.search(r"constant\((\d+)\)", l) for l in lines
                          if l.lstrip().startswith(f"%{bound.group(1)} ")), None)
            if value:
                return int(value.group(1))
        return 1

    memo: dict[str, collections.Counter] = {}

    def total(comp: str) -> collections.Counter:
        if comp in memo:
            return memo[comp]
        memo[comp] = counts = collections.Counter()
        for line in computations.get(comp, []):
            op = re.search(r" = (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
            if op:
                sizes = [s for s in _array_bytes(op.group(1)) if s >= 0]
                if op.group(3) and op.group(2) != "all-reduce":
                    sizes = sizes[len(sizes) // 2:]
                counts[op.group(2)] += sum(sizes)
            loop = re.search(r"condition=%([^,\s]+), body=%([^,\s]+)", line)
            if loop:
                for kind, n in total(loop.group(2)).items():
                    counts[kind] += n * trips(loop.group(1))
            callees = re.findall(r"(?:calls|to_apply)=%([^,\s]+)", line)
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                callees += re.findall(r"%([^,\s]+)", group)
            for callee in callees:
                counts.update(total(callee))
        return counts

    counts = total(entry) if entry else collections.Counter()
    return {kind: counts.get(kind, 0) for kind in COLLECTIVES}


def hlo_text(compiled: jax.stages.Compiled, dump_dir: str | None = None) -> str:
    """The optimised HLO of `compiled`; where the executable cannot print it (libtpu
    0.0.52 fails on modules with async-update instructions), the compiler's
    `*.after_optimizations.txt` from `dump_dir` (XLA_FLAGS=--xla_dump_to=dump_dir set
    before JAX started), the newest of the module's name."""
    try:
        return compiled.as_text()
    except jax.errors.JaxRuntimeError:
        if dump_dir is None:
            raise
    dumps = sorted(pathlib.Path(dump_dir).glob("*.after_optimizations.txt"),
                   key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise ValueError(f"no *.after_optimizations.txt in {dump_dir}")
    return dumps[-1].read_text()


def step_report(compiled: jax.stages.Compiled, devices, hlo: str | None = None
                ) -> dict[str, float]:
    """Per device: memory (arguments, outputs, aliased between them, temporaries, code,
    and `total` = arguments + outputs - aliased + temporaries + code) against `hbm`;
    the compiler's `flops` and `bytes_accessed`; collective bytes by kind (of `hlo`,
    default `compiled.as_text()`)."""
    memory = compiled.memory_analysis()
    report = {
        "arguments": memory.argument_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "aliased": memory.alias_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "code": memory.generated_code_size_in_bytes,
    }
    report["total"] = (report["arguments"] + report["outputs"] - report["aliased"]
                       + report["temporaries"] + report["code"])
    report["hbm"] = hbm_per_device(devices)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    report["flops"] = float(cost.get("flops", float("nan")))
    report["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
    report.update(collective_bytes(compiled.as_text() if hlo is None else hlo))
    return report
