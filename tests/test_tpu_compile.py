"""The real TPU compiler (libtpu, ahead of time for a topology, on this CPU host):
`scripts/aot_compile.py` compiles a training step sharded over data and sequence and
reports its memory and collectives; a step that does not fit exits non-zero; the
collective-bytes reader against a hand-counted HLO module.
"""

import json
import os
import subprocess
import sys

import pytest

from longjax import aot

from conftest import REPO

SMALL = "d_model=64,num_layers=2,seq_len=256,batch_size=4,dtype=bfloat16"


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
