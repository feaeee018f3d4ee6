"""The embedded demo, end to end on a CPU, with the study's recipe at a smaller size
(``gft_train.demo.recipe``): data -> base model (pre-training: it adds, but its three-number sums
drop the carry in the last step) -> teacher model -> SFT and GFT from the same base at equal
compute, two seeds each -> base, SFT and GFT side by side, with the seeds' spread.

Runs go two at a time, one thread each (the demo's numbers then do not depend on the core count).
Writes ``OUT/results.json`` (``results.<model>.<split>.pass@1``, the study's shape), ``OUT/results.txt``
(the printed table) and ``OUT/demo.png``."""

from __future__ import annotations

import json
import os
import shutil
import statistics as st
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from . import recipe
from .model import build_model
from .sums import REGIMES, make_data

SEQS_PER_STEP = 64
METHODS = ("sft", "gft")
# json key -> printed label; the study's split names
SPLITS = {"test": "in-distribution", "ood": "harder (OOD)", "probe": "probe (reversal)"}
# the folders a demo writes under OUT (a rerun clears them: the demo always starts afresh)
OWN = ("data", "init", "base", "teacher", "runs")


@dataclass(frozen=True)
class DemoSize:
    base_steps: int = 2000  # pre-training steps that make the base model (the study: 3000)
    teacher_steps: int = 800
    steps: int = 200  # SFT and GFT fine-tuning steps, 64 sequences each
    seeds: tuple = (0, 1)
    eval_n: int = 8
    workers: int = 2
    sizes: tuple = (("train", 2000), ("test", 300), ("ood", 300), ("probe", 300))


# (SFT, GFT) learning rates per regime (``sums.REGIMES``): the study's grid choices there
# (docs/reproduction.md, "Optimization" in each regime)
RATES = {"new-skill": (1e-3, 1e-4), "competent": (1e-3, 1e-5), "imperfect": (3e-4, 3e-4)}
STUDY_TABLE = "docs/reproduction.md"  # the study's verdicts by regime

FULL = DemoSize()
QUICK = DemoSize(
    base_steps=20,
    teacher_steps=4,
    steps=3,
    seeds=(0,),
    eval_n=2,
    workers=1,
    sizes=(
        ("pretrain_sums", 32),
        ("pretrain_hard_sums", 16),
        ("pretrain_reversal", 32),
        ("teacher_train", 32),
        ("train", 32),
        ("test", 12),
        ("ood", 12),
        ("probe", 12),
    ),
)


