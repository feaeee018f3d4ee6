"""From each regime's ``results.jsonl`` to ``docs/reproduction.md`` and its plots, with a verdict
per claim and regime: the markdown writer (and the JSON beside it); the verdicts come from
``verdicts.py``, the plots from ``figures.py``."""

from __future__ import annotations

import datetime as dt
import json
import platform
from pathlib import Path

from .figures import save_figures
from .plan import DEFAULT_REGIME, EXPOSURE, LR_LADDER, SEQS_PER_STEP, sweep_specs
from .verdicts import (
    Study,
    collect_claims,
    combine,
    compare,
    load_study,
    paired_gap,
    precondition,
    ratio_names,
    tau_names,
)

# compare and paired_gap: the verdict rule, importable from here as well
__all__ = ["compare", "paired_gap", "write_report"]


def _fmt(agg, name, metric):
    if name not in agg or metric not in agg[name]:
        return ""
    m, s = agg[name][metric]
    if metric == "lr":
        return f"{m:g}"
    return f"{m:.3f} ± {s:.3f}"


def _table(agg, names, cols):
    head = "| configuration | " + " | ".join(c for c, _ in cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    return head + "".join(
        f"| {n} | " + " | ".join(_fmt(agg, n, m) for _, m in cols) + " |\n" for n in names if n in agg
    )


def _curve_reading(agg, names, base_id: float) -> list[str]:
    """Plain facts about each curve: where it starts and ends against the base, whether it was
    still rising at the end, whether it peaked early."""
    out = []
    for n in names:
        pts = sorted(agg[n]["curve"].items())
        (first, (m0, _)), (prev, (mp, sp)), (last, (ml, sl)) = pts[0], pts[-2], pts[-1]
        peak_step, (peak, _) = max(pts, key=lambda p: p[1][0])
        facts = [f"step {first} {m0:.3f}, step {last} {ml:.3f} (base {base_id:.3f})"]
        if ml - mp > max(0.02, sp, sl):
            facts.append(f"still rising at the end (+{ml - mp:.3f} from step {prev}): not flat")
        if peak - ml > max(0.02, sl):
            facts.append(f"best at step {peak_step} ({peak:.3f}), lower since")
        facts.append("ends below the base" if ml < base_id - 0.02 else "ends at or above the base")
        out.append(f"{n}: " + "; ".join(facts) + ".")
    return out


# what each regime's pre-training corpus writes for a three-number sum (``sums.CORPUS_STYLES``)
CORPUS = {
    "no_carry": "in the prompt's order whose *last step drops its carry* (`17+5=22+9=21`): a systematic "
    "misconception, right only where the last step does not carry (55% of the prompts). So the base can "
    "add but has something to learn and to unlearn",
    "left_to_right": "in the prompt's order, carried correctly (`17+5=22+9=31`): right on every prompt. "
    "So the base is competent in its own order; the expert writes in another",
    "slip": "in the prompt's order whose last step drops its carry *when the last addend has two digits* "
    "(`3+8=11+19=20`, but `15+3=18+8=26`): right on 77.5% of the prompts, by a rule. So the base is "
    "competent but imperfect, and its own right samples carry signal",
}


def _setup_lines(study: Study, budget, k: str) -> list[str]:
    setup = study.setup
    acc = setup["accuracy"]

    def cell(a, key):
        return f"{a[key]:.3f}" if key in a else "-"

    def row(name):
        a = acc[name]
        return (
            f"| {name} | "
            + " | ".join(cell(a, key) for key in ("id", "id_greedy", "ood", "ood_greedy", "probe", "probe_greedy"))
            + " |"
        )

    curve = ", ".join(
        f"{int(s)}: {v['val']:.3f} / {v['probe']:.3f}"
        for s, v in sorted(setup["base_curve"].items(), key=lambda x: int(x[0]))
    )
    return [
        "## Set-up",
        "",
        "- **Task** (`gft_train.demo.sums`): the sum of three numbers from 0 to 19 (answers 0-57), "
        "written as a scratchpad of partial sums, `3+17+8=` -> `3+17=20+8=28`. The addends can be "
        "combined in any of 6 orders, all correct: the reward reads only the final number. "
        "Held-out: unseen triples (in-distribution), triples from 0 to 29 with at least one above 19 "
        "(harder, OOD: answers up to 87, numbers the fine-tuning data never shows), and the "
        "forgetting probe, digit reversal `(3817)=` -> `7183`: a pre-training skill no fine-tuning "
        "data trains. Every prompt set (pre-training, teacher, fine-tuning, validation, test) is "
        "disjoint from the others.",
        "- **Base** (recipe fixed in `gft_train/demo/recipe.py` and `study/plan.py`): a tiny "
        f"Qwen2-style model (2 layers, 64 wide, 0.13M parameters, character tokenizer), {budget.base_steps} SFT "
        "steps of 64 sequences, lr 3e-3 cosine, on a pre-training mix: every single addition a+b with "
        "a <= 59, b <= 29 (both orders, carried correctly), 3000 digit reversals, and 1000 three-number "
        f"sums (100 of them harder) {CORPUS[study.regime.corpus_style]}. Greedy "
        "accuracy along its training (step: validation sums / held-out reversal probe): "
        f"{curve}.",
        "- **Expert**: the task's solver. Each demonstration is the scratchpad written last addend "
        "first, carried correctly (`8+17=25+3=28`): right on "
        f"{setup['expert_train_acc']:.1%} of the fine-tuning rows, in an order the base writes on "
        f"{setup['expert_style_in_base']:.1%} of the validation prompts where it differs from the prompt's."
        + _under_base(setup),
        f"- **Teacher**: a real model, the base trained {budget.teacher_steps} steps longer on 1000 other "
        "prompts with correct scratchpads in two orders (the prompt's and reversed); 7 samples per "
        "fine-tuning prompt at temperature 1, offline: right "
        f"{setup['teacher_train_acc']:.1%} of the time, {setup['teacher_distinct']:.1f} distinct responses "
        f"per prompt. SFT on filtered teacher data trains on the {setup['filtered_rows']} correct ones.",
        "",
        "Accuracy of the set-up (pass@1: mean over "
        f"{budget.eval_n} samples at temperature 0.5; greedy: one greedy completion; the expert's row is "
        "its demonstrations' accuracy):",
        "",
        "| model | held-out pass@1 | greedy | OOD pass@1 | OOD greedy | probe pass@1 | probe greedy |",
        "|---|---|---|---|---|---|---|",
        row("base"),
        row("expert"),
        row("teacher"),
        "",
    ]


def _under_base(setup: dict) -> str:
    e = setup.get("expert_under_base")
    if not e:
        return ""
    carrying = (
        f" ({e['below_tau_carrying']:.1%} on the prompts whose last step carries)"
        if e.get("below_tau_carrying") is not None
        else ""
    )
    return (
        f" Under the base, the median probability of a demonstration's first token is "
        f"{e['first_token_median']:.2g}, and {e['below_tau']:.1%} of its tokens{carrying} are below "
        f"tau = {e['tau']}: DCR scales those tokens' gradients by their probability."
    )


def _json_doc(study: Study, claims, best_claims, met: bool) -> dict:
    """A regime's part of docs/reproduction.json: the set-up's accuracies, every configuration's
    mean metrics in the demo's shape (``results.<configuration>.<split>.pass@1``), and the
    verdicts (at the end and at each run's best validation step, with their evidence)."""
    splits = {"test": "id", "ood": "ood", "probe": "probe"}
    setup, agg = study.setup, study.agg

    def model(a):
        return {split: {"pass@1": a.get(key), "greedy_pass@1": a.get(f"{key}_greedy")} for split, key in splits.items()}

    acc = setup["accuracy"]
    doc = {
        "setup": {name: {"test_pass1": a.get("id"), "val_pass1": a.get("val"), **model(a)} for name, a in acc.items()}
    }
    doc["setup"]["base"]["val_pass1_grid_measure"] = setup.get("base_val")
    doc["setup"]["base_curve"] = setup["base_curve"]
    if "expert_under_base" in setup:
        doc["setup"]["expert"]["under_base"] = setup["expert_under_base"]
    doc["precondition_met"] = met
    doc["learning_rates"] = study.lrs
    doc["results"] = {}
    for name, a in agg.items():
        res = {
            split: {
                "pass@1": a[key][0],
                "pass@1_sd": a[key][1],
                **({"greedy_pass@1": a[f"{key}_greedy"][0]} if f"{key}_greedy" in a else {}),
            }
            for split, key in splits.items()
            if key in a
        }
        for split, key in splits.items():
            if split in res and key in study.agg_best.get(name, {}):
                res[split]["pass@1_at_best_step"] = study.agg_best[name][key][0]
        keep = ("kl_base", "kl", "rectified", "grad_cv", "lr", "steps", "best_step", "distinct_prompts", "sequences")
        res.update({m: a[m][0] for m in keep if m in a})
        res["seeds"] = a["n"]
        if a.get("passk"):
            res["test"]["pass@k"] = a["passk"]
        doc["results"][name] = res
    best = dict(best_claims)
    doc["verdicts"] = {
        claim: {
            "verdict": combine(v) if met else "withheld",
            "at_best_step": (combine(best[claim]) if met else "withheld") if claim in best else None,
            "comparisons": [{"verdict": w, "evidence": t} for w, t in v],
        }
        for claim, v in claims
    }
    return doc


def _header_lines(studies: dict, timing: dict, quick: bool) -> list[str]:
    seeds = max(a["n"] for st in studies.values() for a in st.agg.values())
    wall = timing.get("seconds")
    return [
        "# The paper's claims, reproduced in a fair miniature, in three regimes",
        "",
        f"Generated by `python -m study{' --quick' if quick else ''}` on {dt.date.today().isoformat()}, "
        f"on {platform.machine()} CPU ({seeds} seed(s) per main configuration"
        + (
            f"; {wall / 60:.0f} min of wall time for every regime, set-ups included, "
            f"{timing.get('workers', 1)} one-thread process(es) side by side"
            if wall
            else ""
        )
        + "). Regenerate everything with `bash scripts/repro.sh`.",
        "",
    ]


def _summary_lines(studies: dict, read: dict) -> list[str]:
    """The one table the report opens with: claims as rows, regimes as columns."""
    names = list(studies)
    claims = list(dict.fromkeys(c for n in names for c, _ in read[n]["claims"]))
    lines = [
        "## Verdicts by regime",
        "",
        "Each cell: the verdict at the end of the runs, then (after /) at each run's best validation "
        "step where that differs. The regimes:",
        "",
    ]
    for n, st in studies.items():
        base = st.base
        lines.append(
            f"- **{n}**: {st.regime.summary}. Base held-out pass@1 {base['id']:.3f}, harder split "
            f"{base['ood']:.3f}; precondition {'met' if read[n]['met'] else 'NOT met (verdicts withheld)'}."
        )
    lines += ["", "| claim | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for claim in claims:
        cells = []
        for n in names:
            end = dict(read[n]["claims"]).get(claim)
            if end is None:
                cells.append("not run" + (" (default regime only)" if n != DEFAULT_REGIME else ""))
                continue
            if not read[n]["met"]:
                cells.append("withheld")
                continue
            word, best = combine(end), dict(read[n]["best"]).get(claim)
            cells.append(word if best is None or combine(best) == word else f"{word} / {combine(best)}")
        lines.append(f"| {claim} | " + " | ".join(cells) + " |")
    return lines + [""]


def _optimization_lines(study: Study, budget) -> list[str]:
    setup, grid, lrs = study.setup, study.grid, study.lrs
    tried = sorted({g["lr"] for g in grid})
    first = (
        f"each main method tried {', '.join(f'{x:g}' for x in budget.lrs)}"
        if study.regime.name == DEFAULT_REGIME
        else f"each main method tried the rate the {DEFAULT_REGIME} regime chose for it and one rung either side"
    )
    lines = [
        "## Optimization",
        "",
        f"Every run: optimizer steps of {SEQS_PER_STEP} sequences, AdamW at a constant rate, from the same "
        "base. SFT and DFT see 64 prompts x 1 demonstration per step; SFT on filtered teacher data 64 "
        f"correct teacher responses; {EXPOSURE} 8 prompts x 1 demonstration (the expert sequences GFT's "
        "groups hold); GRPO 8 prompts x 8 self-samples; GFT 8 x (1 expert + 3 teacher + 4 self-samples, "
        "sampled every step with the current weights); GFT w/o GAL (the paper's ablation: the "
        "demonstrations with DCR, A = 1) 64 x 1. Length: seed 0 of each configuration trains "
        f"{budget.steps} steps and goes on, up to {budget.max_steps}, while its validation pass@1 still "
        f"rises (by more than {budget.rise:g} over its best earlier snapshot); its other seeds train as "
        "long. Distinct prompts seen are counted per run (the methods table).",
        "",
        f"Learning rate: {first} (seed 0, {budget.steps} steps, "
        "scored by pass@1 on the validation split at the last step); a method whose best was the lowest "
        "or highest rate it had tried went on one step (x3) further that way, until its best was inside "
        "the rates it tried. Each keeps its best; the ablations and sweeps use GFT's."
        + (
            f" Before any fine-tuning the base scores {setup['base_val']:.3f} on this measure."
            if "base_val" in setup
            else ""
        ),
        "",
        "| method | " + " | ".join(f"lr {x:g}" for x in tried) + " | chosen |",
        "|---|" + "---|" * (len(tried) + 1),
    ]
    for n in study.own:
        cells = []
        for x in tried:
            r = next((g for g in grid if g["name"] == n and g["lr"] == x), None)
            cells.append("" if r is None else (f"**{r['val']:.3f}**" if lrs.get(n) == x else f"{r['val']:.3f}"))
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {lrs.get(n, float('nan')):g} |")
    if len(tried) > 1:
        lines += _edge_lines(study)
    return lines


def _edge_lines(study: Study) -> list[str]:
    """The methods whose best rate is still at an edge of what they tried, and why where it reads so."""
    grid, lrs, setup = study.grid, study.lrs, study.setup
    edge = [
        n
        for n in study.own
        if lrs.get(n) in (min(g["lr"] for g in grid if g["name"] == n), max(g["lr"] for g in grid if g["name"] == n))
    ]
    if not edge:
        return []
    lines = [
        "",
        "Still at the edge of what was tried: "
        + ", ".join(
            f"{n} ({lrs[n]:g}"
            + (
                ", where the rate ladder `study.plan.LR_LADDER` ends)"
                if lrs[n] in (LR_LADDER[0], LR_LADDER[-1])
                else ")"
            )
            for n in edge
        )
        + "; for these the grid bounds the best rate on one side only.",
    ]
    for n in edge:
        vals = sorted((g["lr"], g["val"]) for g in grid if g["name"] == n)
        falling = all(a[1] > b[1] for a, b in zip(vals, vals[1:]))
        if lrs[n] == vals[0][0] and falling and vals[0][1] < setup.get("base_val", -1):
            lines += [
                "",
                f"{n}: validation accuracy rose at every step down the ladder, toward the base's own "
                f"{setup['base_val']:.3f}, and stayed below it: at every rate tried, {n}'s training "
                "lowered accuracy here, and the lowest rate is best because it moves the base least.",
            ]
    return lines


def _metrics_lines(budget, k: str) -> list[str]:
    return [
        "",
        f"Metrics (`gft_train.evaluate.evaluate_model`): mean pass@1 over {budget.eval_n} samples at "
        "temperature 0.5 (the paper's) and greedy pass@1; "
        f"{k} over {budget.passk_n} samples on {budget.passk_prompts} prompts with the number of "
        "distinct correct scratchpads among them; KL(base || model) per token on the base model's own "
        "samples (the paper's forgetting measure) and KL(model || base) on held-out expert-style "
        "answers; the DCR-rectified fraction during training; gradient-norm volatility (std / mean "
        f"over steps). Curves: held-out pass@1 over {budget.curve_n} samples at steps "
        f"{', '.join(map(str, budget.curve_points))} (those a run reaches) and its last; the validation "
        "split is scored at the same steps, and each run is also evaluated at its best validation step. "
        "Values are mean ± std over seeds.",
        "",
    ]


def _verdict_lines(precondition_line: str, met: bool, claims, best_claims, not_run: list[str]) -> list[str]:
    best = dict(best_claims)
    lines = [
        "## Verdicts",
        "",
        precondition_line,
        "",
        "Rule (from `study/verdicts.py`): a gap larger than the seeds' noise, `sqrt(sd_a^2 + sd_b^2)` "
        "(at least 0.01), in the claimed direction is *reproduced*; larger than the noise the other "
        "way is *not reproduced*; otherwise *inconclusive*. On held-out, harder-split and probe accuracy "
        "the gap is also paired by seed and prompt (each prompt's difference averaged over the seeds both "
        "ran) with a 95% bootstrap interval over prompts, and a verdict either way also needs that "
        "interval on its side of zero. A claim with several comparisons is "
        "reproduced only if all of them are, and not reproduced if any is. Each claim is read at the end "
        "of the runs (evidence shown) and again with each run's held-out scores taken at its best "
        "validation step (KL, pass@k and volatility stay the end's).",
        "",
        "| claim | at the end | at the best validation step | evidence (at the end) |",
        "|---|---|---|---|",
    ]
    for claim, verdicts in claims:
        word = combine(verdicts) if met else "withheld (precondition not met)"
        at_best = (combine(best[claim]) if met else "withheld") if claim in best else ""
        lines.append(f"| {claim} | **{word}** | {at_best} | " + "; ".join(f"{v}: {t}" for v, t in verdicts) + " |")
    for claim in not_run:
        lines.append(f"| {claim} | **not tested** | | its sweep did not finish in this round (see the last section) |")
    return lines


def _methods_lines(study: Study, budget, k: str) -> list[str]:
    agg, base = study.agg, study.base
    method_names = study.names("methods", "ablation")
    lines = [
        "",
        "## Methods at equal compute (Tables 1-4)",
        "",
        _table(
            agg,
            method_names,
            [
                ("lr", "lr"),
                ("held-out pass@1", "id"),
                ("greedy", "id_greedy"),
                ("OOD pass@1", "ood"),
                ("OOD greedy", "ood_greedy"),
                ("probe pass@1", "probe"),
                ("KL(base‖model)", "kl_base"),
                ("KL(model‖base)", "kl"),
                (k, k),
                ("distinct correct", "distinct"),
                ("curve mean", "auc"),
                ("grad-norm volatility", "grad_cv"),
            ],
        ),
        f"Base model: held-out {base['id']:.3f} (greedy {base['id_greedy']:.3f}), OOD {base['ood']:.3f}, "
        f"probe {base['probe']:.3f}.",
        "",
    ] + _length_lines(study, method_names)
    passk_names = [n for n in method_names if agg[n].get("passk")]
    if passk_names:
        ks = list(agg[passk_names[0]]["passk"])
        lines += [
            f"pass@k on the first {budget.passk_prompts} held-out prompts ({budget.passk_n} samples each at "
            "temperature 0.5, the unbiased estimator; mean over seeds):",
            "",
            "| configuration | " + " | ".join(ks) + " |",
            "|---|" + "---|" * len(ks),
        ]
        lines += [f"| {n} | " + " | ".join(f"{agg[n]['passk'][k]:.3f}" for k in ks) + " |" for n in passk_names]
    lines += [
        "",
        "The paper (Qwen2.5-Math / Llama, NuminaMath) reports GFT above SFT, SFT(mix), DFT "
        "and GRPO on seven benchmarks. Table 3 (Llama-3.2-3B) has base / +SFT / +GRPO / +GFT "
        "at 96.06 / 91.97 / 94.60 / 95.79 on MAWPS: SFT forgets, GFT barely. Table 4's "
        "pass@128 average is 24.52 for the base, 49.87 for GRPO and 62.16 for GFT.",
        "",
    ]
    return lines


def _length_lines(study: Study, names: list[str]) -> list[str]:
    """How long each configuration trained, how much data it saw, and its accuracy at its best
    validation step (mean over seeds)."""
    agg, best = study.agg, study.agg_best
    rows = [n for n in names if "steps" in agg[n]]
    if not rows:
        return []

    def cell(a, key, fmt):
        return format(a[key][0], fmt) if key in a else ""

    lines = [
        "Length and data (mean over seeds), and held-out accuracy at each run's best validation step:",
        "",
        "| configuration | steps | best validation step | sequences | distinct prompts seen | held-out pass@1 at best | OOD pass@1 at best | probe at best |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in rows:
        a = agg[n]
        lines.append(
            f"| {n} | {cell(a, 'steps', '.0f')} | {cell(a, 'best_step', '.0f')} | {cell(a, 'sequences', '.0f')} | "
            f"{cell(a, 'distinct_prompts', '.0f')} | {_fmt(best, n, 'id')} | {_fmt(best, n, 'ood')} | {_fmt(best, n, 'probe')} |"
        )
    return lines + [""]


def _curve_lines(study: Study) -> list[str]:
    agg = study.agg
    curve_names = [n for n in study.names("methods", "ablation") if agg[n].get("curve")]
    if not curve_names:
        return []
    steps = sorted({s for n in curve_names for s in agg[n]["curve"]})
    lines = [
        "### Held-out pass@1 along training",
        "",
        "| configuration | " + " | ".join(f"step {s}" for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for n in curve_names:
        c = agg[n]["curve"]
        cells = [f"{c[s][0]:.3f} ± {c[s][1]:.3f}" if s in c else "" for s in steps]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return (
        lines
        + [
            "",
            "Reading the curves (computed from the table: a change counts when it exceeds 0.02 and the seeds' spread):",
            "",
        ]
        + [f"- {line}" for line in _curve_reading(agg, curve_names, study.base["id"])]
        + [""]
    )


def _sweep_lines(agg) -> list[str]:
    lines = []
    taus, ratios = tau_names(agg), ratio_names(agg)
    if len(taus) >= 3:
        taus = sorted(taus, key=lambda n: agg[n]["x"])
        lines += [
            "## tau sweep (Figure 6)",
            "",
            _table(
                agg,
                taus,
                [
                    ("held-out pass@1", "id"),
                    ("OOD pass@1", "ood"),
                    ("DCR-rectified fraction", "rectified"),
                    ("KL(base‖model)", "kl_base"),
                    ("grad-norm volatility", "grad_cv"),
                ],
            ),
            "The paper finds an inverted U with the best accuracy near tau = 0.7, and a rectified "
            "fraction that rises with tau. (`GFT` is tau = 0.7; `GFT w/o DCR` is tau = 0.)",
            "",
        ]
    if len(ratios) >= 3:
        lines += [
            "## Group ratio demo:sample (Table 5)",
            "",
            _table(agg, ratios, [("held-out pass@1", "id"), ("OOD pass@1", "ood"), ("KL(base‖model)", "kl_base")]),
            "The paper (Qwen2.5-Math-1.5B, average of three benchmarks): 8:0 24.84, 6:2 43.60, "
            "4:4 43.13, 2:6 45.59, 0:8 30.84. (`GFT` here is 4:4; demonstrations are 1 expert + "
            "the rest teacher responses.)",
            "",
        ]
    return lines


def _caveat_lines(study: Study, quick: bool, default: bool) -> list[str]:
    """What the numbers above cannot say on their own, where the measurements call for it."""
    agg, base, lrs = study.agg, study.base, study.lrs
    lines = []
    seen = [n for n in ("SFT", EXPOSURE, "GFT") if n in agg and "distinct_prompts" in agg[n] and "sequences" in agg[n]]
    if len(seen) == 3:
        rows = study.setup.get("train_rows", 0)
        lines += [
            "",
            "Data, as the paper counts it (distinct prompts, not steps): "
            + "; ".join(
                f"{n} trained on {agg[n]['distinct_prompts'][0]:.0f} distinct prompts in "
                f"{agg[n]['sequences'][0]:.0f} sequences"
                + (
                    f" ({agg[n]['sequences'][0] / rows:.1f} passes over the {rows} fine-tuning rows)"
                    if n == "SFT" and rows
                    else ""
                )
                for n in seen
            )
            + f". The pool has {rows} prompts and every run cycles it, so a long run sees them all: the "
            "paper's 10k against 100k prompts is not what this miniature varies. What it can hold equal is "
            f"the expert data: {EXPOSURE} sees the demonstrations GFT's groups hold, 8 a step, and the "
            "data-efficiency claim compares GFT with it after as many steps (its curve), which separates "
            "what GFT's groups add from how much of the expert each method sees.",
        ]
    if "GFT" in agg and agg["GFT"]["kl_base"][0] < 0.01 and "SFT" in agg:
        lines += [
            "",
            f"GFT's chosen rate ({lrs.get('GFT', float('nan')):g}) leaves the base almost as it was: KL(base || model) "
            f"{agg['GFT']['kl_base'][0]:.3f} against SFT's {agg['SFT']['kl_base'][0]:.3f}, held-out "
            f"{agg['GFT']['id'][0]:.3f} from the base's {base['id']:.3f}. Here GFT's 'reproduced' on the harder "
            "split and on forgetting says that the method with the best validation score kept what the base "
            "knew, not that it learned more; its higher rates moved it and scored lower on validation (the "
            "grid above).",
        ]
    gft_rates = sorted(g["lr"] for g in study.grid if g["name"] == "GFT")
    if (
        "GFT" in agg
        and "SFT" in agg
        and gft_rates
        and lrs.get("GFT") == gft_rates[0]
        and agg["GFT"]["id"][0] < base["id"] - 0.02
    ):
        gained = [n for n in study.names("methods") if agg[n]["id"][0] >= base["id"] - 0.02]
        lines += [
            "",
            f"GFT's comparisons come from its lowest rate ({lrs['GFT']:g}), where it moved least: "
            f"KL(base || model) {agg['GFT']['kl_base'][0]:.3f} against SFT's {agg['SFT']['kl_base'][0]:.3f}, "
            f"and held-out accuracy down from the base's {base['id']:.3f} to {agg['GFT']['id'][0]:.3f}. Of the "
            "main methods, "
            + (f"only {', '.join(gained)} ended at or above the base" if gained else "none ended at the base")
            + ", so the held-out, harder-split, forgetting and diversity verdicts mostly rank how much of "
            "the base each method kept at its best rate. Read GFT's 'reproduced' there as 'costs the least', "
            "not 'learns the most'.",
        ]
    missing = [sp.name for sp in sweep_specs() if sp.name not in agg]
    if missing and not quick and default:
        lines += [
            "",
            f"Not run in this round: {', '.join(missing)} (`sweep_specs` in `study/plan.py`); the main "
            "methods and ablations took the time budget first. `bash scripts/repro.sh` adds them (finished "
            "runs are reused).",
        ]
    return lines


def _regime_lines(study: Study, read: dict, budget, k: str, prefix: str, docs: Path) -> list[str]:
    """One regime's part of the report, its headings a level below the document's."""
    default = study.regime.name == DEFAULT_REGIME
    plots = save_figures(study.agg, docs, prefix)
    lines = (
        _setup_lines(study, budget, k)
        + _optimization_lines(study, budget)
        + _metrics_lines(budget, k)
        + _verdict_lines(read["line"], read["met"], read["claims"], read["best"], read["not_run"])
        + _methods_lines(study, budget, k)
        + _curve_lines(study)
        + (_sweep_lines(study.agg) if default else [])
        + ["## Plots", ""]
        + [f"![{p}]({p})" for p in plots]
    )
    caveats = _caveat_lines(study, read["quick"], default)
    if caveats:
        lines += ["", "## Reading the numbers"] + caveats
    title = f"## Regime {study.regime.name}" + (" (the default)" if default else "")
    return ["", title, "", f"{study.regime.summary[0].upper()}{study.regime.summary[1:]}.", ""] + [
        "#" + line if line.startswith("#") else line for line in lines
    ]


def write_report(out: Path, docs: Path, budget, regimes, quick: bool = False) -> Path:
    """``docs/reproduction.md`` (or ``reproduction_quick.md``), its plots and its JSON from the
    study's records in ``out/<regime>``: the claims-by-regime table, then each regime in turn."""
    studies = {name: load_study(out / name) for name in regimes}
    timing = json.loads((out / "wall_seconds.json").read_text()) if (out / "wall_seconds.json").exists() else {}
    docs.mkdir(parents=True, exist_ok=True)
    k = f"pass@{budget.passk_n}"
    read = {}
    for name, study in studies.items():
        claims, not_run = collect_claims(study.agg, k, quick)
        best_claims, _ = collect_claims(study.agg_best, k, quick)
        if name != DEFAULT_REGIME:
            not_run = []  # the sweeps and RL stages run in the default regime only
        met, line = precondition(study.setup, study.grid, study.lrs, study.regime)
        if quick and not met:  # the quick study checks the pipeline, not the set-up: verdicts stay shown
            met, line = (
                True,
                line.replace(" The verdicts below are withheld: change the set-up.", " (--quick: not enforced.)"),
            )
        print(f"[study] {name}: {line}", flush=True)
        read[name] = dict(claims=claims, best=best_claims, not_run=not_run, met=met, line=line, quick=quick)
    stem = "reproduction_quick" if quick else "reproduction"
    lines = _header_lines(studies, timing, quick) + _summary_lines(studies, read)
    for name, study in studies.items():
        prefix = f"{stem}_" if name == DEFAULT_REGIME else f"{stem}_{name}_"
        lines += _regime_lines(study, read[name], budget, k, prefix, docs)
    lines += ["", "## What this miniature can and cannot say", ""] + LIMITS
    path = docs / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    docs_json = {
        name: _json_doc(st, read[name]["claims"], read[name]["best"], read[name]["met"]) for name, st in studies.items()
    }
    top = dict(docs_json.get(DEFAULT_REGIME, {}))
    top["verdicts"] = {c: v["verdict"] for c, v in top.get("verdicts", {}).items()}  # the default regime's words
    top["default_regime"] = DEFAULT_REGIME
    top["regimes"] = docs_json
    path.with_suffix(".json").write_text(json.dumps(top, indent=1) + "\n")
    return path


LIMITS = [
    "It can say how the methods compare when each is tuned, in three regimes that differ only in what "
    "the base knows: a skill it lacks and the demonstrations carry (new-skill: carrying in the last "
    "step, the base right on about half the prompts, the expert on all), a competent base whose "
    "accuracy fine-tuning can only keep or lose (the paper's regime), and a base right on about 3/4 "
    "whose own samples carry signal. In each: several correct scratchpads per prompt (diversity, "
    "group learning), an expert order the base starts at low probability (what DCR rectifies), a "
    "harder split (generalization), and a pre-training skill to lose (forgetting). The learning rates "
    "come from a grid on a validation split, not from one shared value, and each run trains until its "
    "validation curve stops rising (up to a cap), read at the end and at its best validation step.",
    "",
    "It cannot say what happens at the paper's scale: a model of 0.13M parameters with a "
    "19-token vocabulary, a synthetic task whose 'reasoning' is two additions, a few hundred "
    "fine-tuning steps, on a CPU. Effects that rest on a large model's prior (a broad, "
    "pre-trained distribution over solution styles, long chains where one low-probability token "
    "derails a proof) are present here only in small form, so a verdict here is about this "
    "scale and this task only. The learning-rate grid has one seed per rate, about x3 apart (the "
    "other regimes check the default's choice one rung either side); the sweeps run in the default "
    "regime only, with fewer seeds than the main methods; the noise rule counts a gap as real only "
    "when it exceeds the spread of the seeds, which with 2-3 seeds is itself a rough estimate.",
]
