"""From ``results.jsonl`` to ``docs/reproduction.md`` and its plots, with a verdict per claim.

Verdict rule, the same for every comparison "A beats B" on a metric: with the per-seed means
and standard deviations, the gap ``mean(A) - mean(B)`` is compared with the noise
``sqrt(sd(A)^2 + sd(B)^2)`` (at least 0.01): larger than the noise and in the claimed direction
-> reproduced; larger than the noise the other way -> not reproduced; otherwise inconclusive.
Where the runs kept each prompt's score (held-out, harder split, probe), the gap is also paired
by seed and prompt, with a 95% bootstrap interval over prompts (``paired_gap``), and a verdict
either way needs that interval to exclude zero on its side too.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
import statistics as st
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .plan import LR_LADDER, MIN_SFT_GAIN, SEQS_PER_STEP, choose_lrs, method_of, rate_for, read_jsonl, sweep_specs


def _agg(rows):
    by = defaultdict(list)
    for r in rows:
        by[r["name"]].append(r)
    out = {}
    for name, rs in by.items():
        keys = [
            k
            for k in rs[0]
            if isinstance(rs[0][k], (int, float)) and k not in ("seed", "x") and all(k in r for r in rs)
        ]
        out[name] = {
            k: (st.mean(r[k] for r in rs), st.pstdev([r[k] for r in rs]) if len(rs) > 1 else 0.0) for k in keys
        }
        out[name]["n"] = len(rs)
        out[name]["family"] = rs[0]["family"]
        out[name]["x"] = rs[0]["x"]
        # each prompt's score per seed, where the runs kept them: metric -> {seed: [score per prompt]}
        out[name]["per_prompt"] = {
            k[: -len("_per_prompt")]: {r["seed"]: r[k] for r in rs}
            for k in rs[0]
            if k.endswith("_per_prompt") and all(k in r for r in rs)
        }
        if all("passk_curve" in r for r in rs):  # pass@k for k = 1, 2, 4, ..., mean over seeds
            ks = sorted(rs[0]["passk_curve"], key=lambda k: int(k.split("@")[1]))
            out[name]["passk"] = {k: st.mean(r["passk_curve"][k] for r in rs) for k in ks}
        if "curve" in rs[0]:
            steps = sorted({int(s) for r in rs for s in r["curve"]})
            out[name]["curve"] = {
                s: (
                    st.mean(r["curve"][str(s)] for r in rs),
                    st.pstdev([r["curve"][str(s)] for r in rs]) if len(rs) > 1 else 0.0,
                )
                for s in steps
                if all(str(s) in r["curve"] for r in rs)
            }
            out[name]["auc"] = _auc(rs)
    return out


def _auc(rs):
    """(mean, sd) over seeds of the mean accuracy over the curve's points: a learning curve as
    one number (higher: more accuracy for the same sequences, i.e. more data-efficient)."""
    vals = [st.mean(r["curve"].values()) for r in rs]
    return st.mean(vals), st.pstdev(vals) if len(vals) > 1 else 0.0


def paired_gap(agg, a, b, metric, draws: int = 2000):
    """(gap, low, high, prompts): the mean over prompts of a's score minus b's, each prompt's
    difference averaged over the seeds both ran (paired by seed and prompt), and its 95%
    bootstrap interval over prompts. None where either run kept no per-prompt scores."""
    import numpy as np

    pa, pb = agg[a].get("per_prompt", {}).get(metric), agg[b].get("per_prompt", {}).get(metric)
    seeds = sorted(set(pa or {}) & set(pb or {}))
    if not seeds:
        return None
    diffs = np.mean([np.asarray(pa[s]) - np.asarray(pb[s]) for s in seeds], axis=0)
    picks = np.random.default_rng(0).integers(0, len(diffs), size=(draws, len(diffs)))
    low, high = np.quantile(diffs[picks].mean(axis=1), [0.025, 0.975])
    return float(diffs.mean()), float(low), float(high), len(diffs)


def compare(agg, a, b, metric, higher_is_better=True):
    """(verdict word, explanation) for the claim 'a is better than b on metric'."""
    if a not in agg or b not in agg:
        return "inconclusive", f"{a} or {b} was not run"
    (ma, sa), (mb, sb) = agg[a][metric], agg[b][metric]
    gap = (ma - mb) if higher_is_better else (mb - ma)
    noise = max(math.sqrt(sa**2 + sb**2), 0.01)
    text = f"{a} {ma:.3f}±{sa:.3f} vs {b} {mb:.3f}±{sb:.3f} (noise {noise:.3f}"
    above = below = True  # the paired interval's side, where there is one
    paired = paired_gap(agg, a, b, metric)
    if paired is not None:
        g, low, high, n = paired
        text += f"; paired gap {g:+.3f}, 95% CI [{low:+.3f}, {high:+.3f}] over {n} prompts"
        above, below = (low > 0, high < 0) if higher_is_better else (high < 0, low > 0)
    text += ")"
    if gap > noise and above:
        return "reproduced", text
    if gap < -noise and below:
        return "not reproduced", text
    return "inconclusive", text


def _combine(verdicts):
    words = [v for v, _ in verdicts]
    if all(w == "reproduced" for w in words):
        return "reproduced"
    if any(w == "not reproduced" for w in words):
        return "not reproduced"
    return "inconclusive"


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


def _curves_figure(agg, plt):
    """Held-out pass@1 along training, each method with its seeds' spread."""
    curves = [n for n in agg if agg[n]["family"] in ("methods", "ablation") and agg[n].get("curve")]
    longer = {method_of(n): n for n in agg if agg[n]["family"] == "long" and agg[n].get("curve")}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    for n in curves:
        pts = sorted(agg[n]["curve"].items())
        xs, ms, ss = [p for p, _ in pts], [v[0] for _, v in pts], [v[1] for _, v in pts]
        (line,) = ax.plot(xs, ms, marker="o", ms=3, label=n, ls="--" if agg[n]["family"] == "ablation" else "-")
        if n in longer:  # its longer run (one seed), dotted in the same colour
            pts = sorted(agg[longer[n]]["curve"].items())
            ax.plot([p for p, _ in pts], [v[0] for _, v in pts], ls=":", color=line.get_color(), lw=1)
        ax.fill_between(
            xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)], color=line.get_color(), alpha=0.15
        )
    ax.set_xlabel(f"optimizer steps ({SEQS_PER_STEP} sequences each)")
    if longer:
        ax.set_title("dotted: the same method, a longer run (one seed)", fontsize=8)
    ax.set_ylabel("held-out pass@1 (temperature 0.5)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _tau_figure(agg, plt):
    """Accuracy and the DCR-rectified fraction against tau."""
    taus = sorted(
        [
            (agg[n]["x"], n)
            for n in agg
            if agg[n]["x"] is not None
            and not isinstance(agg[n]["x"], str)
            and (agg[n]["family"] == "tau" or n in ("GFT", "GFT w/o DCR"))
        ]
    )
    if len(taus) < 3:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    xs = list(range(len(taus)))
    ax.errorbar(
        xs,
        [agg[n]["id"][0] for _, n in taus],
        yerr=[agg[n]["id"][1] for _, n in taus],
        marker="o",
        label="held-out pass@1",
    )
    ax.set_xticks(xs, [str(t) for t, _ in taus])
    ax.set_xlabel("tau")
    ax.set_ylabel("pass@1")
    ax2 = ax.twinx()
    ax2.plot(xs, [agg[n]["rectified"][0] for _, n in taus], color="tab:orange", marker="s", label="rectified fraction")
    ax2.set_ylabel("DCR-rectified fraction")
    fig.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.12, 0.97))
    fig.tight_layout()
    return fig