def fine_tune_config(
    method: str, base: Path, train_file: Path, out: Path, size: DemoSize, seed: int = 0, regime: str = "new-skill"
) -> Config:
    """SFT: 64 prompts x 1 demonstration a step; GFT: 8 prompts x (1 expert + 3 teacher + 4
    self-samples, refreshed every step). Equal sequences per step and equal steps."""
    groups = dict(prompts_per_step=SEQS_PER_STEP) if method == "sft" else dict(prompts_per_step=SEQS_PER_STEP // 8)
    return Config(
        method=method,
        model=str(base),
        output_dir=str(out),
        train_file=str(train_file),
        max_steps=size.steps,
        lr=RATES[regime][0] if method == "sft" else RATES[regime][1],
        lr_scheduler="constant",
        micro_batch_size=SEQS_PER_STEP,
        max_new_tokens=recipe.MAX_NEW_TOKENS,
        max_length=recipe.MAX_LENGTH,
        temperature=1.0,
        engine="auto",
        vllm_memory=0.3,
        reward=recipe.REWARD,
        seed=seed,
        overwrite_output_dir=True,
        **groups,
    )


def eval_config(size: DemoSize) -> Config:
    """The demo's evaluation settings (``gft_train.evaluate.evaluate_model`` reads them)."""
    return Config(
        max_new_tokens=recipe.MAX_NEW_TOKENS,
        max_length=recipe.MAX_LENGTH,
        engine="auto",
        vllm_memory=0.3,
        eval_n=size.eval_n,
        eval_k=[size.eval_n],
        seed=1,
        reward=recipe.REWARD,
        rollout_batch_size=256,
    )


def _one_thread():
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _job(job):
    """One fine-tuning run, then its evaluation (in a worker process, or in this one)."""
    cfg, evals, size, base = job
    _one_thread()
    from ..evaluate import evaluate_model
    from ..trainer import train

    model = train(cfg)
    return evaluate_model(model, evals, eval_config(size), base_dir=base, kl_split="test")


def _map(jobs, workers: int):
    if workers <= 1:
        return [_job(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
        return pool.map(_job, jobs, chunksize=1)


def summarize(per_seed: list[dict]) -> dict:
    """One model's results over seeds: each metric's mean, with ``_min``/``_max`` over the seeds
    beside it (a single seed: the value itself), and the per-seed results under ``seeds``."""
    first = per_seed[0]
    out = {}
    for split in SPLITS:
        out[split] = {}
        for key, v in first[split].items():
            if isinstance(v, (int, float)):
                vals = [r[split][key] for r in per_seed]
                out[split][key] = st.mean(vals)
                out[split][f"{key}_min"], out[split][f"{key}_max"] = min(vals), max(vals)
    for key in ("kl_base_model", "kl_to_base"):
        if key in first:
            out[key] = st.mean(r[key] for r in per_seed)
    out["seeds"] = [{k: v for k, v in r.items()} for r in per_seed]
    for r in out["seeds"]:
        for split in SPLITS:
            r[split] = {k: v for k, v in r[split].items() if k != "per_prompt"}
    return out


def table(results: dict, size: DemoSize, temperature: float) -> str:
    k, seeds = size.eval_n, len(size.seeds)
    names = list(results)
    spread = f"; SFT and GFT: mean of {seeds} seeds [min-max]" if seeds > 1 else ""
    lines = [
        f"pass@1: mean over {k} samples at temperature {temperature} of {{n}} held-out prompts; greedy: one "
        f"greedy completion; pass@{k}: any of the {k} right{spread}".format(n=size_of(size, "test")),
        f"{'held-out split':<18}"
        + "".join(f"{f'{n} pass@1':>20}" for n in names)
        + "".join(f"{f'{n} greedy':>13}" for n in names)
        + "".join(f"{f'{n} pass@{k}':>13}" for n in names),
    ]
    for split, label in SPLITS.items():
        cells = []
        for n in names:
            m = results[n][split]
            rng = f" [{m['pass@1_min']:.3f}-{m['pass@1_max']:.3f}]" if n != "base" and seeds > 1 else ""
            cells.append(f"{m['pass@1']:.3f}{rng}")
        lines.append(
            f"{label:<18}"
            + "".join(f"{c:>20}" for c in cells)
            + "".join(f"{results[n][split]['greedy_pass@1']:>13.3f}" for n in names)
            + "".join(f"{results[n][split].get(f'pass@{k}', 0):>13.3f}" for n in names)
        )
    for n in names[1:]:
        lines.append(
            f"KL(base || {n}) per response token on the base model's own samples: {results[n]['kl_base_model']:.4f}"
        )
    return "\n".join(lines)


def size_of(size: DemoSize, split: str) -> int:
    return dict(size.sizes).get(split, 0)


def plot(results: dict, size: DemoSize, png: Path) -> None:
    """Bars per held-out split (pass@1, the seeds' range as whiskers) and the pass@k curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw=dict(width_ratios=[1.6, 1]))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(SPLITS))]
        ms = [results[n][s]["pass@1"] for s in SPLITS]
        lo = [m - results[n][s]["pass@1_min"] for m, s in zip(ms, SPLITS)]
        hi = [results[n][s]["pass@1_max"] - m for m, s in zip(ms, SPLITS)]
        bars = axes[0].bar(xs, ms, width, yerr=[lo, hi], capsize=3, label=n)
        axes[0].bar_label(bars, fmt="%.2f", fontsize=7)
        ks = sorted(
            (int(key.split("@")[1]), v)
            for key, v in results[n]["test"].items()
            if key.startswith("pass@") and "_" not in key
        )
        axes[1].plot([x for x, _ in ks], [v for _, v in ks], marker="o", label=n)
    axes[0].set_xticks(range(len(SPLITS)), list(SPLITS.values()))
    axes[0].set_ylabel("pass@1 (temperature 0.5)")
    axes[0].set_ylim(0, 1.18)
    axes[0].set_title("what each method teaches (in-distribution, OOD) and keeps (probe)", fontsize=9)
    axes[0].legend(fontsize=8, ncol=3, loc="upper center")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("k")
    axes[1].set_ylabel("in-distribution pass@k")
    axes[1].set_title("pass@k: coverage with more samples", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def run_demo(out: Path = Path("runs/demo"), quick: bool = False, regime: str = "new-skill") -> dict:
    from ..evaluate import evaluate_model

    if regime not in REGIMES:
        raise ValueError(f"--regime: expected one of {', '.join(REGIMES)}, got {regime!r}")
    size = QUICK if quick else FULL
    start = time.time()
    out = Path(out)
    for name in OWN:
        shutil.rmtree(out / name, ignore_errors=True)
    _one_thread()
    style, summary = REGIMES[regime]
    print(
        f"[demo] regime {regime}: {summary}. The study's verdicts in each regime: {STUDY_TABLE}"
        + ("" if regime != "new-skill" else f" (other regimes: --regime {' or '.join(list(REGIMES)[1:])})"),
        flush=True,
    )
    data = make_data(seed=0, sizes=dict(size.sizes), corpus_style=style)
    files = {name: recipe.write_rows(rows, out / "data" / f"{name}.jsonl") for name, rows in data.items()}
    build_model(out / "init", **recipe.BASE_SHAPE)
    print(
        f"[demo] pre-training ({size.base_steps} steps: single additions, digit reversal, three-number sums "
        f"in the '{style}' style) makes the base model",
        flush=True,
    )
    base = recipe.sft(out / "init", files["pretrain"], out / "base", size.base_steps, 3e-3)
    print(
        f"[demo] teacher: the base trained {size.teacher_steps} steps more on correct scratchpads; 7 samples "
        "of it per fine-tuning prompt. Expert: the task's solver (last addend first, carried)",
        flush=True,
    )
    teacher = recipe.make_teacher(base, files["teacher_train"], out / "teacher", size.teacher_steps)
    rows, _ = recipe.build_finetune_rows(teacher, data["train"])
    train_file = recipe.write_rows(rows, out / "data" / "finetune.jsonl")
    print(
        f"[demo] SFT and GFT from the base, seeds {', '.join(map(str, size.seeds))}: {size.steps} steps of "
        f"{SEQS_PER_STEP} sequences each (SFT: {SEQS_PER_STEP} prompts x 1 demonstration; GFT: "
        f"{SEQS_PER_STEP // 8} prompts x (1 expert + 3 teacher + 4 self-samples)), {size.workers} at a time",
        flush=True,
    )
    evals = {split: files[split] for split in SPLITS}
    runs = [(m, s) for m in METHODS for s in size.seeds]
    jobs = [
        (fine_tune_config(m, base, train_file, out / "runs" / f"{m}-seed{s}", size, s, regime), evals, size, base)
        for m, s in runs
    ]
    per_run = _map(jobs, size.workers)
    results = {"base": summarize([evaluate_model(base, evals, eval_config(size))])}
    for m in METHODS:
        results[m.upper()] = summarize([r for (mm, _), r in zip(runs, per_run) if mm == m])
    text = table(results, size, eval_config(size).eval_temperature)
    print(text)
    result = {
        "results": results,
        "regime": regime,
        "rates": dict(zip(("sft", "gft"), RATES[regime])),
        "seconds": round(time.time() - start, 1),
        "size": size.__dict__,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.txt").write_text(text + "\n")
    plot(results, size, out / "demo.png")
    print(
        f"[demo] done in {result['seconds']} s; plot: {out / 'demo.png'}; training curves: "
        f"{out / 'runs' / 'gft-seed0' / 'training.png'}; results: {out / 'results.json'}"
    )
    return result
