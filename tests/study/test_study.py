"""The reproduction study's quick version: the whole pipeline (base model, runs, report)."""

import json
import math

import pytest

from study.run import main


@pytest.mark.slow
def test_quick_study_writes_the_report_with_verdicts(tmp_path):
    from study.plan import EXPOSURE, REGIMES

    report = main(["--quick", "--out", str(tmp_path / "study"), "--docs", str(tmp_path / "docs")])
    text = report.read_text()
    assert "## Verdicts by regime" in text and "| claim | new-skill | competent | imperfect |" in text
    for reg in REGIMES:
        assert f"## Regime {reg.name}" in text
    assert "## Verdicts" in text and "| GFT |" in text and "| SFT |" in text and f"| {EXPOSURE} |" in text
    for claim in ("GFT beats SFT", "GAL and DCR", "forgets less", "diversity", "data-efficient"):
        assert claim in text
    for section in ("### Set-up", "### Optimization", "what this miniature can and cannot say"):
        assert section.lower() in text.lower(), section
    assert any(w in text for w in ("**reproduced**", "**not reproduced**", "**inconclusive**"))
    assert "| claim | at the end | at the best validation step | evidence (at the end) |" in text
    assert "distinct prompts seen" in text
    assert (tmp_path / "docs" / "reproduction_quick_methods.png").exists()
    assert (tmp_path / "docs" / "reproduction_quick_curves.png").exists()
    assert (tmp_path / "docs" / "reproduction_quick_competent_curves.png").exists()
    for reg in REGIMES:
        rows = [json.loads(r) for r in (tmp_path / "study" / reg.name / "results.jsonl").read_text().splitlines()]
        # seed 0 of each configuration first (it sets the length), then the other seed
        assert [(r["name"], r["seed"]) for r in rows] == [
            ("SFT", 0),
            (EXPOSURE, 0),
            ("GFT", 0),
            ("SFT", 1),
            (EXPOSURE, 1),
            ("GFT", 1),
        ]
        for row in rows:  # the quick budget's curves always "rise": every run reaches max_steps
            assert row["steps"] == 5 and sorted(row["curve"], key=int) == ["2", "3", "4", "5"]
            assert sorted(row["val_curve"], key=int) == ["2", "3", "4", "5"]
            assert row["best_step"] in (2, 3, 4, 5) and {"id", "ood", "probe", "id_per_prompt"} <= set(row["at_best"])
            for key in ("id", "id_greedy", "ood_greedy", "probe_greedy", "pass@4", "distinct", "kl", "kl_base"):
                assert key in row, key
            assert sorted(row["passk_curve"]) == ["pass@1", "pass@2", "pass@4"]
        sft, exposure, gft = rows[:3]
        assert (sft["sequences"], exposure["sequences"], gft["sequences"]) == (5 * 64, 5 * 8, 5 * 64)
        # 48 fine-tuning rows: SFT sees them all, GFT and SFT at GFT's exposure 8 a step (40)
        assert (sft["distinct_prompts"], exposure["distinct_prompts"], gft["distinct_prompts"]) == (48, 40, 40)
        grid = [json.loads(line) for line in (tmp_path / "study" / reg.name / "grid.jsonl").read_text().splitlines()]
        assert sorted(r["name"] for r in grid) == sorted(["GFT", "SFT", EXPOSURE]) and all("val" in r for r in grid)
        setup = json.loads((tmp_path / "study" / reg.name / "setup.json").read_text())
        assert setup["regime"] == reg.name
        assert set(setup["accuracy"]) == {"base", "expert", "teacher"} and 0 <= setup["base_val"] <= 1
        assert 0 <= setup["expert_under_base"]["below_tau"] <= 1
    assert "KL(base‖model)" in text and "greedy" in text
    assert "Precondition" in text  # the set-up's room to learn, printed before the verdicts
    doc = json.loads((tmp_path / "docs" / "reproduction_quick.json").read_text())
    assert set(doc["setup"]) >= {"base", "expert", "teacher", "base_curve"}
    assert doc["setup"]["expert"]["test_pass1"] == 1.0  # the solver's demonstrations
    assert 0 <= doc["setup"]["base"]["test_pass1"] <= 1 and "val_pass1" in doc["setup"]["teacher"]
    new_skill = [json.loads(r) for r in (tmp_path / "study" / "new-skill" / "results.jsonl").read_text().splitlines()]
    gft_mean = (new_skill[2]["id"] + new_skill[5]["id"]) / 2
    assert doc["results"]["GFT"]["test"]["pass@1"] == pytest.approx(gft_mean)  # the demo's shape
    assert doc["default_regime"] == "new-skill" and set(doc["regimes"]) == {r.name for r in REGIMES}
    for reg in REGIMES:
        part = doc["regimes"][reg.name]
        assert 0 <= part["setup"]["base"]["test_pass1"] <= 1 and part["setup"]["expert"]["test_pass1"] == 1.0
        verdict = part["verdicts"]["Both GAL and DCR matter (Table 2, Figure 3)"]
        assert verdict["verdict"] in ("reproduced", "not reproduced", "inconclusive")
        assert verdict["comparisons"] and all("evidence" in c for c in verdict["comparisons"])
    assert "| configuration | pass@1 | pass@2 | pass@4 |" in text  # the pass@k curves (Table 4)
    # a rerun skips finished runs and regenerates the report
    main(["--quick", "--out", str(tmp_path / "study"), "--docs", str(tmp_path / "docs")])
    assert len((tmp_path / "study" / "new-skill" / "results.jsonl").read_text().splitlines()) == 6


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
    """64 sequences a step, but for SFT at GFT's exposure: GFT's expert sequences, 8 a step."""
    from gft_train.config import Config
    from study.plan import EXPOSURE, SEQS_PER_STEP, specs

    gft = Config(**next(s for s in specs(False) if s.name == "GFT").overrides).resolved()
    for spec in specs(False):
        cfg = Config(**spec.overrides).resolved()
        expected = gft.prompts_per_step * gft.n_expert if spec.name == EXPOSURE else SEQS_PER_STEP
        assert cfg.prompts_per_step * cfg.group_size == expected, spec.name
    assert specs(False, default_regime=False) == [s for s in specs(False) if s.family in ("methods", "ablation")]


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

    def fake_run(spec, seed, lr, out, budget, setup, grid=False, steps=None, adaptive=False):
        peak = best[spec.name]
        row = dict(name=spec.name, family=spec.family, x=spec.x, seed=seed, lr=lr, seconds=0.0, steps=steps or 7)
        if grid:
            return {**row, "val": 1.0 - abs(math.log10(lr / peak))}
        return {**row, "id": 0.5, "ood": 0.1, "probe": 0.9, "kl_base": 0.2}

    monkeypatch.setattr(run, "run_one", fake_run)
    monkeypatch.setattr(run, "make_setup", lambda out, budget, reg: {})
    monkeypatch.setattr(study.report, "write_report", lambda out, docs, budget, regimes, quick=False: out)
    monkeypatch.setattr(run, "QUICK", replace(run.QUICK, lrs=(1e-4, 3e-4), seeds=1))
    monkeypatch.setattr(
        run, "specs", lambda quick, default_regime=True: [s for s in run.main_specs() if s.name in best]
    )
    out = tmp_path / "study" / "new-skill"
    run.main(["--quick", "--out", str(out.parent), "--workers", "1", "--regimes", "new-skill"])
    grid = run.read_jsonl(out / "grid.jsonl")
    tried = {n: sorted(g["lr"] for g in grid if g["name"] == n) for n in best}
    assert tried == {"SFT": [1e-4, 3e-4, 1e-3, 3e-3], "GFT": [1e-5, 3e-5, 1e-4, 3e-4]}
    assert {(r["name"], r["lr"]) for r in run.read_jsonl(out / "results.jsonl")} == {("SFT", 1e-3), ("GFT", 1e-5)}
    # resumed from a grid cut off after its starting rates: it extends again, runs nothing twice
    first = [g for g in grid if g["lr"] in (1e-4, 3e-4)]
    (out / "grid.jsonl").write_text("".join(json.dumps(g) + "\n" for g in first))
    run.main(["--quick", "--out", str(out.parent), "--workers", "1", "--regimes", "new-skill"])
    assert sorted((g["name"], g["lr"]) for g in run.read_jsonl(out / "grid.jsonl")) == sorted(
        (g["name"], g["lr"]) for g in grid
    )
    assert len(run.read_jsonl(out / "results.jsonl")) == 2
    # a grid row that moves SFT's best (to 1e-2, at the edge: 3e-2 is tried and loses): SFT's run
    # is redone at the new rate, GFT's kept
    with (out / "grid.jsonl").open("a") as f:
        f.write(json.dumps(dict(name="SFT", family="methods", x=None, seed=0, lr=1e-2, val=2.0)) + "\n")
    run.main(["--quick", "--out", str(out.parent), "--workers", "1", "--regimes", "new-skill"])
    assert max(g["lr"] for g in run.read_jsonl(out / "grid.jsonl") if g["name"] == "SFT") == 3e-2
    rows = run.read_jsonl(out / "results.jsonl")
    assert [(r["name"], r["lr"]) for r in rows] == [("SFT", 1e-3), ("GFT", 1e-5), ("SFT", 1e-2)]
    lrs = run.choose_lrs(run.read_jsonl(out / "grid.jsonl"), ["SFT", "GFT"])
    assert [r["lr"] == run.rate_for(r["name"], r["family"], lrs) for r in rows] == [False, True, True]