def _methods_figure(agg, plt):
    """The methods side by side: accuracy, forgetting, drift."""
    methods = [n for n in agg if agg[n]["family"] in ("methods", "ablation")]
    if not methods:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, (title, m) in zip(
        axes,
        [
            ("held-out pass@1", "id"),
            ("harder (OOD) pass@1", "ood"),
            ("digit reversal (forgetting probe)", "probe"),
            ("KL(base || model)", "kl_base"),
        ],
    ):
        ax.bar(range(len(methods)), [agg[n][m][0] for n in methods], yerr=[agg[n][m][1] for n in methods])
        ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _plots(agg, docs: Path, prefix: str) -> list[str]:
    """The report's figures that the results allow, saved under ``docs``; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for name, make in (("curves", _curves_figure), ("tau", _tau_figure), ("methods", _methods_figure)):
        fig = make(agg, plt)
        if fig is not None:
            files.append(f"{prefix}{name}.png")
            fig.savefig(docs / files[-1], dpi=110)
            plt.close(fig)
    return files


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


def _setup_lines(setup: dict, budget, k: str) -> list[str]:
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
        "sums (100 of them harder) in the prompt's order whose *last step drops its carry* "
        "(`17+5=22+9=21`): a systematic misconception, right only where the last step does not carry "
        "(55% of the prompts). So the base can add but has something to learn and to unlearn. Greedy "
        "accuracy along its training (step: validation sums / held-out reversal probe): "
        f"{curve}.",
        "- **Expert**: the task's solver. Each demonstration is the scratchpad written last addend "
        "first, carried correctly (`8+17=25+3=28`): right on "
        f"{setup['expert_train_acc']:.1%} of the fine-tuning rows, in an order the base writes on "
        f"{setup['expert_style_in_base']:.1%} of the validation prompts where it differs from the prompt's.",
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


def precondition(setup: dict, grid: list[dict], lrs: dict) -> tuple[bool, str]:
    """(met, the line the report prints): SFT at its best rate must lift validation pass@1 by at
    least ``MIN_SFT_GAIN`` over the base before any verdict is read."""
    base = setup.get("base_val")
    best = next((g["val"] for g in grid if g["name"] == "SFT" and g["lr"] == lrs.get("SFT")), None)
    if base is None or best is None:
        return False, "Precondition not measured (no SFT grid run or no base validation score)."
    met = best - base >= MIN_SFT_GAIN
    return met, (
        f"Precondition ({'met' if met else 'NOT met'}): SFT at its best rate ({lrs['SFT']:g}) lifts "
        f"validation pass@1 from the base's {base:.3f} to {best:.3f} ({best - base:+.3f}; at least "
        f"+{MIN_SFT_GAIN:.2f} is required for the set-up to have something to learn)."
        + ("" if met else " The verdicts below are withheld: change the set-up.")
    )


def write_json(path: Path, setup: dict, agg: dict, claims, met: bool, lrs: dict) -> None:
    """docs/reproduction.json: the set-up's accuracies and every configuration's mean metrics in
    the demo's shape (``results.<configuration>.<split>.pass@1``), and the verdicts."""
    splits = {"test": "id", "ood": "ood", "probe": "probe"}

    def model(a):
        return {split: {"pass@1": a.get(key), "greedy_pass@1": a.get(f"{key}_greedy")} for split, key in splits.items()}

    acc = setup["accuracy"]
    doc = {
        "setup": {name: {"test_pass1": a.get("id"), "val_pass1": a.get("val"), **model(a)} for name, a in acc.items()}
    }
    doc["setup"]["base"]["val_pass1_grid_measure"] = setup.get("base_val")
    doc["setup"]["base_curve"] = setup["base_curve"]
    doc["precondition_met"] = met
    doc["learning_rates"] = lrs
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
        res.update({m: a[m][0] for m in ("kl_base", "kl", "rectified", "grad_cv", "lr") if m in a})
        res["seeds"] = a["n"]
        if a.get("passk"):
            res["test"]["pass@k"] = a["passk"]
        doc["results"][name] = res
    doc["verdicts"] = {claim: _combine(v) if met else "withheld" for claim, v in claims}
    path.write_text(json.dumps(doc, indent=1) + "\n")


