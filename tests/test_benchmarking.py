"""The benchmark helpers: results land under their own section; memory and time readings."""

import jax
import jax.numpy as jnp

from longjax.benchmarking import append_results, fwd_bwd, interleaved_median_seconds, measure


def test_append_results_keeps_one_heading_per_section(tmp_path):
    path = str(tmp_path / "RESULTS.md")
    append_results(path, "## A", "run 1\n")
    append_results(path, "## B", "run 2\n")
    append_results(path, "## A", "run 3\n")
    text = open(path).read()
    assert text.count("## A") == 1 and text.count("## B") == 1
    assert text.index("run 1") < text.index("run 3") < text.index("## B") < text.index("run 2")


def test_measure_reports_memory_and_time_of_forward_and_backward():
    x = jnp.ones((256, 256))
    peak, seconds = measure(fwd_bwd(lambda a: jnp.sin(a) @ a), (x, x), repeats=2)
    assert peak >= 3 * x.nbytes / 2**20 and seconds > 0
    assert measure(jnp.sin, (x,), repeats=1, timed=False)[1] is None


def test_interleaved_median_seconds_times_every_run():
    x = jnp.ones((64, 64))
    runs = [(jax.jit(f).lower(x).compile(), (x,)) for f in (jnp.sin, jnp.cos)]
    seconds = interleaved_median_seconds(runs, repeats=3)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
