"""The reproduction study's quick version: the whole pipeline (base model, runs, report)."""

import json
import math

import pytest

from study.run import main


@pytest.mark.slow
def test_quick_study_writes_the_report_with_verdicts(tmp_path):
    report = main(["--quick", "--out", str(tmp_path / "study"), "--docs", str(tmp_path / "docs")])
    text = report.read_text()
    assert "## Verdicts" in text and "| GFT |" in text and "| SFT |" in text
    for claim in ("GFT beats SFT", "GAL and DCR", "forgets less", "diversity", "data-efficient"):
        assert claim in text
    for section in ("## Set-up", "## Optimization", "what this miniature can and cannot say"):
        assert section.lower() in text.lower(), section
    assert any(w in text for w in ("**reproduced**", "**not reproduced**", "**inconclusive**"))
    assert (tmp_path / "docs" / "reproduction_quick_methods.png").exists()
    assert (tmp_path / "docs" / "reproduction_quick_curves.png").exists()
    rows = (tmp_path / "study" / "results.jsonl").read_text().splitlines()
    assert [json.loads(r)["name"] for r in rows] == ["SFT", "GFT", "SFT, 4 steps"]
    longer = json.loads(rows[2])
    assert (
        longer["family"] == "long"
        and longer["sequences"] == 4 * 64
        and sorted(longer["curve"], key=int) == ["2", "3", "4"]
    )
    assert "### Longer runs: 4 steps instead of 3 (one seed)" in text and "| SFT, 4 steps |" in text
    for row in map(json.loads, rows[:2]):  # the paper's metrics, from gft_train.evaluate.evaluate_model
        for key in ("id", "id_greedy", "ood_greedy", "probe_greedy", "pass@4", "distinct", "kl", "kl_base"):
            assert key in row, key
        assert sorted(row["passk_curve"]) == ["pass@1", "pass@2", "pass@4"]
        assert sorted(row["curve"], key=int) == ["2", "3"]  # accuracy along training, the last step included
    grid = [json.loads(line) for line in (tmp_path / "study" / "grid.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in grid) == ["GFT", "SFT"] and all("val" in r for r in grid)
    setup = json.loads((tmp_path / "study" / "setup.json").read_text())
    assert set(setup["accuracy"]) == {"base", "expert", "teacher"} and 0 <= setup["base_val"] <= 1
    assert "KL(base‖model)" in text and "greedy" in text
    assert "Precondition" in text  # the set-up's room to learn, printed before the verdicts
    doc = json.loads((tmp_path / "docs" / "reproduction_quick.json").read_text())
    assert set(doc["setup"]) >= {"base", "expert", "teacher", "base_curve"}
    assert doc["setup"]["expert"]["test_pass1"] == 1.0  # the solver's demonstrations
    assert 0 <= doc["setup"]["base"]["test_pass1"] <= 1 and "val_pass1" in doc["setup"]["teacher"]
    assert doc["results"]["GFT"]["test"]["pass@1"] == json.loads(rows[1])["id"]  # the demo's shape
    assert "| configuration | pass@1 | pass@2 | pass@4 |" in text  # the pass@k curves (Table 4)
    # a rerun skips finished runs and regenerates the report
    main(["--quick", "--out", str(tmp_path / "study"), "--docs", str(tmp_path / "docs")])
    assert len((tmp_path / "study" / "results.jsonl").read_text().splitlines()) == 3


def test_verdict_rule():
    from study.report import compare

    agg = {"A": {"id": (0.5, 0.01)}, "B": {"id": (0.4, 0.01)}, "C": {"id": (0.495, 0.02)}}
    assert compare(agg, "A", "B", "id")[0] == "reproduced"
    assert compare(agg, "B", "A", "id")[0] == "not reproduced"
    assert compare(agg, "A", "C", "id")[0] == "inconclusive"
    assert compare(agg, "B", "A", "id", higher_is_better=False)[0] == "reproduced"


def test_verdict_pairs_by_seed_and_prompt_with_a_bootstrap_interval():
    from study.report import compare, paired_gap

    # A beats B by 0.1 on every prompt of both seeds: a tight interval above zero
    a = {0: [0.6, 0.9, 0.3, 0.7] * 25, 1: [0.5, 0.8, 0.4, 0.7] * 25}
    b = {s: [x - 0.1 for x in v] for s, v in a.items()}
    agg = {"A": {"id": (0.625, 0.02), "per_prompt": {"id": a}}, "B": {"id": (0.525, 0.02), "per_prompt": {"id": b}}}
    gap, low, high, n = paired_gap(agg, "A", "B", "id")
    assert n == 100 and abs(gap - 0.1) < 1e-9 and abs(low - 0.1) < 1e-9 and abs(high - 0.1) < 1e-9
    verdict, text = compare(agg, "A", "B", "id")
    assert verdict == "reproduced" and "95% CI" in text
    # the same means, but A ahead on 2 prompts by a lot and behind on the rest: the gap beats the
    # seeds' noise, the interval over prompts straddles zero -> inconclusive
    a2 = {s: [1.0, 1.0] + [0.0] * 98 for s in (0, 1)}
    b2 = {s: [0.0, 0.0] + [0.01] * 98 for s in (0, 1)}
    agg2 = {"A": {"id": (0.02, 0.0), "per_prompt": {"id": a2}}, "B": {"id": (0.0098, 0.0), "per_prompt": {"id": b2}}}
    assert compare({k: {"id": v["id"]} for k, v in agg2.items()}, "A", "B", "id")[0] == "reproduced"  # noise only
    low2, high2 = paired_gap(agg2, "A", "B", "id")[1:3]
    assert low2 < 0 < high2 and compare(agg2, "A", "B", "id")[0] == "inconclusive"
    # only the seeds both ran are paired
    agg3 = {
        "A": {"id": (0.6, 0.0), "per_prompt": {"id": {0: [1.0, 0.0], 1: [0.0, 0.0]}}},
        "B": {"id": (0.5, 0.0), "per_prompt": {"id": {1: [0.0, 1.0], 2: [1.0, 1.0]}}},
    }
    assert paired_gap(agg3, "A", "B", "id")[0] == -0.5


def test_without_gal_is_the_papers_ablation():
    """GFT w/o GAL trains on the expert demonstrations with DCR (A = 1), at the study's equal
    sequences per step: no teacher or self-samples with A = 1."""
    from gft_train.config import Config
    from study.plan import SEQS_PER_STEP, specs

    spec = next(s for s in specs(False) if s.name == "GFT w/o GAL")
    cfg = Config(**spec.overrides).resolved()
    assert (cfg.n_expert, cfg.n_teacher, cfg.n_self, cfg.tau, cfg.uses_group_advantage) == (1, 0, 0, 0.7, False)
    assert cfg.prompts_per_step * cfg.group_size == SEQS_PER_STEP
    gft = Config(**next(s for s in specs(False) if s.name == "GFT").overrides).resolved()
    assert gft.refresh_every == 1 and gft.prompts_per_step * gft.group_size == SEQS_PER_STEP


def test_every_configuration_trains_on_equal_sequences_per_step():
    from gft_train.config import Config
    from study.plan import SEQS_PER_STEP, specs

    for spec in specs(False):
        cfg = Config(**spec.overrides).resolved()
        assert cfg.prompts_per_step * cfg.group_size == SEQS_PER_STEP, spec.name


def test_learning_rate_choice_is_per_method_on_validation():
    from study.plan import choose_lrs

    grid = [
        dict(name="SFT", lr=1e-4, val=0.2),
        dict(name="SFT", lr=1e-3, val=0.5),
        dict(name="SFT", lr=3e-3, val=0.5),
        dict(name="GRPO", lr=1e-4, val=0.4),
        dict(name="GRPO", lr=1e-3, val=0.1),
    ]
    assert choose_lrs(grid, ["SFT", "GRPO"]) == {"SFT": 1e-3, "GRPO": 1e-4}  # a tie goes to the smaller rate


def test_sum_task_has_several_correct_paths_and_disjoint_splits():
    import itertools

    from gft_train.demo.sums import make_data, reward, write

    paths = {write((3, 17, 8), "shuffled", __import__("random").Random(i)) for i in range(50)}
    assert len(paths) == 6 and reward([""] * 6, sorted(paths), ["28"] * 6) == [1.0] * 6
    assert write((3, 17, 8), "descending") == "17+8=25+3=28" and write((3, 17, 8), "left_to_right") == "3+17=20+8=28"
    assert reward(["", "", ""], ["3+17=20+8=29", "3+17=20+8=", "28"], ["28"] * 3) == [0.0, 0.0, 1.0]
    data = make_data()
    prompts = {name: {r["prompt"] for r in rows} for name, rows in data.items()}
    for a, b in itertools.combinations(prompts, 2):
        assert not prompts[a] & prompts[b], (a, b)
    assert max(int(r["answer"]) for r in data["ood"]) > max(int(r["answer"]) for r in data["test"])


def test_grid_goes_one_rung_beyond_a_best_rate_at_its_edge():
    from study.plan import LR_LADDER, grid_extensions

    grid = [dict(name="GFT", lr=x, val=v) for x, v in ((1e-4, 0.8), (3e-4, 0.7), (1e-3, 0.3))]
    grid += [dict(name="DFT", lr=x, val=v) for x, v in ((1e-4, 0.2), (3e-4, 0.3), (1e-3, 0.5))]
    grid += [dict(name="SFT", lr=x, val=v) for x, v in ((1e-4, 0.2), (3e-4, 0.6), (1e-3, 0.5))]
    assert grid_extensions(grid, ["GFT", "DFT", "SFT"]) == {"GFT": 3e-5, "DFT": 3e-3}  # SFT's best is inside
    at_ends = [
        dict(name="A", lr=LR_LADDER[0], val=0.9),
        dict(name="A", lr=LR_LADDER[1], val=0.1),
        dict(name="B", lr=LR_LADDER[-1], val=0.9),
        dict(name="B", lr=LR_LADDER[-2], val=0.1),
        dict(name="C", lr=1e-3, val=0.5),
    ]
    assert grid_extensions(at_ends, ["A", "B", "C"]) == {}  # the ladder ends; one rate tried is no edge


def test_grid_extends_on_resume_and_runs_follow_the_rate_it_chooses(tmp_path, monkeypatch):
    """The study's loop with a stand-in for training: the grid steps past an edge best (also when a
    resumed study finds the starting grid done), and a run at a rate the grid no longer gives is
    run again at the new one; the report keeps only runs at the current rates."""
    from dataclasses import replace

    import study.report
    import study.run as run

    best = {"SFT": 1e-3, "GFT": 1e-5}  # validation peaks here (GFT: the ladder's low end)

    def fake_run(spec, seed, lr, out, budget, setup, grid=False, steps=None):
        peak = best[spec.name.split(",")[0]]
        row = dict(name=spec.name, family=spec.family, x=spec.x, seed=seed, lr=lr, seconds=0.0)
        if grid:
            return {**row, "val": 1.0 - abs(math.log10(lr / peak))}
        return {**row, "id": 0.5, "ood": 0.1, "probe": 0.9, "kl_base": 0.2}

    monkeypatch.setattr(run, "run_one", fake_run)
    monkeypatch.setattr(run, "make_setup", lambda out, budget, pool=None: {})
    monkeypatch.setattr(study.report, "write_report", lambda out, docs, budget, quick=False: out)
    monkeypatch.setattr(run, "QUICK", replace(run.QUICK, lrs=(1e-4, 3e-4), long_methods=()))
    out = tmp_path / "study"
    run.main(["--quick", "--out", str(out), "--workers", "1"])
    grid = run.read_jsonl(out / "grid.jsonl")
    tried = {n: sorted(g["lr"] for g in grid if g["name"] == n) for n in best}
    assert tried == {"SFT": [1e-4, 3e-4, 1e-3, 3e-3], "GFT": [1e-5, 3e-5, 1e-4, 3e-4]}
    assert {(r["name"], r["lr"]) for r in run.read_jsonl(out / "results.jsonl")} == {("SFT", 1e-3), ("GFT", 1e-5)}
    # resumed from a grid cut off after its starting rates: it extends again, runs nothing twice
    first = [g for g in grid if g["lr"] in (1e-4, 3e-4)]
    (out / "grid.jsonl").write_text("".join(json.dumps(g) + "\n" for g in first))
    run.main(["--quick", "--out", str(out), "--workers", "1"])
    assert sorted((g["name"], g["lr"]) for g in run.read_jsonl(out / "grid.jsonl")) == sorted(
        (g["name"], g["lr"]) for g in grid
    )
    assert len(run.read_jsonl(out / "results.jsonl")) == 2
    # a grid row that moves SFT's best (to 1e-2, at the edge: 3e-2 is tried and loses): SFT's run
    # is redone at the new rate, GFT's kept
    with (out / "grid.jsonl").open("a") as f:
        f.write(json.dumps(dict(name="SFT", family="methods", x=None, seed=0, lr=1e-2, val=2.0)) + "\n")
    run.main(["--quick", "--out", str(out), "--workers", "1"])
    assert max(g["lr"] for g in run.read_jsonl(out / "grid.jsonl") if g["name"] == "SFT") == 3e-2
    rows = run.read_jsonl(out / "results.jsonl")
    assert [(r["name"], r["lr"]) for r in rows] == [("SFT", 1e-3), ("GFT", 1e-5), ("SFT", 1e-2)]
    lrs = run.choose_lrs(run.read_jsonl(out / "grid.jsonl"), ["SFT", "GFT"])
    assert [r["lr"] == run.rate_for(r["name"], r["family"], lrs) for r in rows] == [False, True, True]