@dataclass(frozen=True)
class Study:
    """What a report reads: the grid, the rates it chose, the set-up, and each configuration's
    metrics aggregated over seeds (``_agg``)."""

    grid: list
    own: list  # the grid's methods, in the order run
    lrs: dict
    setup: dict
    agg: dict
    wall: float | None
    workers: int

    @property
    def base(self) -> dict:
        return self.setup["accuracy"]["base"]

    def names(self, *families: str) -> list[str]:
        return [n for n in self.agg if self.agg[n]["family"] in families]


def load_study(out: Path) -> Study:
    grid = read_jsonl(out / "grid.jsonl")
    own = list(dict.fromkeys(g["name"] for g in grid))
    lrs = choose_lrs(grid, own)
    # only runs at the rate the grid gives them now (a grid that moved left older runs behind)
    rows = [r for r in read_jsonl(out / "results.jsonl") if r["lr"] == rate_for(r["name"], r["family"], lrs)]
    timing = json.loads((out / "wall_seconds.json").read_text()) if (out / "wall_seconds.json").exists() else {}
    return Study(
        grid,
        own,
        lrs,
        json.loads((out / "setup.json").read_text()),
        _agg(rows),
        timing.get("seconds"),
        timing.get("workers", 1),
    )


def tau_names(agg) -> list[str]:
    return [n for n in agg if agg[n]["family"] == "tau"] + [n for n in ("GFT", "GFT w/o DCR") if n in agg]


