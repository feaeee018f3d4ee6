"""What the study runs: the regimes (``Regime``), the configurations (``Spec``), the budget, the
learning-rate ladder and how each configuration's rate is chosen. ``run.py`` runs them;
``report.py`` reads their results."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gft_train.demo.sums import REGIMES as CORPUS

SEQS_PER_STEP = 64


@dataclass(frozen=True)
class Regime:
    """One set-up of the study: what the base knows before fine-tuning. The regimes share the
    recipe and every prompt; only the style of the pre-training corpus's three-number sums differs
    (``gft_train.demo.sums.REGIMES``, where each has its style and summary), and with it what the
    base gets right. Here: what each must show before its verdicts are read."""

    name: str
    base_val: tuple = (0.0, 1.0)  # the base's validation pass@1 lies in this range
    min_sft_gain: float | None = None  # SFT at its best rate lifts validation pass@1 this much
    max_base_ood: float | None = None  # the base leaves this much room on the harder split

    @property
    def corpus_style(self) -> str:
        return CORPUS[self.name][0]

    @property
    def summary(self) -> str:
        return CORPUS[self.name][1]


REGIMES = (
    Regime("new-skill", min_sft_gain=0.15),
    Regime("competent", base_val=(0.85, 1.0), max_base_ood=0.9),
    Regime("imperfect", base_val=(0.55, 0.9), min_sft_gain=0.05),
)
DEFAULT_REGIME = REGIMES[0].name  # the one with the sweeps and the RL stages, and docs/reproduction.json's top level


def regime(name: str) -> Regime:
    for r in REGIMES:
        if r.name == name:
            return r
    raise ValueError(f"regime: expected one of {[r.name for r in REGIMES]}, got {name!r}")


@dataclass(frozen=True)
class Spec:
    name: str
    family: str  # methods | ablation | tau | ratio | staged | rl
    overrides: dict = field(default_factory=dict)
    x: float | str | None = None  # the swept value (tau, or "demo:sample")
    data: str = "train"  # train | filtered (SFT on the correct teacher responses)
    own_lr: bool = False  # chooses its learning rate on the grid (else: GFT's)


GROUPS = dict(prompts_per_step=SEQS_PER_STEP // 8)  # groups of 8, online (refreshed every step)


# SFT shown what GFT's groups show of the expert: one demonstration per group, 8 a step
EXPOSURE = "SFT(GFT's exposure)"


def main_specs() -> list[Spec]:
    return [
        Spec("SFT", "methods", dict(method="sft", prompts_per_step=SEQS_PER_STEP), own_lr=True),
        Spec(EXPOSURE, "methods", dict(method="sft", prompts_per_step=SEQS_PER_STEP // 8), own_lr=True),
        Spec(
            "SFT(filtered teacher)",
            "methods",
            dict(method="sft", prompts_per_step=SEQS_PER_STEP),
            data="filtered",
            own_lr=True,
        ),
        Spec("DFT", "methods", dict(method="dft", prompts_per_step=SEQS_PER_STEP), own_lr=True),
        Spec("GRPO", "methods", dict(method="grpo", **GROUPS), own_lr=True),
        Spec("GFT", "methods", dict(method="gft", **GROUPS), x=0.7, own_lr=True),
        Spec("GFT w/o DCR", "ablation", dict(method="gft", dcr=False, **GROUPS), x=0.0),
        # the paper's ablation without GAL: the expert demonstrations alone, A = 1, with DCR
        Spec("GFT w/o GAL", "ablation", dict(method="gft", gal=False, prompts_per_step=SEQS_PER_STEP)),
    ]


def sweep_specs() -> list[Spec]:
    taus = [Spec(f"GFT tau={t}", "tau", dict(method="gft", tau=t, **GROUPS), x=t) for t in (0.1, 0.3, 0.5, 0.9, 1.5)]
    # demonstrations : self-samples (Table 5); the default GFT is 4:4 (1 expert + 3 teacher)
    mixes = {1: dict(n_expert=1, n_teacher=0, n_self=7), 2: dict(n_expert=1, n_teacher=1, n_self=6)}
    ratios = [
        Spec(f"GFT {d}:{8 - d}", "ratio", dict(method="gft", **mix, **GROUPS), x=f"{d}:{8 - d}")
        for d, mix in mixes.items()
    ]
    return taus + ratios


# RL compatibility (Figure 4): GRPO from the SFT model against GRPO from the SFT-then-GFT model, at
# equal GRPO steps. ``start`` names the configuration whose final model (same seed) a run starts from.
RL_SPECS = (
    Spec("SFT then GFT", "staged", dict(method="gft", **GROUPS), x="SFT"),
    Spec("SFT then GRPO", "rl", dict(method="grpo", **GROUPS), x="SFT"),
    Spec("SFT then GFT then GRPO", "rl", dict(method="grpo", **GROUPS), x="SFT then GFT"),
)


def specs(quick: bool, default_regime: bool = True) -> list[Spec]:
    """The configurations of a regime: every regime runs the main methods and the ablations; the
    sweeps run in the default regime only (``--quick``: SFT, SFT at GFT's exposure and GFT)."""
    main = main_specs()
    if quick:
        return [main[0], main[1], main[5]]
    return main + (sweep_specs() if default_regime else [])


@dataclass(frozen=True)
class Budget:
    base_steps: int = 3000  # pre-training (the base); cosine, lr 3e-3
    teacher_steps: int = (
        800  # the teacher: the base trained this much longer on correct scratchpads (400 left it below the base)
    )
    steps: int = 200  # fine-tuning optimizer steps: the grid's runs, and the least a main run takes
    max_steps: int = 600  # a main run goes on past ``steps`` while its validation curve still rises
    rise: float = 0.01  # ... by more than this over its best earlier point
    curve_points: tuple = (25, 50, 100, 150, 200, 300, 400, 500)  # and the last step
    lrs: tuple = (1e-4, 3e-4, 1e-3, 3e-3)  # the default regime's grid (extended: LR_LADDER)
    seeds: int = 3
    sweep_seeds: int = 2
    rl_steps: int = 100  # each stage of the RL-compatibility runs (SFT -> GFT -> GRPO)
    eval_n: int = 8
    curve_n: int = 4
    passk_n: int = 64
    passk_prompts: int = 40
    data_sizes: tuple = ()  # overrides of make_data's split sizes, as (name, size) pairs


# The rates a grid may extend to, about x3 apart (a best rate still at one of its ends after the
# extension is reported as such).
LR_LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)

