"""The length-extrapolation harness (longjax.eval): windows, bits per byte against an
independent loss computation, loss per position, passkey and task accuracy, the methods
and their errors, the output files and scripts/evaluate_lengths.py."""

import functools
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from longjax.data.pipeline import load_token_docs
from longjax.eval import report
from longjax.eval.extrapolation import (
    NONOVERLAPPING,
    PASSKEY,
    Checkpoint,
    Results,
    accuracy,
    evaluate,
    evaluate_workdir,
    load_checkpoint,
    loss_per_position,
    position_bins,
    text_passages,
    text_windows,
    window_spans,
)
from longjax.eval.methods import apply_method, method_overrides, parse_method
from longjax.nn import DecoderLM
from longjax.train.checkpoint import Checkpointer
from longjax.train.cli import load_config_file
from longjax.train.config import apply_overrides
from longjax.train.optimizer import make_optimizer
from longjax.train.state import TrainState, build_model
from longjax.train.step import loss_and_sums

from conftest import REPO

L = 16  # the tiny checkpoint's training length
LENGTHS = (32, 48)  # 48 = 1.5 x 32: the last 32-token window scores 16 targets
TINY = ("d_model=16,num_layers=1,model.num_heads=2,model.num_kv_heads=1,model.mlp_dim=32,"
        f"seq_len={L}")