def ratio_names(agg) -> list[str]:
    return [n for n in agg if agg[n]["family"] == "ratio"] + (["GFT"] if "GFT" in agg else [])


def collect_claims(agg, k: str, quick: bool) -> tuple[list, list[str]]:
    """(claims, not run): each claim with its comparisons; the claims whose runs are missing."""
    claims = []
    c1 = [compare(agg, "GFT", b, "id") for b in ("SFT", "SFT(filtered teacher)", "DFT", "GRPO")]
    claims.append(("GFT beats SFT, SFT on filtered teacher data, DFT and GRPO (Table 1): held-out pass@1", c1))
    c1b = [compare(agg, "GFT", b, "ood") for b in ("SFT", "SFT(filtered teacher)", "DFT", "GRPO")]
    claims.append(("... and on the harder (OOD) split", c1b))
    c_eff = [compare(agg, "GFT", b, "auc") for b in ("SFT", "SFT(filtered teacher)", "DFT")]
    claims.append(
        (
            "GFT is more data-efficient: more accuracy along the curve at equal sequences, with 1/8 "
            "of the prompts (Figure 1, Table 1)",
            c_eff,
        )
    )
    c2 = [compare(agg, "GFT", "GFT w/o GAL", "id"), compare(agg, "GFT", "GFT w/o DCR", "id")]
    claims.append(("Both GAL and DCR matter (Table 2, Figure 3)", c2))
    c2b = [compare(agg, "GFT", "GFT w/o DCR", "grad_cv", higher_is_better=False)]
    claims.append(("Without DCR the gradient norm is more volatile (Figure 3)", c2b))
    c3 = [compare(agg, "GFT", "SFT", "kl_base", higher_is_better=False), compare(agg, "GFT", "SFT", "probe")]
    claims.append(("GFT drifts less from the base model and forgets less than SFT (Table 3, Figure 5)", c3))
    c4 = [compare(agg, "GFT", "GRPO", k), compare(agg, "GFT", "SFT", k)]
    claims.append((f"GFT keeps diversity: higher {k} than GRPO and SFT (Table 4)", c4))
    not_run = []
    ratios = ratio_names(agg)
    if len(ratios) >= 3:  # 1:7, 2:6 and the default 4:4
        others = [n for n in ratios if n != "GFT 2:6"]
        c5 = [compare(agg, "GFT 2:6", n, "id") for n in others]
        claims.append(
            ("Demo:sample 2:6 is the best group ratio of 1:7, 2:6 and 4:4 (Table 5; the default GFT is 4:4)", c5)
        )
    elif not quick:
        not_run.append("Demo:sample 2:6 is the best group ratio (Table 5)")
    if "SFT then GRPO" in agg and "SFT then GFT then GRPO" in agg:
        c7 = [compare(agg, "SFT then GFT then GRPO", "SFT then GRPO", m) for m in ("id", "ood")]
        claims.append(("GRPO gains more after SFT then GFT than after SFT alone, at equal GRPO steps (Figure 4)", c7))
    elif not quick:
        not_run.append("GRPO gains more after SFT then GFT than after SFT alone (Figure 4)")
    taus = tau_names(agg)
    if len(taus) >= 7:  # all five swept taus, GFT (0.7) and GFT w/o DCR (0)
        c6 = [compare(agg, "GFT", "GFT w/o DCR", "id"), compare(agg, "GFT", "GFT tau=1.5", "id")]
        # the best tau near 0.7 against the best away from it, by the same rule as every comparison
        near = [n for n in taus if n in ("GFT", "GFT tau=0.5", "GFT tau=0.9")]
        best_near = max(near, key=lambda n: agg[n]["id"][0])
        best_far = max((n for n in taus if n not in near), key=lambda n: agg[n]["id"][0])
        word, text = compare(agg, best_near, best_far, "id")
        c6.append((word, f"best near 0.7 against best elsewhere: {text}"))
        claims.append(("Accuracy is an inverted U in tau, best near 0.7 (Figure 6)", c6))
    elif not quick:
        not_run.append("Accuracy is an inverted U in tau, best near 0.7 (Figure 6)")
    return claims, not_run


