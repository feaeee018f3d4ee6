"""The reproduction study: every method and sweep of the paper's section 4, in miniature.

    python -m study [--quick] [--seeds 3] [--out runs/study] [--docs docs]

One base model (a tiny Qwen2-style model after an SFT warm-up on addition *and* subtraction), then
each configuration fine-tunes it on addition for the same number of optimizer steps and the same
number of sequences per step (128: SFT sees 128 prompts x 1 expert answer per step, GFT 16
prompts x 8 responses, the paper's "a tenth of the prompts"), with the same learning rate, for
several seeds. Measured per run (by ``gft_train.evaluate.evaluate_model``, the function the CLI and
the demo use): held-out in-distribution and harder (OOD) mean pass@1 over 8 samples at
temperature 0.5 and greedy pass@1, pass@k up to 32 and distinct correct answers (diversity),
subtraction accuracy (a skill the fine-tuning data does not train: forgetting), KL to the base
model both ways, the DCR-rectified fraction, and the gradient-norm volatility.
Results append to ``OUT/results.jsonl`` (a rerun skips finished runs); ``docs/reproduction.md``
and its plots are regenerated from them, with a verdict per claim from fixed rules.
"""
from __future__ import annotations

import argparse
import json
import statistics as st
import time
from dataclasses import dataclass, field
from pathlib import Path

from gft_train.config import Config

from .tasks import make_data


@dataclass(frozen=True)
class Spec:
    name: str
    family: str                      # methods | tau | ratio
    overrides: dict = field(default_factory=dict)
    x: float | str | None = None     # the swept value (tau, or "demo:sample")


SEQS_PER_STEP = 128
ONLINE = dict(prompts_per_step=16)   # self-sample groups are online, refreshed every step (the default)


def specs(quick: bool) -> list[Spec]:
    methods = [
        Spec("SFT", "methods", dict(method="sft", prompts_per_step=128)),
        Spec("SFT(mix)", "methods", dict(method="sft", n_teacher=3, prompts_per_step=32)),
        Spec("DFT", "methods", dict(method="dft", prompts_per_step=128)),
        Spec("GRPO", "methods", dict(method="grpo", **ONLINE)),
        Spec("GFT", "methods", dict(method="gft", **ONLINE), x=0.7),
        Spec("GFT w/o DCR", "methods", dict(method="gft", dcr=False, **ONLINE), x=0.0),
        # the paper's ablation without GAL: the expert demonstrations alone, A = 1, with DCR
        Spec("GFT w/o GAL", "methods", dict(method="gft", gal=False, prompts_per_step=SEQS_PER_STEP)),
    ]
    if quick:
        return [methods[0], methods[4]]
    taus = [Spec(f"GFT tau={t}", "tau", dict(method="gft", tau=t, **ONLINE), x=t) for t in (0.1, 0.3, 0.5, 0.9, 1.5)]
    ratios = [Spec(f"GFT {d}:{8 - d}", "ratio", dict(method="gft", n_expert=min(d, 1), n_teacher=max(d - 1, 0),
                                                      n_self=8 - d, **ONLINE), x=f"{d}:{8 - d}")
              for d in (8, 6, 2, 0)]
    return methods + taus + ratios


@dataclass(frozen=True)
class Budget:
    warmup_steps: int = 250
    steps: int = 60
    eval_n: int = 8
    passk_n: int = 32
    passk_prompts: int = 40


FULL, QUICK = Budget(), Budget(warmup_steps=15, steps=2, eval_n=2, passk_n=4, passk_prompts=4)


def _common(out: Path, budget: Budget) -> dict:
    return dict(train_file=str(out / "data" / "train.jsonl"), max_new_tokens=4, max_length=16,
                micro_batch_size=SEQS_PER_STEP, lr=1e-4, lr_scheduler="constant", max_steps=budget.steps,
                temperature=1.0, engine="auto")