def _init_params(model):
    """Random parameters `{"params": ...}` of the model's shapes, without compiling its
    init: unit-scale embeddings (so the logits are far from uniform), fan-in scaled
    kernels, unit norm scales."""
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                       jnp.zeros((1, L), jnp.int32)))
    rng = np.random.default_rng(0)

    def draw(path, s):
        if len(s.shape) == 1:
            return jnp.ones(s.shape, s.dtype)
        scale = 1.0 if "embed" in jax.tree_util.keystr(path) else s.shape[0] ** -0.5
        return jnp.asarray(rng.standard_normal(s.shape) * scale, s.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _config(**overrides):
    """The quickstart config, tiny (`TINY`), with dotted-field `overrides`."""
    config = load_config_file(f"{REPO}/configs/quickstart.py:{TINY}")
    return apply_overrides(config, overrides)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir of the tiny model (initial parameters saved as step 3) on one
    standard-library file (its validation split: 5% of its lines)."""
    path = importlib.util.find_spec("_pydecimal").origin
    config = _config(**{"data.source": "files", "data.path": path})
    folder = tmp_path_factory.mktemp("workdir")
    params = _init_params(build_model(config))["params"]
    checkpointer = Checkpointer(folder, config)
    checkpointer.write_config()
    checkpointer.save(3, TrainState(step=jnp.int32(3), params=params,
                                    opt_state=make_optimizer(config.train).init(params)), {})
    checkpointer.wait()
    return folder


@pytest.fixture(scope="module")
def results(workdir):
    return evaluate_workdir(workdir, lengths=LENGTHS, num_tokens=96, stride=8, batch_size=4,
                            num_bins=8)


def test_window_spans_score_every_target_once():
    assert window_spans(10, 4, 4) == [(0, 0), (4, 4), (6, 8)]
    assert window_spans(10, 4, 2) == [(0, 0), (2, 4), (4, 6), (6, 8)]
    passages = np.arange(2 * 11).reshape(2, 11)
    for length, stride in [(4, 4), (4, 3), (4, 1), (10, 10), (5, 2)]:
        w = text_windows(passages, length, stride)
        np.testing.assert_array_equal(w["targets"], w["tokens"] + 1)
        covered = np.sort(w["targets"][w["weights"] > 0])
        np.testing.assert_array_equal(covered, np.delete(np.arange(1, 22), 10))  # each once
        # After the first window of a passage, only the last `stride` (or fewer) count.
        weights = w["weights"].reshape(2, -1, length)
        assert (weights[:, 0] == 1).all() and (weights[:, 1:, :length - stride] == 0).all()
    with pytest.raises(ValueError, match="stride <= length"):
        window_spans(10, 4, 5)


def test_text_passages_same_text_for_every_length():
    docs = [np.arange(100), np.arange(1000, 1030), np.arange(2000, 2060)]
    p = text_passages(docs, length=29, num_tokens=100)  # 4 passages, the first of each first
    np.testing.assert_array_equal(p[:, 0], [0, 1000, 2000, 29])
    np.testing.assert_array_equal(p[0], np.arange(30))
    with pytest.raises(ValueError, match="num_tokens=200 needs 7"):
        text_passages(docs, length=29, num_tokens=200)


def test_bpb_equals_an_independent_loss_on_the_same_windows(workdir, results):
    """Non-overlapping and sliding bits per byte equal the training loss
    (`longjax.train.step.loss_and_sums`) on windows cut by hand from the same passages:
    (start, first scored target) of each window in a passage of 48 targets."""
    checkpoint = load_checkpoint(workdir)
    assert results.train_length == L and results.step == 3 and results.scored_tokens == 96
    docs = load_token_docs(checkpoint.config.data, "validation", seed=0)
    passages = text_passages(docs, length=48, num_tokens=96)
    model = DecoderLM(ml_collections.FrozenConfigDict(checkpoint.config.model))
    cases = {(NONOVERLAPPING, 32): [(0, 0), (16, 32)],  # the tail window scores 16
             (NONOVERLAPPING, 48): [(0, 0)],
             ("sliding:8", 32): [(0, 0), (8, 32), (16, 40)],  # ends 32, 40, 48
             ("sliding:8", 48): [(0, 0)]}
    step = jax.jit(loss_and_sums, static_argnums=2)
    for (mode, n), spans in cases.items():
        # Windows right-padded to 48 tokens (segment 0) in 6 rows: one compiled shape.
        batch = {k: np.zeros((6, 48), np.int32) for k in ("tokens", "targets", "segment_ids",
                                                          "positions")}
        batch["weights"] = np.zeros((6, 48), np.float32)
        for row, (p, (s, first)) in enumerate(itertools.product(passages, spans)):
            batch["tokens"][row, :n] = p[s:s + n]
            batch["targets"][row, :n] = p[s + 1:s + n + 1]
            batch["segment_ids"][row, :n] = 1
            batch["positions"][row, :n] = np.arange(n)
            batch["weights"][row, :n] = np.arange(s, s + n) >= first
        _, sums = step(checkpoint.params["params"], batch, model)
        assert float(sums["weight"]) == 96
        expected = float(sums["loss_sum"]) / (math.log(2) * float(sums["bytes"]))
        np.testing.assert_allclose(results.table(mode, "bits_per_byte")["none"][n], expected,
                                   rtol=1e-5, err_msg=f"{mode} {n}")


def test_sliding_with_stride_equal_to_length_is_nonoverlapping():
    passages = np.arange(2 * 49).reshape(2, 49)
    for n in (16, 20, 48):
        assert window_spans(48, n, n) == [(k * n, k * n) for k in range(48 // n)] + (
            [(48 - n, 48 // n * n)] if 48 % n else [])
        sliding = text_windows(passages, n, n)
        assert len(sliding["tokens"]) == 2 * -(-48 // n)
        assert sliding["weights"].sum() == 96


def test_loss_per_position_bins():
    rng = np.random.default_rng(0)
    nll, weights = rng.random((5, 100)), (rng.random((5, 100)) > 0.3).astype(np.float32)
    for spacing in ("log", "linear"):
        edges = position_bins(100, 10, spacing)
        assert edges[0] == 0 and edges[-1] == 100 and len(edges) <= 11
        bins = loss_per_position(nll, weights, num_bins=10, spacing=spacing)
        assert [(a, b) for a, b, _, _ in bins] == list(zip(edges[:-1], edges[1:], strict=True))
        for a, b, count, loss in bins:
            assert count == weights[:, a:b].sum()
            np.testing.assert_allclose(loss, (nll * weights)[:, a:b].sum() / count)
    assert list(position_bins(100, 10, "log")[:3]) == [0, 1, 2]  # log bins start narrow
    with pytest.raises(ValueError, match="'log' or 'linear'"):
        position_bins(100, 10, "cubic")


def test_loss_curves_pool_to_the_loss(results):
    """The counts and losses of each length's bins pool back to its perplexity."""
    perplexity = results.table(NONOVERLAPPING, "perplexity")["none"]
    for n in LENGTHS:
        bins = [c for c in results.loss_curves if c["length"] == n]
        assert bins[0]["start"] == 0 and bins[-1]["stop"] == n
        total = sum(c["count"] for c in bins)
        assert total == 96
        np.testing.assert_allclose(sum(c["loss"] * c["count"] for c in bins) / total,
                                   math.log(perplexity[n]), rtol=1e-6)


def test_accuracy_is_exact_match_per_row():
    """A row counts for the exact match when all its weighted targets are hits; rows
    without a weighted target are left out; token accuracy counts the weighted hits."""
    hits = np.ones((3, 12), bool)
    hits[1, 8] = hits[2, 0] = hits[0, 0] = False  # (0, 0) and row 2: weight 0
    weights = np.zeros((3, 12), np.float32)
    weights[:2, 7:10] = 1.0
    assert accuracy(hits, weights) == {"token_accuracy": 5 / 6, "exact_match": 0.5}


def test_passkey_and_task_checkpoints(workdir, tmp_path):
    """Passkey rows at each depth (a heatmap in the outputs); a task checkpoint's
    accuracy per test size (a plot of it)."""
    checkpoint = load_checkpoint(workdir)
    results = evaluate(checkpoint, lengths=(128,), num_tokens=128, stride=0,
                       passkey_depths=(0, 1), passkey_samples=3, batch_size=1)
    modes = {(r["mode"], r["metric"]) for r in results.rows}
    assert modes == {(NONOVERLAPPING, "bits_per_byte"), (NONOVERLAPPING, "perplexity"),
                     (PASSKEY, "accuracy"), (f"{PASSKEY}@0", "accuracy"),
                     (f"{PASSKEY}@1", "accuracy")}
    assert all(r["value"] in (0, 1 / 3, 2 / 3, 1) for r in results.rows if "@" in r["mode"])
    assert "passkey.png" in {p.name for p in report.write_outputs(results, tmp_path / "a")}
    # a checkpoint trained on the passkey task: the same passkey rows, no text
    passkey = Checkpoint(_config(**{"data.source": "task", "data.task": PASSKEY}),
                         checkpoint.params, checkpoint.step)
    alone = evaluate(passkey, lengths=(128,), passkey_depths=(0, 1), passkey_samples=3,
                     batch_size=1)
    assert alone.rows == [r for r in results.rows if r["mode"].startswith(PASSKEY)]
    assert not alone.loss_curves
    with pytest.raises(ValueError, match="passkey_samples .* must be >= 1"):
        evaluate(passkey, passkey_samples=0)

    config = _config(**{"data.source": "task", "data.task": "copy"})
    config.data.task_options = ml_collections.ConfigDict({"min_length": 1, "max_length": 4})
    task = Checkpoint(config, checkpoint.params, 3)
    with pytest.raises(ValueError, match="task_sizes"):
        evaluate(task)
    mqar = Checkpoint(_config(**{"data.source": "task", "data.task": "mqar"}), None, 0)
    with pytest.raises(ValueError, match="task 'mqar' has options"):
        evaluate(mqar, task_sizes=(8,))
    results = evaluate(task, methods=("window",), task_sizes=(2, 8), task_samples=4)
    assert results.task_seq_lens == {2: 5, 8: 17}
    assert {(r["method"], r["mode"], r["length"], r["metric"]) for r in results.rows} == {
        ("window", "task:copy", n, k) for n in (2, 8) for k in ("token_accuracy", "exact_match")}
    assert all(0 <= r["value"] <= 1 for r in results.rows)
    assert {p.name for p in report.write_outputs(results, tmp_path / "b")} == {
        "results.csv", "results.md", "task_accuracy.png"}
    assert "sequence lengths: 2: 5, 8: 17" in (tmp_path / "b" / "results.md").read_text()


def test_ruler_tasks_are_generated_scored_and_drawn(workdir, tmp_path):
    """RULER tasks on the tiny checkpoint: one greedy sample of niah_single, its accuracy
    (mean and at its depth) in the rows, its record in ruler_samples.csv, the heatmaps;
    cwe, too long for 128 tokens, is skipped."""
    checkpoint = load_checkpoint(workdir)
    with pytest.raises(ValueError, match="unknown RULER tasks"):
        evaluate(checkpoint, ruler_tasks=("niah",))
    results = evaluate(checkpoint, lengths=(128,), num_tokens=128, stride=0,
                       passkey_samples=0, batch_size=1, ruler_tasks=("niah_single", "cwe"),
                       ruler_samples=1, ruler_depths=(0.5,))
    rows = {(r["mode"], r["length"]): r["value"] for r in results.rows
            if r["metric"] == "accuracy"}
    assert set(rows) == {("ruler:niah_single", 128), ("ruler:niah_single@0.5", 128)}
    [record] = results.ruler_samples
    assert record["task"] == "niah_single" and record["depth"] == 0.5
    assert record["score"] == rows["ruler:niah_single", 128] == float(
        record["answers"] in record["generation"])
    assert len(record["generation"]) > 0
    paths = {p.name for p in report.write_outputs(results, tmp_path)}
    assert {"ruler_samples.csv", "ruler.png", "ruler_niah_single.png"} <= paths
    lines = (tmp_path / "ruler_samples.csv").read_text().splitlines()
    assert lines[0] == "method,task,length,depth,sample,score,answers,generation"
    assert (tmp_path / "ruler_niah_single.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "results.md").read_text()
    assert "## accuracy (ruler:niah_single over needle depths)" in md
    assert "## ruler:niah_single accuracy by needle depth (method @ depth)" in md


def test_outputs_are_written(results, tmp_path):
    paths = report.write_outputs(results, tmp_path)
    assert {p.name for p in paths} == {"results.csv", "loss_per_position.csv", "results.md",
                                       "bpb_vs_length.png", "loss_vs_position.png"}
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert lines[0] == "method,mode,length,metric,value" and len(lines) == 1 + len(results.rows)
    assert len((tmp_path / "loss_per_position.csv").read_text().splitlines()) == \
        1 + len(results.loss_curves)
    md = (tmp_path / "results.md").read_text()
    assert "## bits_per_byte (nonoverlapping)" in md and "| method | 32 | 48 |" in md
    for name in ("bpb_vs_length.png", "loss_vs_position.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


# --- Methods ------------------------------------------------------------------------


def test_method_overrides():
    def o(method, n=64):
        return method_overrides(method, train_length=L, eval_length=n)

    assert o("none") == {}
    assert o("linear:4") == {"rope_scaling": "linear", "rope_scaling_factor": 4.0,
                             "train_length": L}
    assert o("yarn:auto")["rope_scaling_factor"] == 4.0  # 64 / 16
    assert o("ntk:auto", n=8)["rope_scaling_factor"] == 1.0  # never below 1
    assert o("lm_infinite") == {"cache_mode": "lm_infinite", "num_sinks": 10, "window": L,
                                "train_length": L}
    assert o("streaming") == {"cache_mode": "streaming", "num_sinks": 4, "window": L - 4}
    assert o("window") == {"window": L}
    assert o("self_extend:4:8") == {"self_extend_group": 4, "self_extend_window": 8}
    assert o("dynamic_ntk:2+logn") == {"rope_scaling": "dynamic_ntk",
                                       "rope_scaling_factor": 2.0, "train_length": L,
                                       "logn_scaling": True}
    assert parse_method("yarn:auto + logn") == [("yarn", ("auto",)), ("logn", ())]


@pytest.mark.parametrize("method,match", [
    ("foo", r"unknown method 'foo' in 'foo'; allowed: \['none', 'linear:S'"),
    ("none+bar:2", "unknown method 'bar:2'"),
    ("linear", "takes one scaling factor"),
    ("yarn:0", "must be a number > 0"),
    ("ntk:-2", "must be a number > 0"),
    ("llama3:x", "must be a number > 0"),
    ("self_extend:4", "'self_extend:G:W' with positive ints"),
    ("self_extend:0:8", "'self_extend:G:W' with positive ints"),
    ("logn:2", "'logn' takes no arguments"),
    ("streaming+window", "sets config.model.mixer_options.attention.window twice"),
])
def test_bad_methods_are_named(method, match):
    with pytest.raises(ValueError, match=match):
        method_overrides(method, train_length=L, eval_length=64)


@pytest.mark.parametrize("kwargs,match", [
    ({"lengths": (16, 0)}, "lengths must be ints >= 1"),
    ({"stride": 17}, r"stride=17 must be in \[0, the shortest length 16\]"),
    ({"methods": ()}, "methods is empty"),
    ({"passkey_depths": (0.5, 2)}, r"passkey depths must be in \[0, 1\]"),
    ({"methods": ("none", "ntk:0")}, r"method .ntk:0.: the factor must be a number > 0"),
])
def test_bad_arguments_are_named(kwargs, match):
    """Checked before any data is read or model run (the checkpoint has no parameters)."""
    with pytest.raises(ValueError, match=match):
        evaluate(Checkpoint(_config(), None, 0), **{"lengths": (16, 32), **kwargs})


def test_methods_that_cannot_apply():
    model = _config().model
    with pytest.raises(ValueError, match="lengths must be >= 1"):
        apply_method(model, "none", train_length=L, eval_length=0)
    with pytest.raises(ValueError, match="training length L=4 is too short"):
        apply_method(model, "streaming", train_length=4, eval_length=8)
    assert apply_method(model, "none", train_length=L, eval_length=64) == \
        ml_collections.FrozenConfigDict(model)
    window = apply_method(model, "window", train_length=L, eval_length=64)
    assert window.mixer_options.attention.window == L and model.mixer_options.attention.window \
        is None  # the checkpoint's config is left as it was
    assert window != apply_method(model, "none", train_length=L, eval_length=64)
    mamba = _config(**{"model.mixer": "mamba"}).model
    with pytest.raises(ValueError, match="'window' changes attention, but the model has no "
                                         "attention layer"):
        apply_method(mamba, "window", train_length=L, eval_length=64)
    no_rope = _config(**{"model.mixer_options.attention.rope_fraction": 0.0}).model
    with pytest.raises(ValueError, match="'yarn:2': yarn rescales RoPE positions"):
        apply_method(no_rope, "yarn:2", train_length=L, eval_length=64)
    alibi = _config(**{"model.mixer_options.attention.position": "alibi"}).model
    with pytest.raises(ValueError, match=r"position='alibi' .* position in \['rope', 'xpos'\]"):
        apply_method(alibi, "logn+linear:2", train_length=L, eval_length=64)
    xpos = _config(**{"model.mixer_options.attention.position": "xpos"}).model
    apply_method(xpos, "ntk:2", train_length=L, eval_length=64)
    with pytest.raises(ValueError, match=r"self_extend rescales .* position in \['rope'\]"):
        apply_method(xpos, "self_extend:2:8", train_length=L, eval_length=64)
    assert apply_method(alibi, "lm_infinite+logn", train_length=L, eval_length=64)


@pytest.mark.parametrize("method", ["linear:2", "ntk:auto", "dynamic_ntk:1", "yarn:auto",
                                    "llama3:8", "lm_infinite", "streaming", "window",
                                    "self_extend:4:8", "logn", "yarn:auto+logn", "giraffe"])
def test_every_method_builds_a_model_the_attention_accepts(method):
    """The options reach the attention layer, which accepts them (traced, not compiled)."""
    config = apply_method(_config().model, method, train_length=L, eval_length=4 * L)
    overrides = method_overrides(method, train_length=L, eval_length=4 * L)
    assert {k: config.mixer_options.attention[k] for k in overrides} == overrides
    model = DecoderLM(config)
    tokens = jnp.zeros((1, 4 * L), jnp.int32)
    logits, _ = jax.eval_shape(model.apply, _init_params(model), tokens)
    assert logits.shape == (1, 4 * L, config.vocab_size)


def test_methods_change_the_model_beyond_the_training_length(workdir, results):
    """At 2x the training length the methods give finite bits per byte that differ from
    the checkpoint as trained. ("none" at 32 reuses the `results` fixture's compiled
    call.)"""
    methods = ("none", "yarn:auto+logn", "lm_infinite")
    table = evaluate_workdir(workdir, lengths=(2 * L,), methods=methods, num_tokens=96,
                             stride=0, batch_size=4, passkey_samples=0).table(
        NONOVERLAPPING, "bits_per_byte")
    for method in methods[1:]:
        assert np.isfinite(table[method][2 * L]), method
        assert table[method][2 * L] != table["none"][2 * L], method


def test_script_writes_the_outputs(workdir, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts/evaluate_lengths.py"), f"--workdir={workdir}",
         f"--lengths={L}", "--num_tokens=32", "--passkey_samples=0",
         "--ruler_tasks=niah_single", "--ruler_depths=0.5", f"--output_dir={out}"],
        capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"No niah_single at length {L}" in run.stderr  # too short: skipped
    assert f"{out}/results.md" in run.stdout and (out / "bpb_vs_length.png").exists()
    assert "## bits_per_byte (sliding:n/2)" in (out / "results.md").read_text()


@functools.cache
def _combine_script():
    """scripts/combine_extrapolation.py as a module, loaded once (it defines absl flags)."""
    spec = importlib.util.spec_from_file_location(
        "combine_extrapolation", REPO / "scripts/combine_extrapolation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_workdir_from_before_newer_fields_loads_and_takes_a_cache_policy(workdir, tmp_path):
    """A run saved before `cache_budget` / `cache_options` and `TrainState.carry` existed
    (the 2026-12 sweep's runs): its parameters load, and a `cache:` method applies."""
    import orbax.checkpoint as ocp

    config = json.loads((workdir / "config.json").read_text())
    for name in ("cache_budget", "cache_options"):
        del config["model"]["mixer_options"]["attention"][name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    params = load_checkpoint(workdir).params["params"]
    with ocp.CheckpointManager((tmp_path / "checkpoints").absolute(),
                               item_handlers={"state": ocp.StandardCheckpointHandler()}) as m:
        m.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(
            {"step": np.int32(3), "params": params})))
    old = load_checkpoint(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, old.params["params"], params)
    model = apply_method(old.config.model, "cache:h2o:8", train_length=16, eval_length=32)
    assert (model.mixer_options.attention.cache_mode,
            model.mixer_options.attention.cache_budget) == ("h2o", 8)


def test_combine_runs_side_by_side(results, tmp_path):
    """scripts/combine_extrapolation.py: runs' rows relabelled `label` (method none) or
    `label + method`, curves too, written as one report."""
    combine_script = _combine_script()
    for name in ("a", "b"):
        report.write_outputs(results, tmp_path / name / "extrapolation")
        (tmp_path / name / "config.json").write_text('{"data": {"seq_len": 16}}')
    combined = combine_script.combine([("rope", tmp_path / "a"), ("alibi", tmp_path / "b")])
    assert len(combined.rows) == 2 * len(results.rows)
    methods = {r["method"] for r in results.rows}
    expected = {f"{label} + {m}" if m != "none" else label
                for label in ("rope", "alibi") for m in methods}
    assert {r["method"] for r in combined.rows} == expected
    assert {c["method"] for c in combined.loss_curves} <= expected
    assert combined.train_length == 16
    assert "Each run's last checkpoint, training length 16." in report.markdown(combined)
    table = combined.table(NONOVERLAPPING, "bits_per_byte")
    assert table["rope"] == table["alibi"] == results.table(NONOVERLAPPING, "bits_per_byte")["none"]
    only = combine_script.combine([("rope", tmp_path / "a")], methods=["none"])
    assert {r["method"] for r in only.rows} == {"rope"}
    with pytest.raises(ValueError, match="no results.csv"):
        combine_script.combine([("x", tmp_path / "missing")])


def test_seed_spread_of_runs_labelled_name_hash_seed():
    """`name#seed` runs are grouped: mean, sample standard deviation, range and count per
    setting and length; runs without a seed are left out."""
    combine_script = _combine_script()
    combined = Results(workdir="", step=0, train_length=16)
    for label, value in (("rope#0", 2.0), ("rope#1", 2.5), ("rope#2", 3.0), ("alibi", 9.0),
                         ("rope#0 + yarn:auto", 1.0), ("rope#1 + yarn:auto", 1.5)):
        combined.rows.append({"method": label, "mode": NONOVERLAPPING, "length": 32,
                              "metric": "bits_per_byte", "value": value})
    for label, value in (("n4#0", 0.875), ("n4#1", 0.5)):
        combined.rows.append({"method": label, "mode": "passkey", "length": 512,
                              "metric": "accuracy", "value": value})
    text = combine_script.seed_spread(combined)
    assert "## accuracy (passkey)" in text
    assert "| n4 | 0.688 +- 0.265 [0.500, 0.875] (2) |" in text
    assert "| rope | 2.500 +- 0.500 [2.000, 3.000] (3) |" in text
    assert "| rope + yarn:auto | 1.250 +- 0.354 [1.000, 1.500] (2) |" in text
    assert "alibi" not in text