def _header_lines(study: Study, budget, quick: bool) -> list[str]:
    seeds = max(a["n"] for a in study.agg.values())
    setup, wall = study.setup, study.wall
    return [
        "# The paper's claims, reproduced in a fair miniature",
        "",
        f"Generated by `python -m study{' --quick' if quick else ''}` on {dt.date.today().isoformat()}, "
        f"on {platform.machine()} CPU ({seeds} seed(s) per main configuration"
        + (
            f"; {(wall + setup.get('seconds', 0)) / 60:.0f} min of wall time, {setup.get('seconds', 0) / 60:.0f} of "
            f"them for the set-up, {study.workers} one-thread process(es) side by side"
            if wall
            else ""
        )
        + "). Regenerate everything with `bash scripts/repro.sh`.",
        "",
    ]


def _optimization_lines(study: Study, budget) -> list[str]:
    setup, grid, lrs = study.setup, study.grid, study.lrs
    tried = sorted({g["lr"] for g in grid})
    lines = [
        "## Optimization",
        "",
        f"Every run: {budget.steps} optimizer steps of {SEQS_PER_STEP} sequences, AdamW at a constant "
        "rate, from the same base. SFT and DFT see 64 prompts x 1 demonstration per step; SFT on "
        "filtered teacher data 64 correct teacher responses; GRPO 8 prompts x 8 self-samples; GFT 8 x "
        "(1 expert + 3 teacher + 4 self-samples, sampled every step with the current weights); GFT w/o "
        "GAL (the paper's ablation: the demonstrations with DCR, A = 1) 64 x 1. The group methods see "
        "1/8 of the prompts at equal sequences, as in the paper's 10k x 8 vs 100k.",
        "",
        f"Learning rate: each main method tried {', '.join(f'{x:g}' for x in budget.lrs)} (seed 0, "
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
        f"{', '.join(map(str, budget.curve_points))} and {budget.steps}. Values are mean ± std over seeds.",
        "",
    ]


