"""The reproduction study: the paper's section 4 claims, in a fair miniature, in three regimes.

    python -m study [--quick] [--out runs/study] [--docs docs] [--workers 2] [--regimes a,b]

Task and recipe (``gft_train/demo/recipe.py``): the sum of three numbers as a scratchpad of
partial sums, any order (several correct paths); a base model pre-trained to convergence; the
task's solver as the expert (one canonical order the base never writes, always right); a real
teacher model (the base trained longer on correct scratchpads; diverse paths, real errors,
sampled offline). The regimes (``study.plan.REGIMES``) differ only in the base's pre-training
corpus, so in what the base knows:

- ``new-skill``: its sums drop the last carry (right on about half): a skill to learn;
- ``competent``: its sums are right, in the prompt's order (the paper's regime: a competent base);
- ``imperfect``: its sums drop the last carry when the last addend has two digits (about 3/4
  right): its own samples carry signal.

Each regime is built once and cached under ``OUT/<regime>/setup``. Then, at equal sequences per
optimizer step (64: SFT and DFT see 64 prompts x 1 demonstration, GRPO and GFT 8 prompts x 8
responses; SFT at GFT's exposure sees GFT's 8 demonstrations a step):

1. learning rates: in the default regime each main method tries every rate of ``Budget.lrs``
   (seed 0, ``Budget.steps`` steps, validation pass@1), going one rung of ``LR_LADDER`` further
   while its best is at an edge; the other regimes try the default's choice and one rung either
   side (extended the same way);
2. the main methods at their own rate and the ablations at GFT's, ``Budget.seeds`` seeds each.
   Seed 0 trains at least ``Budget.steps`` steps and goes on (up to ``max_steps``) while its
   validation curve still rises; the other seeds train as long. Held-out accuracy is measured at
   the end and at each run's best validation step;
3. in the default regime, the tau and group-ratio sweeps at GFT's rate and length, and RL
   compatibility: GFT from each SFT run, then GRPO from the SFT run and from the SFT-then-GFT run,
   at equal GRPO steps (``RL_SPECS``).

Each run is one process with one thread; ``--workers`` run side by side. Measured by
``gft_train.evaluate.evaluate_model``: mean pass@1 over n samples at temperature 0.5 and greedy
on held-out in-distribution, harder (OOD) and probe (digit reversal, never fine-tuned: forgetting)
prompts, pass@k and distinct correct scratchpads (diversity), KL to the base both ways.
Results append to ``OUT/<regime>/grid.jsonl`` and ``OUT/<regime>/results.jsonl`` (a rerun skips
finished runs); ``docs/reproduction.md``, its JSON and its plots are regenerated from them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics as st
import time
from pathlib import Path

from gft_train.config import Config
from gft_train.demo.recipe import BASE_SHAPE, MAX_LENGTH, MAX_NEW_TOKENS, REWARD, SnapshotTrainer

from . import report
from .plan import (
    DEFAULT_REGIME,
    FULL,
    QUICK,
    REGIMES,
    RL_SPECS,
    SEQS_PER_STEP,
    Budget,
    Regime,
    Spec,
    append_jsonl,
    choose_lrs,
    grid_extensions,
    main_specs,
    rate_for,
    rates_around,
    read_jsonl,
    regime,
    specs,
)


def _threads_one():
    # several runs side by side on a small CPU: one thread each (more oversubscribes the cores)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


# ---- the set-up ---------------------------------------------------------------------------
def make_setup(out: Path, budget: Budget, reg: Regime) -> dict:
    """Builds (or reads back) a regime's data, base, teacher and fine-tuning rows, and measures them."""
    from gft_train.demo.model import build_model
    from gft_train.demo.recipe import build_finetune_rows, make_teacher, sft, snapshot_dirs, style_share, write_rows
    from gft_train.demo.sums import EXPERT_STYLE, make_data, reward

    path = out / "setup.json"
    if path.exists():
        return json.loads(path.read_text())
    started = time.time()
    s = out / "setup"
    data = make_data(seed=0, sizes=dict(budget.data_sizes), corpus_style=reg.corpus_style)
    files = {name: str(write_rows(rows, s / "data" / f"{name}.jsonl")) for name, rows in data.items()}
    build_model(s / "init", **BASE_SHAPE)
    points = sorted({budget.base_steps // 4, budget.base_steps // 2, 3 * budget.base_steps // 4} - {0})
    base = sft(s / "init", Path(files["pretrain"]), s / "base", budget.base_steps, 3e-3, snapshots=points)
    teacher = make_teacher(base, Path(files["teacher_train"]), s / "teacher", budget.teacher_steps)
    rows, filtered = build_finetune_rows(teacher, data["train"])
    files["train"] = str(write_rows(rows, s / "data" / "train.jsonl"))
    files["filtered"] = str(write_rows(filtered or rows[:1], s / "data" / "filtered.jsonl"))
    teacher_ok = [reward([], r["teachers"], [r["answer"]] * len(r["teachers"])) for r in rows]
    info = dict(
        regime=reg.name,
        files=files,
        base=str(base),
        teacher=str(teacher),
        expert_train_acc=st.mean(reward([], [r["expert"] for r in rows], [r["answer"] for r in rows])),
        teacher_train_acc=st.mean(x for ok in teacher_ok for x in ok),
        teacher_distinct=st.mean(len(set(r["teachers"])) for r in rows),
        filtered_rows=len(filtered),
        filtered_prompts=len({r["prompt"] for r in filtered}),
        train_rows=len(rows),
    )
    splits = ("test", "ood", "probe", "val")
    info["accuracy"] = {
        name: evaluate(model_dir=m, base_dir=None, files=files, budget=budget, seed=0, full=False, splits=splits)
        for name, m in (("base", base), ("teacher", teacher))
    }
    info["accuracy"]["expert"] = solver_accuracy(files)
    # the base along its pre-training: the target task (validation) and a pre-training skill (the
    # held-out reversal probe), greedy; flat at the end = converged
    info["base_curve"] = {}
    for step, d in snapshot_dirs(s / "base", budget.base_steps).items():
        acc = evaluate(
            model_dir=d, base_dir=None, files=files, budget=budget, seed=0, full=False, splits=("val", "probe")
        )
        info["base_curve"][step] = dict(val=acc["val_greedy"], probe=acc["probe_greedy"])
    info["base_val"] = curve_accuracy(base, files, budget, 0, split="val")  # the grid's measure, before fine-tuning
    info["expert_style_in_base"] = style_share(base, data["val"], EXPERT_STYLE)
    info["expert_under_base"] = expert_token_probs(base, data["val"])
    info["seconds"] = round(time.time() - started, 1)
    path.write_text(json.dumps(info, indent=1))
    return info


def expert_token_probs(model_dir, rows: list[dict], tau: float = 0.7) -> dict:
    """How the base sees the expert's demonstrations (what DCR acts on): the median probability of
    each demonstration's first token, and the share of its tokens below tau, on all prompts and
    on those whose last step carries."""
    import torch

    from gft_train.models import load_model
    from gft_train.render import render

    model, tok = load_model(str(model_dir))
    model.eval()
    firsts, below, below_carry = [], [], []
    for r, (p_ids, r_ids) in zip(rows, render(tok, [(r["prompt"], r["expert"]) for r in rows])):
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].float().log_softmax(-1)
        probs = logp[len(p_ids) - 1 :].gather(1, ids[0, len(p_ids) :, None])[:, 0].exp().tolist()
        firsts.append(probs[0])
        low = [x < tau for x in probs]
        below += low
        a, b, c = (int(x) for x in r["prompt"][:-1].split("+"))
        if (a + b) % 10 + c % 10 >= 10:  # the last step carries in the prompt's order
            below_carry += low
    return dict(
        tau=tau,
        first_token_median=st.median(firsts),
        below_tau=st.mean(below),
        below_tau_carrying=st.mean(below_carry) if below_carry else None,
    )


def solver_accuracy(files: dict) -> dict:
    """The expert (the task's solver): the share of its demonstrations that are right, per split."""
    from gft_train.data import load_rows
    from gft_train.demo.sums import reward

    names = {"test": "id", "ood": "ood", "val": "val"}
    out = {}
    for split, key in names.items():
        rows = load_rows(files[split])
        out[key] = st.mean(reward([], [r.expert for r in rows], [r.answer for r in rows]))
    return out


# ---- one run ------------------------------------------------------------------------------
def eval_config(n: int, seed: int, greedy: bool = True) -> Config:
    """The study's evaluation settings (``gft_train.evaluate.evaluate_model`` reads them): the
    paper's temperature (0.5, the default), n samples per prompt, greedy pass@1 beside."""
    return Config(
        max_new_tokens=MAX_NEW_TOKENS,
        max_length=MAX_LENGTH,
        engine="transformers",
        rollout_batch_size=512,
        eval_n=n,
        eval_k=[],
        eval_greedy=greedy,
        seed=seed,
        reward=REWARD,
    )


def evaluate(
    model_dir, base_dir, files: dict, budget: Budget, seed: int, full: bool = True, splits=("test", "ood", "probe")
) -> dict:
    """pass@1 (n samples, temperature 0.5) and greedy per split; with ``full``, also pass@k,
    distinct correct answers and KL to the base."""
    from gft_train.data import load_rows
    from gft_train.demo.sums import reward
    from gft_train.evaluate import evaluate_model

    names = {"test": "id", "ood": "ood", "probe": "probe", "val": "val"}
    rows = {names[k]: load_rows(files[k]) for k in splits}
    main = evaluate_model(
        model_dir,
        rows,
        eval_config(budget.eval_n, seed),
        base_dir=base_dir if full else None,
        kl_split="id",
        reward_fn=reward,
    )
    res = {}
    for split in rows:
        res[split] = main[split]["pass@1"]
        res[f"{split}_greedy"] = main[split]["greedy_pass@1"]
        res[f"{split}_per_prompt"] = main[split]["per_prompt"]  # for the report's paired bootstrap
    if full:
        k = budget.passk_n
        wide = evaluate_model(
            model_dir, {"id": rows["id"][: budget.passk_prompts]}, eval_config(k, seed, greedy=False), reward_fn=reward
        )["id"]
        res[f"pass@{k}"] = wide.get(f"pass@{k}", wide["pass@1"])
        res["passk_curve"] = {key: v for key, v in wide.items() if key.startswith("pass@")}
        res["distinct"] = wide["distinct_correct"]
        if base_dir is not None:
            res["kl"] = main["kl_to_base"]
            res["kl_base"] = main["kl_base_model"]
    return res


def curve_accuracy(model_dir, files, budget: Budget, seed: int, split: str = "test") -> float:
    from gft_train.data import load_rows
    from gft_train.demo.sums import reward
    from gft_train.evaluate import evaluate_model

    res = evaluate_model(
        model_dir, {split: load_rows(files[split])}, eval_config(budget.curve_n, seed, greedy=False), reward_fn=reward
    )
    return res[split]["pass@1"]


def run_dir_for(out: Path, spec: Spec, seed: int, lr: float, grid: bool) -> Path:
    slug = (
        spec.name.replace(" ", "_")
        .replace("/", "")
        .replace(",", "")
        .replace("'", "")
        .replace("(", "_")
        .replace(")", "")
        .replace(":", "-")
    )
    return out / ("grid" if grid else "runs") / f"{slug}_lr{lr:g}_seed{seed}"


class Flattened(Exception):
    """A run's validation curve stopped rising: it ends at this step (its snapshot is its final model)."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


def still_rising(val: dict, step: int, rise: float) -> bool:
    """Whether the validation score at ``step`` is above every earlier snapshot's by more than
    ``rise`` (the first snapshot always is)."""
    earlier = [v for s, v in val.items() if s < step]
    return not earlier or val[step] > max(earlier) + rise


class CurveTrainer(SnapshotTrainer):
    """Snapshots at ``points``, each scored on the validation split (``val``: step -> pass@1); with
    ``stop_from``, the run ends at the first point from that step on where the score is not above
    every earlier point's by more than ``rise``."""

    def __init__(self, cfg, points, score, stop_from: int | None, rise: float):
        super().__init__(cfg, points)
        self.score, self.stop_from, self.rise, self.val = score, stop_from, rise, {}

    def train_step(self, groups) -> dict:
        metrics = super().train_step(groups)
        done = self.step + 1
        if done in self.points and done < self.cfg.max_steps and self.acc.is_main_process:
            self.val[done] = self.score(self.out / "at" / f"step-{done}")
            if self.stop_from is not None and done >= self.stop_from and not still_rising(self.val, done, self.rise):
                raise Flattened(done)
        return metrics


def train_curve(cfg, points, score, stop_from, rise) -> tuple[Path, int, dict]:
    """(final model, steps trained, validation score per snapshot step)."""
    trainer = CurveTrainer(cfg, points, score, stop_from, rise)
    try:
        return trainer.train(), cfg.max_steps, trainer.val
    except Flattened as end:
        final = trainer.out / "final"
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(trainer.out / "at" / f"step-{end.step}", final)
        return final, end.step, trainer.val


def data_seen(cfg: Config, spec: Spec, setup: dict, steps: int) -> dict:
    """The sequences a run trained on and the distinct prompts among them, from its resolved
    config (the method's preset: its group size)."""
    resolved = cfg.resolved()
    presented = steps * resolved.prompts_per_step
    prompts_in_file = setup.get("filtered_prompts", 0) if spec.data == "filtered" else setup["train_rows"]
    # each prompt once per pass over the data: all of them once a pass is complete
    return dict(sequences=presented * resolved.group_size, distinct_prompts=min(presented, prompts_in_file))


def run_one(
    spec: Spec,
    seed: int,
    lr: float,
    out: Path,
    budget: Budget,
    setup: dict,
    grid: bool = False,
    steps: int | None = None,
    start: str | None = None,
    adaptive: bool = False,
) -> dict:
    """One fine-tuning run from the base, or from ``start`` (another run's final model), then its
    evaluation. A grid run: ``budget.steps`` steps, validation pass@1 at the end. Otherwise
    ``steps`` steps (``adaptive``: from ``budget.steps`` on, until the validation curve stops
    rising, at most ``budget.max_steps``), validation and held-out pass@1 at each snapshot, and
    ``evaluate`` at the end and at the best validation step (KL always to the base)."""
    from gft_train.demo.recipe import snapshot_dirs

    files = setup["files"]
    steps = budget.max_steps if adaptive else (steps or budget.steps)
    run_dir = run_dir_for(out, spec, seed, lr, grid)
    shutil.rmtree(run_dir, ignore_errors=True)  # a run cut off earlier starts over
    cfg = Config(
        model=start or setup["base"],
        output_dir=str(run_dir),
        seed=seed,
        overwrite_output_dir=True,
        train_file=files[spec.data],
        max_new_tokens=MAX_NEW_TOKENS,
        max_length=MAX_LENGTH,
        micro_batch_size=SEQS_PER_STEP,
        lr=lr,
        lr_scheduler="constant",
        max_steps=steps,
        temperature=1.0,
        engine="transformers",
        rollout_batch_size=512,
        reward=REWARD,
        **spec.overrides,
    )
    began = time.time()
    points = () if grid else sorted(p for p in budget.curve_points if p < steps)

    def score(model_dir):
        return curve_accuracy(model_dir, files, budget, seed, split="val")

    final, steps, val = train_curve(cfg, points, score, budget.steps if adaptive else None, budget.rise)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    grads = [m["grad_norm"] for m in metrics]
    row = dict(
        name=spec.name,
        family=spec.family,
        x=spec.x,
        seed=seed,
        lr=lr,
        steps=steps,
        rectified=st.mean(m["dcr/rectified_frac"] for m in metrics),
        grad_cv=st.pstdev(grads) / max(st.mean(grads), 1e-12),
        **data_seen(cfg, spec, setup, steps),
    )
    selfs = [m["reward/self_mean"] for m in metrics if "reward/self_mean" in m]
    if selfs:
        tail = max(1, len(selfs) // 10)
        row["self_reward_first"], row["self_reward_last"] = st.mean(selfs[:tail]), st.mean(selfs[-tail:])
    if grid:
        row["val"] = score(final)
    else:
        val[steps] = score(final)
        snaps = snapshot_dirs(run_dir, steps)
        row["val_curve"] = {str(k): v for k, v in sorted(val.items())}
        row["curve"] = {str(k): curve_accuracy(d, files, budget, seed) for k, d in snaps.items() if k < steps}
        row.update(evaluate(final, setup["base"], files, budget, seed))
        row["curve"][str(steps)] = row["id"]
        best = max(sorted(val), key=lambda k: val[k])  # (ties: the earliest)
        row["best_step"] = best
        at_best = row if best == steps else evaluate(snaps[best], None, files, budget, seed, full=False)
        row["at_best"] = {k: at_best[k] for k in at_best if k.split("_")[0] in ("id", "ood", "probe")}
        shutil.rmtree(run_dir / "at", ignore_errors=True)  # snapshots served their purpose
    row["seconds"] = round(time.time() - began, 1)
    return row


# ---- jobs, side by side -------------------------------------------------------------------
def _job(job):
    kind, kw = job
    _threads_one()
    if kind == "setup":
        return make_setup(**kw)
    if kind == "run":
        return run_one(**kw)
    raise ValueError(kind)


def _imap(pool, jobs):
    if pool is None:
        return (_job(j) for j in jobs)
    return pool.imap(_job, jobs, chunksize=1)


def _run_all(pool, jobs) -> int:
    """Runs ``jobs`` (each with its regime's folder as ``out``), appending each row to its regime's
    results as it finishes."""
    n = 0
    for (_, kw), row in zip(jobs, _imap(pool, jobs)):
        n += 1
        append_jsonl(kw["out"] / "results.jsonl", row)
        print(
            f"[study] {kw['out'].name}: {row['name']} seed {row['seed']} lr {row['lr']:g}, {row['steps']} steps: "
            f"id {row['id']:.3f} ood {row['ood']:.3f} probe {row['probe']:.3f} kl(base||model) {row['kl_base']:.3f} "
            f"({row['seconds']} s)",
            flush=True,
        )
    return n


def _final_of(name: str, seed: int, out: Path, lrs: dict) -> Path:
    """The final model of configuration ``name`` (a main method or an RL stage) at this seed."""
    spec = next(s for s in (*main_specs(), *RL_SPECS) if s.name == name)
    return run_dir_for(out, spec, seed, rate_for(spec.name, spec.family, lrs), grid=False) / "final"


def run_grid(pool, regimes: dict[str, Path], own: list[Spec], budget: Budget, setups: dict, start: dict) -> int:
    """The learning-rate grids (seed 0, validation pass@1), one per regime, side by side:
    ``start[regime]`` gives each method's first rates; a method whose best rate is at an edge of
    what it tried goes one rung further, round by round. Returns the number of runs made."""
    ran = 0

    def missing(name, rates):
        done = {(r["name"], r["lr"]) for r in read_jsonl(regimes[name] / "grid.jsonl")}
        return [
            ("run", dict(spec=s, seed=0, lr=lr, out=regimes[name], budget=budget, setup=setups[name], grid=True))
            for s in own
            for lr in rates[s.name]
            if (s.name, lr) not in done
        ]

    jobs = [j for name in regimes for j in missing(name, start[name])]
    while True:
        for (_, kw), row in zip(jobs, _imap(pool, jobs)):
            ran += 1
            append_jsonl(kw["out"] / "grid.jsonl", row)
            print(
                f"[study] {kw['out'].name}: grid {row['name']} lr {row['lr']:g}: val {row['val']:.3f} "
                f"({row['seconds']} s)",
                flush=True,
            )
        # a best rate at the edge of what was tried: one rung further (rounds, all methods at
        # once); also where a resumed study finds the starting grid done
        jobs = []
        for name, folder in regimes.items():
            beyond = grid_extensions(read_jsonl(folder / "grid.jsonl"), [s.name for s in own])
            jobs += missing(name, {s.name: [beyond[s.name]] if s.name in beyond else [] for s in own})
        if not jobs:
            return ran


def _lrs(folder: Path, own: list[Spec]) -> dict:
    return choose_lrs(read_jsonl(folder / "grid.jsonl"), [s.name for s in own])


def _steps_of(folder: Path, name: str) -> int | None:
    """The length seed 0 of configuration ``name`` trained to (where it has run)."""
    return next(
        (r["steps"] for r in read_jsonl(folder / "results.jsonl") if r["name"] == name and r["seed"] == 0), None
    )


def run_configurations(pool, regimes: dict, chosen: dict, lrs: dict, budget: Budget, setups: dict) -> int:
    """The main methods and ablations of every regime: seed 0 first, each as long as its
    validation curve rises; then the other seeds as long as seed 0 was, and the sweeps (at GFT's
    rate and length). Longest first, so the two workers finish together."""

    def job(name, s, seed, **kw):
        lr = rate_for(s.name, s.family, lrs[name])
        done = {(r["name"], r["seed"], r["lr"]) for r in read_jsonl(regimes[name] / "results.jsonl")}
        if (s.name, seed, lr) in done:
            return []
        return [("run", dict(spec=s, seed=seed, lr=lr, out=regimes[name], budget=budget, setup=setups[name], **kw))]

    def main_family(s):
        return s.family in ("methods", "ablation")

    first = [j for name in regimes for s in chosen[name] if main_family(s) for j in job(name, s, 0, adaptive=True)]
    ran = _run_all(pool, first)
    later = []
    for name, folder in regimes.items():
        for s in chosen[name]:
            length = _steps_of(folder, s.name if main_family(s) else "GFT")
            seeds = range(1, budget.seeds) if main_family(s) else range(budget.sweep_seeds)
            later += [j for seed in seeds for j in job(name, s, seed, steps=length)]
    later.sort(key=lambda j: -(j[1]["steps"] or 0))
    return ran + _run_all(pool, later)


def run_rl_stages(pool, folder: Path, lrs: dict, budget: Budget, setup: dict) -> int:
    """RL compatibility, in its stages: each starts from the previous stage's model, same seed."""
    ran = 0
    for family in ("staged", "rl"):
        done = {(r["name"], r["seed"], r["lr"]) for r in read_jsonl(folder / "results.jsonl")}
        jobs = [
            (
                "run",
                dict(
                    spec=s,
                    seed=seed,
                    lr=rate_for(s.name, s.family, lrs),
                    out=folder,
                    budget=budget,
                    setup=setup,
                    steps=budget.rl_steps,
                    start=str(_final_of(s.x, seed, folder, lrs)),
                ),
            )
            for seed in range(budget.seeds)
            for s in RL_SPECS
            if s.family == family and (s.name, seed, rate_for(s.name, s.family, lrs)) not in done
        ]
        ran += _run_all(pool, jobs)
    return ran


def _record_wall_time(out: Path, started: float, ran: int, workers: int) -> None:
    # a resumed study adds its time to the earlier ones'; a rerun that ran nothing leaves it
    timing = out / "wall_seconds.json"
    if ran or not timing.exists():
        prior = json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
        timing.write_text(json.dumps({"seconds": round(prior + time.time() - started, 1), "workers": workers}))


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m study", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three methods, two seeds, one rate, a few steps (CI)")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--docs", default="docs")
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="runs side by side, one thread each; 1: in this process (default: 2, --quick 1)",
    )
    ap.add_argument(
        "--regimes",
        default=",".join(r.name for r in REGIMES),
        help=f"the regimes to run, comma-separated (default: all; {DEFAULT_REGIME} first)",
    )
    args = ap.parse_args(argv)
    budget = QUICK if args.quick else FULL
    try:
        names = [regime(n).name for n in args.regimes.split(",")]
    except ValueError as e:
        ap.error(f"--regimes: {e}")
    if DEFAULT_REGIME not in names:
        ap.error(f"--regimes: the default regime {DEFAULT_REGIME!r} must be among them (it sets the rates)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    regimes = {name: out / name for name in names}
    for folder in regimes.values():
        folder.mkdir(exist_ok=True)
    _threads_one()
    pool = None
    workers = args.workers or (1 if args.quick else 2)
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, maxtasksperchild=1)
    started = time.time()
    try:
        setups = dict(
            zip(
                regimes, _imap(pool, [("setup", dict(out=f, budget=budget, reg=regime(n))) for n, f in regimes.items()])
            )
        )
        chosen = {n: specs(args.quick, default_regime=n == DEFAULT_REGIME) for n in regimes}
        own = [s for s in chosen[DEFAULT_REGIME] if s.own_lr]
        ran = run_grid(
            pool,
            {DEFAULT_REGIME: regimes[DEFAULT_REGIME]},
            own,
            budget,
            setups,
            {DEFAULT_REGIME: {s.name: budget.lrs for s in own}},
        )
        lrs = {DEFAULT_REGIME: _lrs(regimes[DEFAULT_REGIME], own)}
        others = {n: f for n, f in regimes.items() if n != DEFAULT_REGIME}
        # (a grid of one rate, as --quick's, stays one rate)
        around = rates_around if len(budget.lrs) > 1 else (lambda lr: (lr,))
        start = {n: {s.name: around(lrs[DEFAULT_REGIME][s.name]) for s in own} for n in others}
        ran += run_grid(pool, others, own, budget, setups, start)
        lrs.update({n: _lrs(f, own) for n, f in others.items()})
        ran += run_configurations(pool, regimes, chosen, lrs, budget, setups)
        if {"SFT", "GFT", "GRPO"} <= set(lrs[DEFAULT_REGIME]):
            ran += run_rl_stages(pool, regimes[DEFAULT_REGIME], lrs[DEFAULT_REGIME], budget, setups[DEFAULT_REGIME])
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    _record_wall_time(out, started, ran, workers)
    return report.write_report(out, Path(args.docs), budget, names, quick=args.quick)