def test_a_run_goes_on_while_its_validation_curve_rises():
    from study.run import still_rising

    val = {25: 0.50, 50: 0.60, 100: 0.70, 150: 0.72, 200: 0.75}
    assert still_rising(val, 200, 0.01)  # 0.75 > 0.72 + 0.01
    assert not still_rising({**val, 200: 0.725}, 200, 0.01)  # within the margin: flat
    assert not still_rising({25: 0.5, 100: 0.8, 200: 0.79}, 200, 0.01)  # best earlier: past its peak
    assert still_rising({25: 0.1}, 25, 0.01)  # the first snapshot has nothing to be flat against
    assert still_rising({25: 0.5, 50: 0.5}, 50, -1.0)  # --quick's margin: every check rises


def test_the_regimes_differ_only_in_the_base_corpus():
    from gft_train.demo import sums
    from gft_train.demo.sums import CORPUS_STYLES, final_answer, make_data, write
    from study.plan import DEFAULT_REGIME, REGIMES, regime

    assert [r.name for r in REGIMES] == list(sums.REGIMES) and REGIMES[0].name == DEFAULT_REGIME
    assert {r.corpus_style for r in REGIMES} == set(CORPUS_STYLES)
    # the slip: the last carry dropped only when the last addend has two digits
    assert write((3, 8, 19), "slip") == "3+8=11+19=20" and write((15, 3, 8), "slip") == "15+3=18+8=26"
    assert write((17, 5, 9), "no_carry") == "17+5=22+9=21" and write((17, 5, 9), "left_to_right") == "17+5=22+9=31"
    data = {style: make_data(sizes=dict(pretrain_sums=400), corpus_style=style) for style in CORPUS_STYLES}
    for name in ("train", "val", "test", "ood", "probe", "teacher_train"):
        assert data["no_carry"][name] == data["slip"][name] == data["left_to_right"][name], name

    def right(rows):
        sums = [r for r in rows if r["prompt"].count("+") == 2]
        return sum(final_answer(r["expert"]) == r["answer"] for r in sums) / len(sums)

    shares = {style: right(d["pretrain"]) for style, d in data.items()}
    assert shares["left_to_right"] == 1.0 and 0.45 < shares["no_carry"] < 0.65 and 0.65 < shares["slip"] < 0.85
    with pytest.raises(ValueError, match="corpus_style"):
        make_data(corpus_style="carry")
    with pytest.raises(ValueError, match="regime"):
        regime("expert")


