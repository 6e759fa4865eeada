"""Per-device memory of the LM's training step with the sequence split over P devices.

    python scripts/bench_sequence_parallel.py     # jamba-style hybrid, 8 simulated CPU devices
    python scripts/bench_sequence_parallel.py --config=configs/quickstart.py:mixer=gla \\
        --lengths=8192,16384 --shards=1,2,4,8

For each length T and each P, the loop's `train_step` (global batch `data.batch_size` x T,
mesh data=1 x sequence=P over the first P devices) is compiled, and XLA's memory analysis
gives one device's arguments and temporaries: with every mixer sequence-parallel
(attention by `sequence_parallel`, the recurrent mixers by state passing), the
activations per device fall as 1/P. Nothing runs, so the figures are exact on a busy
machine. The table is printed and appended to `--results` with the machine and date.
"""

from __future__ import annotations

import jax
from absl import app, flags

from longjax import aot
from longjax.benchmarking import append_results, heading, machine
from longjax.train.cli import load_config_file
from longjax.train.config import apply_overrides

_CONFIG = flags.DEFINE_string(
    "config", "configs/quickstart.py:preset=jamba,num_layers=8,batch_size=1",
    "Config file with its arg string (the model and batch size to measure).")
_LENGTHS = flags.DEFINE_list("lengths", ["4096", "8192"], "Global sequence lengths T.")
_SHARDS = flags.DEFINE_list("shards", ["1", "2", "4", "8"], "Devices P on the sequence axis.")
_RESULTS = flags.DEFINE_string("results", "benchmarks/RESULTS.md", "File to append to.")
_SECTION = "## Sequence-parallel training memory (`scripts/bench_sequence_parallel.py`)"


def main(argv):
    del argv
    shards = [int(p) for p in _SHARDS.value]
    jax.config.update("jax_num_cpu_devices", max(shards))
    rows = []
    for T in (int(n) for n in _LENGTHS.value):
        for P in shards:
            config = load_config_file(_CONFIG.value)
            apply_overrides(config, {"data.seq_len": T, "parallel.data": 1,
                                     "parallel.sequence": P})
            m = aot.compile_train_step(config, jax.devices()[:P]).memory_analysis()
            rows.append((T, P, m.argument_size_in_bytes / 2**20, m.temp_size_in_bytes / 2**20))
            print(rows[-1], flush=True)
    lines = [heading(), "", f"Machine: {machine()}. Config `{_CONFIG.value}`; one device's "
             "arguments (parameters, optimizer state, its batch shard) and temporaries "
             "(activations and gradients) of the compiled train step, MiB.", "",
             "| T | P | arguments MiB | temporaries MiB | temporaries x P |",
             "|---|---|---|---|---|"]
    lines += [f"| {T} | {P} | {a:.1f} | {t:.1f} | {t * P:.1f} |" for T, P, a, t in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    append_results(_RESULTS.value, _SECTION, table)


if __name__ == "__main__":
    app.run(main)
