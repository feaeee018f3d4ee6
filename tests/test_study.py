"""The reproduction study's quick version: the whole pipeline (base model, runs, report)."""
from study.run import main


def test_quick_study_writes_the_report_with_verdicts(tmp_path):
    report = main(["--quick", "--out", str(tmp_path / "study"), "--docs", str(tmp_path / "docs")])
    text = report.read_text()
    assert "## Verdicts" in text and "| GFT |" in text and "| SFT |" in text
    for claim in ("GFT beats SFT", "GAL and DCR", "forgets less", "diversity"):
        assert claim in text
    assert any(w in text for w in ("**reproduced**", "**not reproduced**", "**inconclusive**"))
    assert (tmp_path / "docs" / "reproduction_quick_methods.png").exists()
    rows = (tmp_path / "study" / "results.jsonl").read_text().splitlines()
    assert len(rows) == 2
    # a rerun skips finished runs and regenerates the report
    main(["--quick", "--out", str(tmp_path / "study"), "--docs", str(tmp_path / "docs")])
    assert len((tmp_path / "study" / "results.jsonl").read_text().splitlines()) == 2


def test_verdict_rule():
    from study.report import compare

    agg = {"A": {"id": (0.5, 0.01)}, "B": {"id": (0.4, 0.01)}, "C": {"id": (0.495, 0.02)}}
    assert compare(agg, "A", "B", "id")[0] == "reproduced"
    assert compare(agg, "B", "A", "id")[0] == "not reproduced"
    assert compare(agg, "A", "C", "id")[0] == "inconclusive"
    assert compare(agg, "B", "A", "id", higher_is_better=False)[0] == "reproduced"
