"""The reproduction study's quick version: the whole pipeline (base model, runs, report)."""
import json

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
    for row in map(json.loads, rows):   # the paper's metrics, from gft_train.evaluate.evaluate_model
        for key in ("id", "id_greedy", "ood_greedy", "sub_greedy", "pass@4", "distinct", "kl", "kl_base"):
            assert key in row, key
        assert sorted(row["passk_curve"]) == ["pass@1", "pass@2", "pass@4"]
    assert "KL(base‖model)" in text and "greedy" in text
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


def test_without_gal_is_the_papers_ablation():
    """GFT w/o GAL trains on the expert demonstrations with DCR (A = 1), at the study's equal
    sequences per step: no teacher or self-samples with A = 1."""
    from gft_train.config import Config
    from study.run import SEQS_PER_STEP, specs

    spec = next(s for s in specs(False) if s.name == "GFT w/o GAL")
    cfg = Config(**spec.overrides).resolved()
    assert (cfg.n_expert, cfg.n_teacher, cfg.n_self, cfg.tau, cfg.uses_group_advantage) == (1, 0, 0, 0.7, False)
    assert cfg.prompts_per_step * cfg.group_size == SEQS_PER_STEP
    gft = Config(**next(s for s in specs(False) if s.name == "GFT").overrides).resolved()
    assert gft.refresh_every == 1 and gft.prompts_per_step * gft.group_size == SEQS_PER_STEP