FULL = Budget()
QUICK = Budget(
    base_steps=30,
    teacher_steps=5,
    steps=3,
    max_steps=5,
    rise=-1.0,  # every check "still rises": the quick runs reach max_steps
    curve_points=(2, 3, 4),
    lrs=(1e-3,),
    seeds=2,
    sweep_seeds=1,
    rl_steps=2,
    eval_n=2,
    curve_n=1,
    passk_n=4,
    passk_prompts=4,
    data_sizes=(
        ("pretrain_sums", 64),
        ("teacher_train", 64),
        ("train", 48),
        ("val", 8),
        ("test", 12),
        ("ood", 8),
        ("pretrain_reversal", 64),
        ("probe", 8),
    ),
)


def rate_for(name: str, family: str, lrs: dict[str, float]) -> float:
    """The rate a configuration runs at: a main method its own, a GRPO stage GRPO's, the
    ablations, sweeps and GFT stages GFT's."""
    if family == "methods":
        return lrs[name]
    if family == "rl":
        return lrs["GRPO"]
    return lrs["GFT"]


def choose_lrs(grid_rows: list[dict], names) -> dict[str, float]:
    """Each method's rate with the best validation pass@1 (ties: the smaller rate)."""
    best = {}
    for name in names:
        rows = sorted((r for r in grid_rows if r["name"] == name), key=lambda r: (-r["val"], r["lr"]))
        if rows:
            best[name] = rows[0]["lr"]
    return best


def rates_around(lr: float, ladder=LR_LADDER) -> tuple:
    """A rate and its neighbours on the ladder: how a regime checks the default regime's choice."""
    i = ladder.index(lr)
    return ladder[max(0, i - 1) : i + 2]


def grid_extensions(grid_rows: list[dict], names, ladder=LR_LADDER) -> dict[str, float]:
    """The next rate to try per method whose best is the lowest or highest rate it tried: the
    ladder's rung beyond that edge (none where the ladder ends, or where it only tried one rate)."""
    best = choose_lrs(grid_rows, names)
    nxt = {}
    for name, lr in best.items():
        tried = sorted(r["lr"] for r in grid_rows if r["name"] == name)
        if len(tried) < 2 or lr not in ladder:
            continue
        i = ladder.index(lr)
        if lr == tried[0] and i > 0:
            nxt[name] = ladder[i - 1]
        elif lr == tried[-1] and i + 1 < len(ladder):
            nxt[name] = ladder[i + 1]
    return nxt


# ---- records: one JSON object per line, appended as runs finish --------------------------------
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
