"""`python -m longjax.selfcheck --quick` on CPU: every check passes and the tables print."""

from longjax import selfcheck


def test_quick_selfcheck_records_its_tables(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    assert selfcheck.run(quick=True, results=str(results)) == []
    text = results.read_text()
    assert selfcheck.SECTION in text and "jax " in text
    for op, impl in [("attention", "split_kv"), ("selective_scan", "xla"), ("ssd", "xla"),
                     ("linear_attention", "xla")]:
        assert f"| {op} | {impl} | 256 |" in text
    out = capsys.readouterr().out
    assert "| attention | segments | xla | float32 |" in out
    assert "| attention | causal | split_kv | bfloat16 |" in out


def test_a_wrong_implementation_fails_its_check(monkeypatch):
    """The check compares with the reference: an output 5% off fails it."""
    case = selfcheck.CASES[-1]
    wrong = selfcheck.Case(case.op, case.name, case.inputs,
                           lambda impl, *a: case.call(impl, *a) * (
                               1.0 if impl == "reference" else 1.05))
    monkeypatch.setattr(selfcheck, "CASES", (wrong,))
    rows = selfcheck.check("cpu", quick=True)
    assert [row[-1] for row in rows] == [False, False]
    assert [row[3] for row in rows] == ["float32", "bfloat16"]
