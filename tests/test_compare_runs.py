"""scripts/compare_runs.py on synthetic run directories (no training)."""

import importlib.util
import json
import subprocess
import sys

from conftest import REPO

_spec = importlib.util.spec_from_file_location("compare_runs", REPO / "scripts/compare_runs.py")
compare_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_runs)


def _run_dir(root, name, curve, *, packing="concat", stages=(), final=None, stats=()):
    """A workdir with 4096 tokens per step; `curve` [(step, seconds, bpb@256, bpb@1024)]."""
    workdir = root / name
    workdir.mkdir()
    config = {"data": {"seq_len": 256, "batch_size": 16, "packing": packing},
              "train": {"steps": curve[-1][0], "stages": list(stages)}}
    (workdir / "config.json").write_text(json.dumps(config))
    records = []
    for step, seconds, bpb, bpb_long in curve:
        records += [{"step": step, "split": "train", "bits_per_byte": bpb + 0.1,
                     "train_seconds": seconds},
                    {"step": step, "split": "validation", "bits_per_byte": bpb,
                     "train_seconds": seconds},
                    {"step": step, "split": "validation_len1024", "bits_per_byte": bpb_long,
                     "train_seconds": seconds}]
    if final:  # the final state re-evaluated on more text after a resume
        step, seconds = curve[-1][:2]
        records += [{"step": step, "split": "validation", "bits_per_byte": final[0],
                     "train_seconds": seconds},
                    {"step": step, "split": "validation_len1024", "bits_per_byte": final[1],
                     "train_seconds": seconds}]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for i, s in enumerate(stats):
        (workdir / f"train_data_stage{i}.json").write_text(json.dumps(s))
    return workdir


def test_time_to_target_interpolates_between_eval_points():
    curve = [{"step": 20, "train_seconds": 10.0, "bits_per_byte": 4.0},
             {"step": 40, "train_seconds": 20.0, "bits_per_byte": 3.0},
             {"step": 60, "train_seconds": 30.0, "bits_per_byte": 2.0}]
    assert compare_runs.time_to_target(curve, 2.5) == (25.0, 60)
    assert compare_runs.time_to_target(curve, 3.0) == (20.0, 40)
    assert compare_runs.time_to_target(curve, 5.0) == (10.0, 20)  # the first eval
    assert compare_runs.time_to_target(curve, 1.0) is None


def test_table_auto_target_speedup_finals_and_stats(tmp_path):
    concat = _run_dir(tmp_path, "concat", [(20, 10.0, 4.0, 4.5), (40, 20.0, 3.0, 3.6)],
                      final=(2.9, 3.5), stats=[{"truncated_documents": 0.25, "padding": 0.0,
                                                "rows": 10.0}])
    faster = _run_dir(tmp_path, "dd", [(20, 5.0, 3.5, 4.0), (40, 10.0, 2.5, 3.0)],
                      packing="decomposition", stats=[{"dropped_targets": 0.01}])
    ext = _run_dir(tmp_path, "ext", [(20, 8.0, 3.8, 5.0), (40, 16.0, 3.1, 4.0)],
                   stages=[[20, 128, 1e4], [20, 256, 5e5]], stats=[{"padding": 0.0}] * 2)
    runs = [compare_runs.load_run(w) for w in (concat, faster, ext)]
    assert [compare_runs.recipe(r["config"]) for r in runs] == ["concat", "decomposition",
                                                                "extension"]
    table = compare_runs.compare(runs)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()
            if line.startswith("| ")}
    # Auto target: the worst last in-training bpb (3.1, ext), not the re-evaluation 2.9.
    assert "<= 3.1000" in table
    assert rows["run"][-3:-1] == ["final bpb @256", "final bpb @1024"]
    # concat: 40 steps x 4096 tokens in 20 s; 4.0 -> 3.0 between 10 s and 20 s: 19 s.
    assert rows["concat"][2:7] == ["8,192", "19", "40", "1.00x", "2.9000"]
    assert rows["concat"][7:] == ["3.5000", "docs cut 25.0%, padding 0.0% |"]
    # dd: 3.5 -> 2.5 between 5 s and 10 s: 7 s, 19 / 7 = 2.71x faster.
    assert rows["dd"][2:7] == ["16,384", "7", "40", "2.71x", "2.5000"]
    assert rows["dd"][-1] == "targets dropped 1.0% |"
    assert rows["ext"][3:6] == ["16", "40", "1.19x"]
    assert rows["ext"][-1] == "padding 0.0% / padding 0.0% |"
    training = compare_runs.compare(runs, final="training")  # not the re-evaluation
    assert "| concat | concat | 8,192 | 19 | 40 | 1.00x | 3.0000 | 3.6000 |" in training
    unreached = compare_runs.compare(runs, 1.0)  # an explicit target nobody reaches
    assert "<= 1.0000" in unreached and unreached.count("not reached") == 3


def test_cli_writes_markdown(tmp_path):
    a = _run_dir(tmp_path, "a", [(20, 10.0, 4.0, 4.5), (40, 20.0, 3.0, 3.6)])
    b = _run_dir(tmp_path, "b", [(20, 10.0, 3.0, 4.5), (40, 20.0, 2.0, 3.6)])
    out = tmp_path / "results" / "table.md"
    subprocess.run([sys.executable, str(REPO / "scripts/compare_runs.py"),
                    f"--workdirs={a},{b}", "--target_bpb=3.5", f"--output={out}"],
                   check=True, capture_output=True)
    text = out.read_text()
    assert "<= 3.5000" in text and "| b | concat | 8,192 | 10 | 20 | 1.50x |" in text