def test_each_regime_states_its_precondition():
    from study.plan import regime
    from study.verdicts import precondition

    def setup(base_val, ood=0.5):
        return {"base_val": base_val, "accuracy": {"base": {"ood": ood}}}

    grid = [dict(name="SFT", lr=1e-3, val=0.97)]
    lrs = {"SFT": 1e-3}
    assert precondition(setup(0.5), grid, lrs, regime("new-skill"))[0]  # SFT gains 0.47
    assert not precondition(setup(0.9), grid, lrs, regime("new-skill"))[0]  # 0.07: nothing to learn
    met, line = precondition(setup(0.95), grid, lrs, regime("competent"))
    assert met and "harder-split" in line
    assert not precondition(setup(0.95, ood=0.95), grid, lrs, regime("competent"))[0]  # no room on the harder split
    assert not precondition(setup(0.6), grid, lrs, regime("competent"))[0]  # not a competent base
    assert precondition(setup(0.75), grid, lrs, regime("imperfect"))[0]
    met, line = precondition(setup(0.95), grid, lrs, regime("imperfect"))
    assert not met and "withheld" in line


def test_the_report_opens_with_claims_by_regime():
    from study.report import _summary_lines

    class Reg:
        def __init__(self, name):
            self.name, self.summary = name, f"the {name} regime"

    class St:
        def __init__(self, name):
            self.regime, self.base = Reg(name), {"id": 0.5, "ood": 0.3}

    claim, sweep = "GFT beats SFT", "Accuracy is an inverted U in tau"
    up, down = [("reproduced", "a")], [("not reproduced", "b")]
    read = {
        "new-skill": dict(claims=[(claim, up), (sweep, down)], best=[(claim, down), (sweep, down)], met=True),
        "competent": dict(claims=[(claim, down)], best=[(claim, down)], met=True),
        "imperfect": dict(claims=[(claim, up)], best=[(claim, up)], met=False),
    }
    lines = _summary_lines({n: St(n) for n in read}, read)
    assert "| claim | new-skill | competent | imperfect |" in lines
    assert f"| {claim} | reproduced / not reproduced | not reproduced | withheld |" in lines
    assert f"| {sweep} | not reproduced | not run (default regime only) | not run (default regime only) |" in lines


def test_a_bad_regime_is_one_line(capsys):
    for bad in ("competent,expert", "competent"):
        with pytest.raises(SystemExit) as exit_:
            main(["--quick", "--regimes", bad])
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--regimes: regime: expected one of" in err and "'expert'" in err
    assert "the default regime 'new-skill' must be among them" in err