def _verdict_lines(precondition_line: str, met: bool, claims, not_run: list[str]) -> list[str]:
    lines = [
        "## Verdicts",
        "",
        precondition_line,
        "",
        "Rule (from `study/report.py`): a gap larger than the seeds' noise, `sqrt(sd_a^2 + sd_b^2)` "
        "(at least 0.01), in the claimed direction is *reproduced*; larger than the noise the other "
        "way is *not reproduced*; otherwise *inconclusive*. On held-out, harder-split and probe accuracy "
        "the gap is also paired by seed and prompt (each prompt's difference averaged over the seeds both "
        "ran) with a 95% bootstrap interval over prompts, and a verdict either way also needs that "
        "interval on its side of zero. A claim with several comparisons is "
        "reproduced only if all of them are, and not reproduced if any is.",
        "",
        "| claim | verdict | evidence |",
        "|---|---|---|",
    ]
    for claim, verdicts in claims:
        word = _combine(verdicts) if met else "withheld (precondition not met)"
        lines.append(f"| {claim} | **{word}** | " + "; ".join(f"{v}: {t}" for v, t in verdicts) + " |")
    for claim in not_run:
        lines.append(f"| {claim} | **not tested** | its sweep did not finish in this round (see the last section) |")
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
    ]
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


def _long_run_lines(study: Study, budget) -> list[str]:
    agg = study.agg
    long_names = [n for n in study.names("long") if agg[n].get("curve")]
    if not long_names:
        return []
    steps = sorted({s for n in long_names for s in agg[n]["curve"]})
    lines = [
        f"### Longer runs: {budget.long_steps} steps instead of {budget.steps} (one seed)",
        "",
        f"{', '.join(method_of(n) for n in long_names)} again at their chosen rates for "
        f"{budget.long_steps} steps (seed 0): did the curves flatten, and does the ranking at "
        f"{budget.steps} steps hold with more training?",
        "",
        "| configuration | " + " | ".join(f"step {s}" for s in steps) + " | OOD | probe | KL(base‖model) |",
        "|---|" + "---|" * (len(steps) + 3),
    ]
    for n in long_names:
        c = agg[n]["curve"]
        lines.append(
            f"| {n} | "
            + " | ".join(f"{c[s][0]:.3f}" if s in c else "" for s in steps)
            + f" | {agg[n]['ood'][0]:.3f} | {agg[n]['probe'][0]:.3f} | {agg[n]['kl_base'][0]:.3f} |"
        )
    lines += ["", "Reading them (one seed: a change counts when it exceeds 0.02):", ""]
    lines += [f"- {line}" for line in _curve_reading(agg, long_names, study.base["id"])]

    def order(step):
        ranked = sorted(long_names, key=lambda n: -agg[n]["curve"][step][0])
        return " > ".join(f"{method_of(n)} {agg[n]['curve'][step][0]:.3f}" for n in ranked)

    if all(budget.steps in agg[n]["curve"] and budget.long_steps in agg[n]["curve"] for n in long_names):
        lines += [
            f"- Order at step {budget.steps}: {order(budget.steps)}; at step {budget.long_steps}: "
            f"{order(budget.long_steps)}."
        ]
    return lines + [""]


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


