"""The study's verdicts: its records aggregated over seeds (``load_study``), the claims and their
comparisons (``collect_claims``), and the precondition that gates them.

Verdict rule, the same for every comparison "A beats B" on a metric: with the per-seed means
and standard deviations, the gap ``mean(A) - mean(B)`` is compared with the noise
``sqrt(sd(A)^2 + sd(B)^2)`` (at least 0.01): larger than the noise and in the claimed direction
-> reproduced; larger than the noise the other way -> not reproduced; otherwise inconclusive.
Where the runs kept each prompt's score (held-out, harder split, probe), the gap is also paired
by seed and prompt, with a 95% bootstrap interval over prompts (``paired_gap``), and a verdict
either way needs that interval to exclude zero on its side too.
"""

from __future__ import annotations

import json
import math
import statistics as st
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .plan import EXPOSURE, Regime, choose_lrs, rate_for, read_jsonl, regime


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


def combine(verdicts):
    words = [v for v, _ in verdicts if not v.startswith("(")]  # "(...)": a fact beside the comparisons
    if all(w == "reproduced" for w in words):
        return "reproduced"
    if any(w == "not reproduced" for w in words):
        return "not reproduced"
    return "inconclusive"


def precondition(setup: dict, grid: list[dict], lrs: dict, reg: Regime) -> tuple[bool, str]:
    """(met, the line the report prints): what the regime's set-up must show before its verdicts
    are read (``Regime``): the base's validation pass@1 in its range, SFT's gain at its best rate,
    room on the harder split."""
    base = setup.get("base_val")
    best = next((g["val"] for g in grid if g["name"] == "SFT" and g["lr"] == lrs.get("SFT")), None)
    if base is None or best is None:
        return False, "Precondition not measured (no SFT grid run or no base validation score)."
    lo, hi = reg.base_val
    parts, met = [], lo <= base <= hi
    if (lo, hi) != (0.0, 1.0):
        parts.append(
            f"the base's validation pass@1 {base:.3f} is within [{lo:.2f}, {hi:.2f}]" + ("" if met else ": NOT")
        )
    if reg.min_sft_gain is not None:
        ok = best - base >= reg.min_sft_gain
        met &= ok
        parts.append(
            f"SFT at its best rate ({lrs['SFT']:g}) lifts validation pass@1 from {base:.3f} to {best:.3f} "
            f"({best - base:+.3f}; at least +{reg.min_sft_gain:.2f} is required: something to learn)"
            + ("" if ok else ": NOT")
        )
    if reg.max_base_ood is not None:
        ood = setup["accuracy"]["base"]["ood"]
        ok = ood <= reg.max_base_ood
        met &= ok
        parts.append(
            f"the base's harder-split pass@1 {ood:.3f} leaves room (at most {reg.max_base_ood:.2f})"
            + ("" if ok else ": NOT")
        )
    return met, (
        f"Precondition ({'met' if met else 'NOT met'}): "
        + "; ".join(parts)
        + "."
        + ("" if met else " The verdicts below are withheld: change the set-up.")
    )


@dataclass(frozen=True)
class Study:
    """What a report reads: the grid, the rates it chose, the set-up, and each configuration's
    metrics aggregated over seeds (``_agg``)."""

    regime: Regime
    grid: list
    own: list  # the grid's methods, in the order run
    lrs: dict
    setup: dict
    agg: dict  # at the end of each run
    agg_best: dict  # the held-out metrics at each run's best validation step instead

    @property
    def base(self) -> dict:
        return self.setup["accuracy"]["base"]

    def names(self, *families: str) -> list[str]:
        return [n for n in self.agg if self.agg[n]["family"] in families]


def load_study(folder: Path) -> Study:
    """A regime's records (``OUT/<regime>``), aggregated over seeds."""
    grid = read_jsonl(folder / "grid.jsonl")
    own = list(dict.fromkeys(g["name"] for g in grid))
    lrs = choose_lrs(grid, own)
    # only runs at the rate the grid gives them now (a grid that moved left older runs behind)
    rows = [r for r in read_jsonl(folder / "results.jsonl") if r["lr"] == rate_for(r["name"], r["family"], lrs)]
    setup = json.loads((folder / "setup.json").read_text())
    return Study(
        regime(setup.get("regime", folder.name)),
        grid,
        own,
        lrs,
        setup,
        _agg(rows),
        _agg([{**r, **r.get("at_best", {})} for r in rows]),
    )


def tau_names(agg) -> list[str]:
    return [n for n in agg if agg[n]["family"] == "tau"] + [n for n in ("GFT", "GFT w/o DCR") if n in agg]


def ratio_names(agg) -> list[str]:
    return [n for n in agg if agg[n]["family"] == "ratio"] + (["GFT"] if "GFT" in agg else [])


def equal_exposure(agg) -> list:
    """GFT at its end against SFT at GFT's exposure after as many steps (from its curve): the same
    expert sequences on the same distinct prompts; with the data each saw, as facts beside it."""
    gft, exp = agg.get("GFT"), agg.get(EXPOSURE)
    if gft is None or exp is None or "steps" not in gft or round(gft["steps"][0]) not in exp.get("curve", {}):
        return [compare(agg, "GFT", EXPOSURE, "id")]
    step = round(gft["steps"][0])
    at = f"{EXPOSURE} at step {step}"
    verdict = compare({"GFT": gft, at: {"id": exp["curve"][step]}}, "GFT", at, "id")
    # one demonstration per prompt: SFT at GFT's exposure's sequences per step are GFT's expert sequences
    expert = exp["sequences"][0] / exp["steps"][0] * step
    seen = f"GFT and {at}: {gft['distinct_prompts'][0]:.0f} distinct prompts, {expert:.0f} expert sequences"
    if "SFT" in agg and "distinct_prompts" in agg["SFT"]:
        sft = agg["SFT"]
        seen += f"; SFT {sft['distinct_prompts'][0]:.0f} prompts in {sft['sequences'][0]:.0f} sequences"
    end = f"{EXPOSURE} at its own end (step {exp['steps'][0]:.0f}): {exp['id'][0]:.3f}"
    return [verdict, ("(data seen)", seen), ("(longer)", end)]


def collect_claims(agg, k: str, quick: bool) -> tuple[list, list[str]]:
    """(claims, not run): each claim with its comparisons; the claims whose runs are missing."""
    claims = []
    c1 = [compare(agg, "GFT", b, "id") for b in ("SFT", "SFT(filtered teacher)", "DFT", "GRPO")]
    claims.append(("GFT beats SFT, SFT on filtered teacher data, DFT and GRPO (Table 1): held-out pass@1", c1))
    c1b = [compare(agg, "GFT", b, "ood") for b in ("SFT", "SFT(filtered teacher)", "DFT", "GRPO")]
    claims.append(("... and on the harder (OOD) split", c1b))
    claims.append(
        (
            "GFT is more data-efficient: more held-out accuracy than SFT shown the same expert "
            "demonstrations on as many distinct prompts (Figure 1, Table 1)",
            equal_exposure(agg),
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
