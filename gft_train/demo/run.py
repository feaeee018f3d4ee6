"""The embedded demo, end to end on a CPU: task -> tiny model -> SFT warm-up (the base model)
-> GFT with self-samples from the rollout engine -> accuracy before and after, and a plot."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from .model import build_model
from .task import make_splits, write_jsonl


@dataclass(frozen=True)
class DemoSize:
    n_train: int = 800
    n_eval: int = 100
    warmup_steps: int = 250      # SFT steps that make the base model
    gft_steps: int = 100
    eval_n: int = 8


FULL = DemoSize()
QUICK = DemoSize(n_train=200, n_eval=12, warmup_steps=20, gft_steps=4, eval_n=2)


def configs(out: Path, size: DemoSize) -> tuple[Config, Config]:
    common = dict(train_file=str(out / "data" / "train.jsonl"), engine="auto", max_new_tokens=4,
                  max_length=16, micro_batch_size=128, seed=0, vllm_memory=0.3)
    sft = Config(method="sft", model=str(out / "init"), output_dir=str(out / "sft"), max_steps=size.warmup_steps,
                 lr=2e-3, lr_scheduler="cosine", warmup_steps=20, prompts_per_step=128, **common)
    gft = Config(method="gft", model=str(out / "sft" / "final"), output_dir=str(out / "gft"),
                 max_steps=size.gft_steps, lr=1e-4, lr_scheduler="constant", prompts_per_step=16,
                 temperature=1.0, **common)   # online groups, refreshed every step (the default)
    return sft, gft


def eval_config(size: DemoSize) -> Config:
    """The demo's evaluation settings (``gft_train.evaluate.evaluate_model`` reads them)."""
    return Config(max_new_tokens=4, max_length=16, engine="auto", vllm_memory=0.3, eval_n=size.eval_n,
                  eval_k=[size.eval_n], seed=1)


def run_demo(out: Path = Path("runs/demo"), quick: bool = False) -> dict:
    from ..evaluate import evaluate_model
    from ..trainer import train

    size = QUICK if quick else FULL
    start = time.time()
    out = Path(out)
    splits = make_splits(seed=0, n_train=size.n_train, n_eval=size.n_eval)
    paths = {name: write_jsonl(rows, out / "data" / f"{name}.jsonl") for name, rows in splits.items()}
    evals = {"in-distribution": paths["eval_id"], "harder (OOD)": paths["eval_ood"]}
    build_model(out / "init")
    sft_cfg, gft_cfg = configs(out, size)
    print(f"[demo] SFT warm-up ({size.warmup_steps} steps) makes the base model", flush=True)
    base = train(sft_cfg)
    ecfg = eval_config(size)
    before = evaluate_model(base, evals, ecfg)
    print(f"[demo] GFT ({size.gft_steps} steps; groups of 1 expert + 3 teacher + 4 self-samples, "
          f"refreshed every step)", flush=True)
    tuned = train(gft_cfg)
    after = evaluate_model(tuned, evals, ecfg, base_dir=base, kl_split="in-distribution")
    k = size.eval_n
    t = ecfg.eval_temperature
    lines = [f"pass@1: mean over {k} samples at temperature {t}; greedy: one greedy completion per prompt",
             f"{'held-out split':<18}{'base pass@1':>12}{'GFT pass@1':>12}{'base greedy':>12}{'GFT greedy':>12}"
             f"{f'base pass@{k}':>13}{f'GFT pass@{k}':>12}"]
    for split in evals:
        b, a = before[split], after[split]
        lines.append(f"{split:<18}{b['pass@1']:>12.3f}{a['pass@1']:>12.3f}{b['greedy_pass@1']:>12.3f}"
                     f"{a['greedy_pass@1']:>12.3f}{b.get(f'pass@{k}', 0):>13.3f}{a.get(f'pass@{k}', 0):>12.3f}")
    lines.append(f"KL(GFT || base) per response token on held-out expert answers: {after['kl_to_base']:.4f}")
    lines.append(f"KL(base || GFT) per response token on the base model's own samples: {after['kl_base_model']:.4f}")
    table = "\n".join(lines)
    print(table)
    result = {"before": before, "after": after, "seconds": round(time.time() - start, 1), "size": size.__dict__}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.txt").write_text(table + "\n")
    print(f"[demo] done in {result['seconds']} s; plot: {out / 'gft' / 'training.png'}; results: {out / 'results.json'}")
    return result