def _caveat_lines(study: Study, quick: bool) -> list[str]:
    """What the numbers above cannot say on their own, where the measurements call for it."""
    agg, base, lrs = study.agg, study.base, study.lrs
    lines = []
    if "GFT" in agg and "SFT" in agg and agg["GFT"].get("curve") and agg["SFT"].get("curve"):
        g, f = sorted(agg["GFT"]["curve"].items()), sorted(agg["SFT"]["curve"].items())
        if g[0][1][0] > g[-1][1][0] and f[0][1][0] < f[-1][1][0]:
            lines += [
                "",
                "The data-efficiency verdict reads the curve mean, and here it rewards keeping the "
                f"base's accuracy: GFT starts near the base ({g[0][1][0]:.3f} at step {g[0][0]}) and declines "
                f"({g[-1][1][0]:.3f} at step {g[-1][0]}), while SFT starts low (the switch to the expert's "
                f"style costs accuracy first: {f[0][1][0]:.3f}) and rises ({f[-1][1][0]:.3f}). So it says GFT "
                "loses less on the way, not that it learns more from fewer prompts.",
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
    if missing and not quick:
        lines += [
            "",
            f"Not run in this round: {', '.join(missing)} (`sweep_specs` in `study/plan.py`); the main "
            "methods and ablations took the time budget first. `bash scripts/repro.sh` adds them (finished "
            "runs are reused).",
        ]
    return lines


def write_report(out: Path, docs: Path, budget, quick: bool = False) -> Path:
    """``docs/reproduction.md`` (or ``reproduction_quick.md``), its plots and its JSON from the
    study's records in ``out``; section by section, in the order the report reads."""
    study = load_study(out)
    docs.mkdir(parents=True, exist_ok=True)
    plots = _plots(study.agg, docs, "reproduction_quick_" if quick else "reproduction_")
    k = f"pass@{budget.passk_n}"
    claims, not_run = collect_claims(study.agg, k, quick)
    met, precondition_line = precondition(study.setup, study.grid, study.lrs)
    if quick and not met:  # the quick study checks the pipeline, not the set-up: verdicts stay shown
        met, precondition_line = (
            True,
            precondition_line.replace(
                " The verdicts below are withheld: change the set-up.", " (--quick: not enforced.)"
            ),
        )
    print(f"[study] {precondition_line}", flush=True)
    lines = (
        _header_lines(study, budget, quick)
        + _setup_lines(study.setup, budget, k)
        + _optimization_lines(study, budget)
        + _metrics_lines(budget, k)
        + _verdict_lines(precondition_line, met, claims, not_run)
        + _methods_lines(study, budget, k)
        + _curve_lines(study)
        + _long_run_lines(study, budget)
        + _sweep_lines(study.agg)
        + ["## Plots", ""]
        + [f"![{p}]({p})" for p in plots]
        + ["", "## What this miniature can and cannot say", ""]
        + LIMITS
        + _caveat_lines(study, quick)
    )
    path = docs / ("reproduction_quick.md" if quick else "reproduction.md")
    path.write_text("\n".join(lines) + "\n")
    write_json(path.with_suffix(".json"), study.setup, study.agg, claims, met, study.lrs)
    return path


LIMITS = [
    "It can say how the methods compare when each is tuned, on a task where the claims have "
    "something to act on: a skill the base lacks and the demonstrations carry (carrying in the last "
    "step: the base is right on about half the prompts, the expert on all), several correct "
    "scratchpads per prompt (diversity, group learning), an expert order the base starts at low "
    "probability (what DCR rectifies), a harder split (generalization), and a pre-training skill "
    "to lose (forgetting). The "
    "learning rates come from a grid on a validation split, not from one shared value, and the "
    "curves show whether the runs had flattened.",
    "",
    "It cannot say what happens at the paper's scale: a model of 0.13M parameters with a "
    "19-token vocabulary, a synthetic task whose 'reasoning' is two additions, a few hundred "
    "fine-tuning steps, on a CPU. Effects that rest on a large model's prior (a broad, "
    "pre-trained distribution over solution styles, long chains where one low-probability token "
    "derails a proof) are present here only in small form, so a verdict here is about this "
    "scale and this task only. The learning-rate grid has one seed per rate, about x3 apart; the sweeps "
    "fewer seeds than the main methods; the noise rule counts a gap as real only when it "
    "exceeds the spread of the seeds, which with 2-3 seeds is itself a rough estimate.",
]
