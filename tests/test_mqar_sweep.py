"""scripts/mqar_sweep.py: the Markdown tables and their splicing into a document (no training)."""

import importlib.util
import json

from conftest import REPO

_spec = importlib.util.spec_from_file_location("mqar_sweep", REPO / "scripts" / "mqar_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _results():
    acc = {("attention", 16): (1.0, 0.98, 0.8), ("attention", 32): (1.0, 1.0, 0.9),
           ("gla", 16): (0.3, 0.25, 0.2), ("gla", 32): (0.5, 0.45, 0.4)}
    return {key: {"accuracy": dict(zip((64, 128, 256), a, strict=True)), "params": 1234567,
                  "cpu_seconds": None if key == ("gla", 32) else 41.6, "train_len": 64}
            for key, a in acc.items()}


def test_markdown_tables():
    text = sweep.markdown(_results(), ["attention", "gla"], [16, 32], "python x.py --a=1")
    lines = text.splitlines()
    assert "| mixer | d_model=16 | d_model=32 |" in lines
    assert "| `gla` | 30.0 | 50.0 |" in lines  # training length, by width
    assert "| mixer | 64 tokens | 128 tokens | 256 tokens |" in lines
    assert "| `attention` | 100.0 | 100.0 | 90.0 |" in lines  # by length at the top width
    assert "| `attention` | 1,234,567 | 1,234,567 |" in lines
    assert "| `gla` | 42 | — |" in lines  # CPU seconds; unknown for a cell trained elsewhere
    assert "python x.py --a=1" in lines


def test_splice_keeps_the_prose_around_the_markers():
    doc = f"# Title\n\nintro\n\n{sweep.BEGIN}\nold tables\n{sweep.END}\n\nreading\n"
    new = sweep.splice(doc, "new tables\n")
    assert new == f"# Title\n\nintro\n\n{sweep.BEGIN}\nnew tables\n{sweep.END}\n\nreading\n"
    assert sweep.splice("no markers", "t\n") == f"{sweep.BEGIN}\nt\n{sweep.END}\n"


def test_final_evals_reads_the_last_step(tmp_path):
    records = [{"step": 500, "split": "eval_len64", "accuracy": 0.5},
               {"step": 1000, "split": "train", "accuracy": 0.9},
               {"step": 1000, "split": "eval_len64", "accuracy": 0.75},
               {"step": 1000, "split": "eval_len128", "accuracy": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert sweep.final_evals(tmp_path, 1000) == {64: 0.75, 128: 0.25}
    assert sweep.final_evals(tmp_path, 2000) is None
    assert sweep.final_evals(tmp_path / "missing", 1000) is None
    assert sweep.cell_arg("gla", 32, "num_kv_pairs=8") == "mixer=gla,d_model=32,num_kv_pairs=8"
