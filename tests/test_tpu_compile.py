"""The real TPU compiler (libtpu, ahead of time for a topology, on this CPU host): the
Pallas TPU kernels through the public ops (`impl="pallas"`), forward and backward, for
v5e and v6e (v4 and v5p at one case each), and their refusals of blocks the TPU cannot
take; `scripts/aot_compile.py` compiles a training step sharded over data and sequence
and reports its memory and collectives; a step that does not fit exits non-zero; the
collective-bytes reader against a hand-counted HLO module.

Compiling on 2 CPU cores is slow, so the kernel cases are the lowering tests' (tests/
test_lowering.py: every feature and width class once) on v5e, three on v6e and one of
each kernel on v4 and v5p.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from test_lowering import ATTENTION, SCAN, _attention_case, _scan_case, value_and_grads

from longjax import aot
from longjax.ops.attention import dot_product_attention

from conftest import REPO

SMALL = "d_model=64,num_layers=2,seq_len=256,batch_size=4,dtype=bfloat16"


TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
FIRST_ATTENTION, FIRST_SCAN = next(iter(ATTENTION)), next(iter(SCAN))
KERNEL_CASES = ([("v5e", "attention", n) for n in ATTENTION] + [("v5e", "scan", n) for n in SCAN]
                + [("v6e", "attention", n) for n in list(ATTENTION)[:2]]
                + [("v6e", "scan", FIRST_SCAN)]
                + [(g, kind, n) for g in ("v4", "v5p")
                   for kind, n in (("attention", FIRST_ATTENTION), ("scan", FIRST_SCAN))])


def _compile(fn, args, generation):
    device = aot.topology_devices(TOPOLOGIES[generation])[0]
    return aot.compile_on_one_device(fn, args, device)


@pytest.mark.parametrize("generation, kernel, name", KERNEL_CASES)
def test_pallas_tpu_kernel_compiles_forward_and_backward(generation, kernel, name):
    fn, args = (_attention_case if kernel == "attention" else _scan_case)(name)
    text = _compile(fn, args, generation).as_text()
    # attention: forward, dq and dk/dv kernels; scan: forward and backward
    assert text.count('custom_call_target="tpu_custom_call"') == (3 if kernel == "attention"
                                                                  else 2)


def _attention_with_blocks(T, D, dtype, block):
    fn = value_and_grads(lambda q, k, v: dot_product_attention(
        q, k, v, causal=True, impl="pallas", block_q=block, block_k=block), 3)
    return fn, [jax.ShapeDtypeStruct((1, T, 1, D), dtype)] * 3


def test_blocks_the_tpu_refuses_fail():
    # Mosaic tiles are 8 x 128: a block of 100 keys is refused while lowering
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        _compile(*_attention_with_blocks(256, 128, jnp.bfloat16, 100), "v5e")
    # 2048 x 2048 fp32 tiles of head_dim 256 lower, but overflow the core's VMEM: only
    # the compiler sees it
    with pytest.raises(aot.DoesNotFit, match="CompileTimeScopedVmemOom"):
        _compile(*_attention_with_blocks(2048, 256, jnp.float32, 2048), "v5e")
    _compile(*_attention_with_blocks(256, 128, jnp.bfloat16, 128), "v5e")  # tiles it takes


def _aot_compile(arg, *flags):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # CPU test flags
    return subprocess.run(
        [sys.executable, str(REPO / "scripts/aot_compile.py"),
         f"--config=configs/quickstart.py:{arg}", *flags],
        cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=300)


def test_train_step_over_data_and_sequence_compiles_for_v5e(tmp_path):
    out = _aot_compile(SMALL, "--topology=v5e:2x2", "--config.parallel.data=2",
                       "--config.parallel.sequence=2", f"--json={tmp_path}/report.json")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train step on v5e:2x2 (4 devices)" in out.stdout and "fits" in out.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["hbm"] == 16 * aot.GiB  # v5e: 16 GiB per chip, one device per chip
    assert 0 < report["arguments"] and 0 < report["total"] < report["hbm"]
    assert report["flops"] > 0 and report["bytes_accessed"] > 0
    # ring attention passes K/V around the sequence axis; gradients are summed over data
    assert report["collective-permute"] > 0 and report["all-reduce"] > 0


def test_a_step_that_does_not_fit_exits_nonzero():
    # 4 layers of width 8192: ~4.3e9 fp32 parameters, replicated with Adam's two moments
    # (~52 GB) on a v5e chip of 16 GiB
    out = _aot_compile("d_model=8192,num_layers=4,model.mlp_dim=32768,model.num_heads=64,"
                       "model.num_kv_heads=8,seq_len=128,batch_size=4", "--topology=v5e:2x2")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "DOES NOT FIT on v5e:2x2: RESOURCE_EXHAUSTED" in out.stdout


def test_unknown_topology_is_refused():
    with pytest.raises(ValueError, match="--topology='v9:2x2': libtpu does not know it"):
        aot.topology_devices("v9:2x2")


HLO = """\
HloModule demo

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%cond (p: (s32[], bf16[4,256])) -> pred[] {
  %p = (s32[], bf16[4,256]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %limit = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body (q: (s32[], bf16[4,256])) -> (s32[], bf16[4,256]) {
  %q = (s32[], bf16[4,256]) parameter(0)
  %x = bf16[4,256]{1,0} get-tuple-element(%q), index=1
  %cp = (bf16[4,256]{1,0}, bf16[4,256]{1,0}, u32[], u32[]) collective-permute-start(%x)
  %done = bf16[4,256]{1,0} collective-permute-done(%cp)
  ROOT %t = (s32[], bf16[4,256]) tuple(%i, %done)
}

ENTRY %main (w: f32[1024], x: bf16[4,256]) -> f32[1024] {
  %w = f32[1024]{0} parameter(0)
  %x = bf16[4,256]{1,0} parameter(1)
  %loop = (s32[], bf16[4,256]) while(%init), condition=%cond, body=%body
  %ag = (f32[256]{0}, f32[1024]{0}) all-gather-start(%w), dimensions={0}
  %agd = f32[1024]{0} all-gather-done(%ag)
  ROOT %ar = f32[1024]{0} all-reduce(%agd), to_apply=%add
}
"""


def test_collective_bytes_counts_results_and_loop_trips():
    assert aot.collective_bytes(HLO) == {
        "all-gather": 1024 * 4,  # the gathered result, not the operand
        "reduce-scatter": 0,
        "all-reduce": 1024 * 4,
        "collective-permute": 3 * 4 * 256 * 2,  # three trips of 4x256 bf16
        "all-to-all": 0,
    }


def test_ring_attention_overlaps_the_next_kv_transfer_with_this_steps_tiles():
    """Compiled for a v5e:2x4 slice, the ring's K/V `ppermute` for step i+1 is an
    asynchronous collective whose start comes before step i's tile loop and whose done
    comes after it (Liu et al. 2023: communication hidden behind blockwise compute), in the
    forward and in the backward, where the dK/dV transfers overlap the tiles too."""
    import functools
    import re

    from jax.sharding import NamedSharding, PartitionSpec

    from longjax.benchmarking import fwd_bwd
    from longjax.parallel import ring_attention

    devices = aot.topology_devices("v5e:2x4")
    mesh = jax.sharding.Mesh(devices, ("sequence",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    spec = PartitionSpec(None, "sequence")
    ring = jax.shard_map(functools.partial(ring_attention, axis_name="sequence", causal=True,
                                           impl="xla"),
                         mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
    x = jax.ShapeDtypeStruct((1, 4096, 4, 64), jnp.bfloat16,
                             sharding=NamedSharding(mesh, spec))
    lines = aot.hlo_text(aot.compile_lowered(jax.jit(fwd_bwd(ring)).lower(x, x, x, x)))
    lines = lines.splitlines()
    starts, enclosing_loop = {}, {"forward": 0, "backward": 0}
    for i, line in enumerate(lines):
        if m := re.match(r"\s*(%\S+) = .* collective-permute-start\(", line):
            starts[m.group(1)] = i
        if (m := re.search(r"collective-permute-done\((%\S+)\)", line)) and m.group(1) in starts:
            between = lines[starts[m.group(1)] + 1:i]
            if any(re.search(r" while\(", b) for b in between):
                # the VJP's ops are named under transpose(jvp(...))
                enclosing_loop["backward" if "transpose(jvp" in line else "forward"] += 1
    assert starts, "the ring's ppermutes compile to asynchronous collectives"
    assert enclosing_loop["forward"] >= 2, "K and V transfers each enclose the step's tiles"
    assert enclosing_loop["backward"] >= 4, "K, V, dK and dV transfers enclose the tiles"