def make_base(out: Path, budget: Budget) -> Path:
    from gft_train.demo.model import build_model
    from gft_train.demo.task import write_jsonl
    from gft_train.trainer import train

    final = out / "base" / "final"
    if final.exists():
        return final
    for name, rows in make_data().items():
        write_jsonl(rows, out / "data" / f"{name}.jsonl")
    build_model(out / "init")
    return train(Config(method="sft", model=str(out / "init"), output_dir=str(out / "base"),
                        train_file=str(out / "data" / "warmup.jsonl"), max_steps=budget.warmup_steps, lr=2e-3,
                        lr_scheduler="cosine", warmup_steps=min(20, budget.warmup_steps // 2),
                        prompts_per_step=128, micro_batch_size=128, max_length=16, max_new_tokens=4))


def eval_config(n: int, seed: int, greedy: bool = True) -> Config:
    """The study's evaluation settings (``gft_train.evaluate.evaluate_model`` reads them): the
    paper's temperature (0.5, the default), n samples per prompt, greedy pass@1 beside."""
    return Config(max_new_tokens=4, max_length=16, engine="transformers", rollout_batch_size=256, eval_n=n,
                  eval_k=[], eval_greedy=greedy, seed=seed)


def evaluate(model_dir: Path, base_dir: Path, out: Path, budget: Budget, seed: int) -> dict:
    from gft_train.data import load_rows
    from gft_train.evaluate import evaluate_model
    from gft_train.rewards import load_reward

    reward = load_reward("math")
    rows = {k: load_rows(out / "data" / f"eval_{k}.jsonl") for k in ("id", "ood", "sub")}
    main = evaluate_model(model_dir, rows, eval_config(budget.eval_n, seed), base_dir=base_dir, kl_split="id",
                          reward_fn=reward)
    k = budget.passk_n
    wide = evaluate_model(model_dir, {"id": rows["id"][: budget.passk_prompts]}, eval_config(k, seed, greedy=False),
                          reward_fn=reward)["id"]
    reward.close()
    res = {}
    for split in rows:
        res[split] = main[split]["pass@1"]
        res[f"{split}_greedy"] = main[split]["greedy_pass@1"]
    res[f"pass@{k}"] = wide.get(f"pass@{k}", wide["pass@1"])
    res["passk_curve"] = {key: v for key, v in wide.items() if key.startswith("pass@")}
    res["distinct"] = wide["distinct_correct"]
    if base_dir is not None:
        res["kl"] = main["kl_to_base"]
        res["kl_base"] = main["kl_base_model"]
    return res


def run_one(spec: Spec, seed: int, out: Path, base: Path, budget: Budget) -> dict:
    from gft_train.trainer import train

    run_dir = out / "runs" / f"{spec.name.replace(' ', '_').replace('/', '')}_seed{seed}"
    cfg = Config(model=str(base), output_dir=str(run_dir), seed=seed, **{**_common(out, budget), **spec.overrides})
    start = time.time()
    final = train(cfg)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    grads = [m["grad_norm"] for m in metrics]
    row = dict(name=spec.name, family=spec.family, x=spec.x, seed=seed,
               rectified=st.mean(m["dcr/rectified_frac"] for m in metrics),
               grad_cv=st.pstdev(grads) / max(st.mean(grads), 1e-12),
               sequences=cfg.max_steps * SEQS_PER_STEP,
               **evaluate(final, base, out, budget, seed), seconds=round(time.time() - start, 1))
    return row


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m study", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two configurations, one seed, a few steps (CI)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--docs", default="docs")
    args = ap.parse_args(argv)
    budget = QUICK if args.quick else FULL
    seeds = range(1 if args.quick else args.seeds)
    out = Path(args.out)
    base = make_base(out, budget)
    results_path = out / "results.jsonl"
    done = set()
    if results_path.exists():
        done = {(r["name"], r["seed"]) for r in map(json.loads, results_path.read_text().splitlines())}
    base_row_path = out / "base_eval.json"
    if not base_row_path.exists():
        base_row_path.write_text(json.dumps(evaluate(base, None, out, budget, 0)))
    for spec in specs(args.quick):
        for seed in seeds:
            if (spec.name, seed) in done:
                continue
            row = run_one(spec, seed, out, base, budget)
            with results_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[study] {spec.name} seed {seed}: id {row['id']:.3f} ood {row['ood']:.3f} sub {row['sub']:.3f} "
                  f"kl {row['kl']:.3f} kl(base||model) {row['kl_base']:.3f} ({row['seconds']} s)", flush=True)
    from .report import write_report

    return write_report(out, Path(args.docs), budget, quick=args.quick)
