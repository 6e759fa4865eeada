"""Compile a config's training step (or decode step) for a TPU slice on this host, and
say whether it fits: memory per device against the chip's HBM, the compiler's FLOPs and
bytes, and the collective traffic per step. Exits 1 when the step does not fit.

    python scripts/aot_compile.py --config=configs/quickstart.py --topology=v5p:4x4x4 \\
        --config.parallel.data=-1 --config.parallel.sequence=8 --config.model.remat=True

Any topology the installed libtpu knows (`v5e:2x2`, `v5e:16x16`, `v5p:4x4x8`, `v6e:8x8`,
...); no TPU is needed (libtpu compiles ahead of time). The mesh, shardings, dtype and
remat come from the config, as `scripts/train.py` would run it on that slice.
`--decode` compiles one decode token against a cache of `data.seq_len` tokens instead.
With `--config.model.scan_layers=True` the layers compile as one loop over the mixer
pattern's cycle, so a deep model compiles in about the time of one cycle (a 1B, 16-layer
step at 131k tokens for v5e-16: 400 s instead of 1898 s on this project's shared 2-core
host). XLA's FLOP and byte estimates count a loop body once: with scanned layers they
cover one cycle of layers, and attention's blockwise loops once per call.
"""

import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this host compiles; it runs nothing
# The compiler's optimised HLO also goes to a folder, for modules the executable cannot
# print (see longjax.aot.hlo_text); set before JAX starts.
DUMP_DIR = tempfile.mkdtemp(prefix="aot_compile_")
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={DUMP_DIR} "
                           "--xla_dump_hlo_module_re=jit_step").strip()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from longjax import aot  # noqa: E402
from longjax.train.cli import check_config_overrides  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file[:arg].")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:2x2 or v5p:4x4x4.")
_DECODE = flags.DEFINE_bool("decode", False, "Compile one decode step instead of training.")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
flags.mark_flags_as_required(["config", "topology"])


def _size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:9.2f} {unit}"
    return f"{n:9.0f} B"


def format_report(report: dict, *, topology: str, kind: str, devices: int) -> str:
    """The report as the lines the script prints."""
    fits = report["total"] <= report["hbm"]
    lines = [f"{kind} step on {topology} ({devices} devices), per device:"]
    for key in ("arguments", "outputs", "aliased", "temporaries", "code", "total", "hbm"):
        lines.append(f"  {key:<20}{_size(report[key])}")
    lines.append(f"  {'fits' if fits else 'DOES NOT FIT'}: {report['total'] / report['hbm']:.1%}"
                 " of HBM")
    lines.append(f"  flops (compiler)    {report['flops']:.4g}")
    lines.append(f"  bytes accessed      {report['bytes_accessed']:.4g}")
    lines.append("  collectives per step (result bytes per device):")
    for key in aot.COLLECTIVES:
        lines.append(f"    {key:<18}{_size(report[key])}")
    return "\n".join(lines)


def main(argv):
    del argv
    config = _CONFIG.value
    try:
        devices = aot.topology_devices(_TOPOLOGY.value)
        compile_step = aot.compile_decode_step if _DECODE.value else aot.compile_train_step
        compiled = compile_step(config, devices)
        report = aot.step_report(compiled, devices, aot.hlo_text(compiled, DUMP_DIR))
    except ValueError as e:
        sys.exit(f"error: {e}")
    except aot.DoesNotFit as e:
        print(f"DOES NOT FIT on {_TOPOLOGY.value}: {e}")
        sys.exit(1)
    kind = "decode" if _DECODE.value else "train"
    print(format_report(report, topology=_TOPOLOGY.value, kind=kind, devices=len(devices)))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(dict(report, topology=_TOPOLOGY.value, step=kind), f, indent=2)
    if report["total"] > report["hbm"]:
        sys.exit(1)


if __name__ == "__main__":
    check_config_overrides(sys.argv)
    try:
        app.run(main)
    finally:
        shutil.rmtree(DUMP_DIR, ignore_errors=True)
