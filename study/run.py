"""The reproduction study: the paper's section 4 claims, in a fair miniature.

    python -m study [--quick] [--out runs/study] [--docs docs] [--workers 2]

Set-up (``gft_train/demo/recipe.py``, built once and cached under ``OUT/setup``): a task with
several solution paths (the sum of three numbers as a scratchpad of partial sums, any order), a
base model pre-trained to convergence on a corpus whose sums drop the carry in their last step
(so it scores about half and has something to learn), the task's solver as the expert (one
canonical order the base never writes, always right) and a real teacher model (the base trained
longer on correct scratchpads; diverse paths, real errors, sampled offline). The report checks
that SFT can gain before it reads any verdict (``MIN_SFT_GAIN``).

Then, at equal sequences per optimizer step (64: SFT and DFT see 64 prompts x 1 demonstration,
GRPO and GFT 8 prompts x 8 responses) and equal steps:

1. learning-rate grid: each main method (SFT, SFT on filtered teacher data, DFT, GRPO, GFT) at
   every rate of ``Budget.lrs``, seed 0, scored on the validation split; a method whose best rate
   is the lowest or highest it tried goes on one rung of ``LR_LADDER`` beyond it, until its best
   is inside what it tried (or the ladder ends); each keeps its best;
2. the main methods at their own rate and the ablations (GFT without DCR / without GAL) at
   GFT's, ``Budget.seeds`` seeds each, with held-out accuracy at several steps (the curves);
3. ``Budget.long_methods`` once more at ``long_steps`` (one seed): whether the curves had flattened
   (none this round);
4. the tau and group-ratio sweeps at GFT's rate;
5. RL compatibility: GFT from each SFT run, then GRPO from the SFT run and from the SFT-then-GFT
   run, at equal GRPO steps (``RL_SPECS``).

Each run is one process with one thread; ``--workers`` runs side by side. Measured by
``gft_train.evaluate.evaluate_model``: mean pass@1 over n samples at temperature 0.5 and greedy
on held-out in-distribution, harder (OOD) and probe (digit reversal, never fine-tuned: forgetting)
prompts, pass@k and distinct correct scratchpads (diversity), KL to the base both ways.
Results append to ``OUT/grid.jsonl`` and ``OUT/results.jsonl`` (a rerun skips finished runs);
``docs/reproduction.md`` and its plots are regenerated from them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics as st
import time
from dataclasses import replace
from pathlib import Path

from gft_train.config import Config
from gft_train.demo.recipe import BASE_SHAPE, MAX_LENGTH, MAX_NEW_TOKENS, REWARD

from . import report
from .plan import (
    FULL,
    QUICK,
    RL_SPECS,
    SEQS_PER_STEP,
    Budget,
    Spec,
    append_jsonl,
    choose_lrs,
    grid_extensions,
    long_name,
    main_specs,
    rate_for,
    read_jsonl,
    specs,
)


def _threads_one():
    # several runs side by side on a small CPU: one thread each (more oversubscribes the cores)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


# ---- the set-up ---------------------------------------------------------------------------
def make_setup(out: Path, budget: Budget, pool=None) -> dict:
    """Builds (or reads back) data, base, teacher and the fine-tuning rows, and measures them."""
    from gft_train.demo.model import build_model
    from gft_train.demo.recipe import build_finetune_rows, make_teacher, sft, snapshot_dirs, style_share, write_rows
    from gft_train.demo.sums import EXPERT_STYLE, make_data, reward

    path = out / "setup.json"
    if path.exists():
        return json.loads(path.read_text())
    started = time.time()
    s = out / "setup"
    data = make_data(seed=0, sizes=dict(budget.data_sizes))
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
        files=files,
        base=str(base),
        teacher=str(teacher),
        expert_train_acc=st.mean(reward([], [r["expert"] for r in rows], [r["answer"] for r in rows])),
        teacher_train_acc=st.mean(x for ok in teacher_ok for x in ok),
        teacher_distinct=st.mean(len(set(r["teachers"])) for r in rows),
        filtered_rows=len(filtered),
        train_rows=len(rows),
    )
    evals = _map(
        pool,
        [
            (
                "evaluate",
                dict(
                    model_dir=m,
                    base_dir=None,
                    files=files,
                    budget=budget,
                    seed=0,
                    full=False,
                    splits=("test", "ood", "probe", "val"),
                ),
            )
            for m in (base, teacher)
        ],
    )
    info["accuracy"] = dict(zip(("base", "teacher"), evals))
    info["accuracy"]["expert"] = solver_accuracy(files)
    # the base along its pre-training: the target task (validation) and a pre-training skill (the
    # held-out reversal probe), greedy; flat at the end = converged
    info["base_curve"] = {}
    for step, d in snapshot_dirs(s / "base", budget.base_steps).items():
        acc = _map(
            None,
            [
                (
                    "evaluate",
                    dict(
                        model_dir=d,
                        base_dir=None,
                        files=files,
                        budget=budget,
                        seed=0,
                        full=False,
                        splits=("val", "probe"),
                    ),
                )
            ],
        )[0]
        info["base_curve"][step] = dict(val=acc["val_greedy"], probe=acc["probe_greedy"])
    info["base_val"] = curve_accuracy(base, files, budget, 0, split="val")  # the grid's measure, before fine-tuning
    info["expert_style_in_base"] = style_share(base, data["val"], EXPERT_STYLE)
    info["seconds"] = round(time.time() - started, 1)
    path.write_text(json.dumps(info, indent=1))
    return info


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
        .replace("(", "_")
        .replace(")", "")
        .replace(":", "-")
    )
    return out / ("grid" if grid else "runs") / f"{slug}_lr{lr:g}_seed{seed}"


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
) -> dict:
    """One fine-tuning run from the base, or from ``start`` (another run's final model), for
    ``steps`` (``budget.steps`` unless given), then its evaluation: validation pass@1 for a grid
    run; otherwise the curve and ``evaluate`` (KL always to the base)."""
    from gft_train.demo.recipe import snapshot_dirs, train_with_snapshots

    files = setup["files"]
    steps = steps or budget.steps
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
    start = time.time()
    # a longer run: the same points, then every half of budget.steps
    later = range(budget.steps, steps, max(1, budget.steps // 2))
    points = () if grid else sorted(p for p in {*budget.curve_points, *later} if p < steps)
    final = train_with_snapshots(cfg, points)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    grads = [m["grad_norm"] for m in metrics]
    row = dict(
        name=spec.name,
        family=spec.family,
        x=spec.x,
        seed=seed,
        lr=lr,
        rectified=st.mean(m["dcr/rectified_frac"] for m in metrics),
        grad_cv=st.pstdev(grads) / max(st.mean(grads), 1e-12),
        sequences=cfg.max_steps * SEQS_PER_STEP,
    )
    selfs = [m["reward/self_mean"] for m in metrics if "reward/self_mean" in m]
    if selfs:
        tail = max(1, len(selfs) // 10)
        row["self_reward_first"], row["self_reward_last"] = st.mean(selfs[:tail]), st.mean(selfs[-tail:])
    if grid:
        row["val"] = curve_accuracy(final, files, budget, seed, split="val")
    else:
        row["curve"] = {
            str(step): curve_accuracy(d, files, budget, seed)
            for step, d in snapshot_dirs(run_dir, steps).items()
            if step < steps
        }
        row.update(evaluate(final, setup["base"], files, budget, seed))
        row["curve"][str(steps)] = row["id"]
        shutil.rmtree(run_dir / "at", ignore_errors=True)  # snapshots served their purpose
    row["seconds"] = round(time.time() - start, 1)
    return row


# ---- jobs, side by side -------------------------------------------------------------------
def _job(job):
    kind, kw = job
    _threads_one()
    from gft_train.demo.recipe import sft

    if kind == "sft":
        return sft(**kw)
    if kind == "evaluate":
        return evaluate(**kw)
    if kind == "run":
        return run_one(**kw)
    raise ValueError(kind)


def _map(pool, jobs):
    return pool.map(_job, jobs, chunksize=1) if pool is not None else [_job(j) for j in jobs]


def _imap(pool, jobs):
    if pool is None:
        return (_job(j) for j in jobs)
    return pool.imap(_job, jobs, chunksize=1)


def _run_all(pool, jobs, results_path: Path) -> int:
    n = 0
    for row in _imap(pool, jobs):
        n += 1
        append_jsonl(results_path, row)
        print(
            f"[study] {row['name']} seed {row['seed']} lr {row['lr']:g}: id {row['id']:.3f} ood {row['ood']:.3f} "
            f"probe {row['probe']:.3f} kl(base||model) {row['kl_base']:.3f} ({row['seconds']} s)",
            flush=True,
        )
    return n


def _final_of(name: str, seed: int, out: Path, lrs: dict) -> Path:
    """The final model of configuration ``name`` (a main method or an RL stage) at this seed."""
    spec = next(s for s in (*main_specs(), *RL_SPECS) if s.name == name)
    return run_dir_for(out, spec, seed, rate_for(spec.name, spec.family, lrs), grid=False) / "final"


def run_grid(pool, own: list[Spec], out: Path, budget: Budget, setup: dict) -> int:
    """The learning-rate grid (seed 0, validation pass@1), extended one rung at a time for every
    method whose best rate is at an edge of what it tried. Returns the number of runs made."""
    grid_path = out / "grid.jsonl"
    done = {(r["name"], r["lr"]) for r in read_jsonl(grid_path)}
    jobs = [
        ("run", dict(spec=s, seed=0, lr=lr, out=out, budget=budget, setup=setup, grid=True))
        for s in own
        for lr in budget.lrs
        if (s.name, lr) not in done
    ]
    ran = 0
    while True:
        for row in _imap(pool, jobs):
            ran += 1
            append_jsonl(grid_path, row)
            print(f"[study] grid {row['name']} lr {row['lr']:g}: val {row['val']:.3f} ({row['seconds']} s)", flush=True)
        # a best rate at the edge of the grid: one rung further (rounds, all methods at once);
        # also where a resumed study finds the starting grid done
        beyond = grid_extensions(read_jsonl(grid_path), [s.name for s in own])
        jobs = [
            ("run", dict(spec=s, seed=0, lr=beyond[s.name], out=out, budget=budget, setup=setup, grid=True))
            for s in own
            if s.name in beyond
        ]
        if not jobs:
            return ran


def run_configurations(pool, chosen: list[Spec], lrs: dict, out: Path, budget: Budget, setup: dict) -> int:
    """The main methods and ablations first, then the longer runs and the sweeps, each seed by seed
    (a study cut short then has every configuration at the same number of seeds)."""
    results_path = out / "results.jsonl"
    # a finished run counts only at the rate it would get now (a grid that moved reruns it)
    done = {(r["name"], r["seed"], r["lr"]) for r in read_jsonl(results_path)}
    main = [(s, seed) for seed in range(budget.seeds) for s in chosen if s.family in ("methods", "ablation")]
    longer = [
        (replace(s, name=long_name(s.name, budget), family="long", own_lr=False), 0)
        for s in chosen
        if s.name in budget.long_methods
    ]
    sweeps = [
        (s, seed) for seed in range(budget.sweep_seeds) for s in chosen if s.family not in ("methods", "ablation")
    ]
    jobs = [
        (
            "run",
            dict(
                spec=s,
                seed=seed,
                lr=rate_for(s.name, s.family, lrs),
                out=out,
                budget=budget,
                setup=setup,
                steps=budget.long_steps if s.family == "long" else None,
            ),
        )
        for s, seed in main + longer + sweeps
        if (s.name, seed, rate_for(s.name, s.family, lrs)) not in done
    ]
    return _run_all(pool, jobs, results_path)


def run_rl_stages(pool, lrs: dict, out: Path, budget: Budget, setup: dict) -> int:
    """RL compatibility, in its stages: each starts from the previous stage's model, same seed."""
    results_path = out / "results.jsonl"
    ran = 0
    for family in ("staged", "rl"):
        done = {(r["name"], r["seed"], r["lr"]) for r in read_jsonl(results_path)}
        jobs = [
            (
                "run",
                dict(
                    spec=s,
                    seed=seed,
                    lr=rate_for(s.name, s.family, lrs),
                    out=out,
                    budget=budget,
                    setup=setup,
                    steps=budget.rl_steps,
                    start=str(_final_of(s.x, seed, out, lrs)),
                ),
            )
            for seed in range(budget.seeds)
            for s in RL_SPECS
            if s.family == family and (s.name, seed, rate_for(s.name, s.family, lrs)) not in done
        ]
        ran += _run_all(pool, jobs, results_path)
    return ran


def _record_wall_time(out: Path, started: float, ran: int, workers: int) -> None:
    # a resumed study adds its time to the earlier ones'; a rerun that ran nothing leaves it
    timing = out / "wall_seconds.json"
    if ran or not timing.exists():
        prior = json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
        timing.write_text(json.dumps({"seconds": round(prior + time.time() - started, 1), "workers": workers}))


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m study", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two methods, one seed, one rate, a few steps (CI)")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--docs", default="docs")
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="runs side by side, one thread each; 1: in this process (default: 2, --quick 1)",
    )
    args = ap.parse_args(argv)
    budget = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _threads_one()
    pool = None
    workers = args.workers or (1 if args.quick else 2)
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, maxtasksperchild=1)
    started = time.time()
    try:
        setup = make_setup(out, budget, pool)
        chosen = specs(args.quick)
        own = [s for s in chosen if s.own_lr]
        ran = run_grid(pool, own, out, budget, setup)
        lrs = choose_lrs(read_jsonl(out / "grid.jsonl"), [s.name for s in own])
        ran += run_configurations(pool, chosen, lrs, out, budget, setup)
        if {"SFT", "GFT", "GRPO"} <= set(lrs):
            ran += run_rl_stages(pool, lrs, out, budget, setup)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    _record_wall_time(out, started, ran, workers)
    return report.write_report(out, Path(args.docs), budget, quick=args.quick)
