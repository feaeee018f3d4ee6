"""The embedded demo, end to end on a CPU, with the study's recipe at a smaller size
(``gft_train.demo.recipe``): data -> base model (pre-training) -> expert and teacher models ->
SFT and GFT from the same base at equal compute -> base, SFT and GFT side by side."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from . import recipe
from .model import build_model
from .sums import make_data

SEQS_PER_STEP = 64


@dataclass(frozen=True)
class DemoSize:
    base_steps: int = 1500       # pre-training steps that make the base model (the study: 3000)
    expert_steps: int = 300
    teacher_steps: int = 200
    steps: int = 200             # SFT and GFT fine-tuning steps, 64 sequences each (the study: 400)
    sft_lr: float = 1e-3         # each method's rate as the study's grid chose it
    gft_lr: float = 1e-5
    eval_n: int = 8
    sizes: tuple = (("train", 800), ("test", 200), ("ood", 200), ("probe", 200))


FULL = DemoSize()
QUICK = DemoSize(base_steps=20, expert_steps=4, teacher_steps=4, steps=3, eval_n=2,
                 sizes=(("pretrain_sums", 32), ("pretrain_hard_sums", 16), ("pretrain_reversal", 32),
                        ("expert_train", 32), ("teacher_train", 32), ("train", 32), ("test", 12), ("ood", 12),
                        ("probe", 12)))


def fine_tune_config(method: str, base: Path, train_file: Path, out: Path, size: DemoSize) -> Config:
    """SFT: 64 prompts x 1 demonstration a step; GFT: 8 prompts x (1 expert + 3 teacher + 4
    self-samples, refreshed every step). Equal sequences per step and equal steps."""
    groups = dict(prompts_per_step=SEQS_PER_STEP) if method == "sft" else dict(prompts_per_step=SEQS_PER_STEP // 8)
    return Config(method=method, model=str(base), output_dir=str(out), train_file=str(train_file),
                  max_steps=size.steps, lr=size.sft_lr if method == "sft" else size.gft_lr, lr_scheduler="constant",
                  micro_batch_size=SEQS_PER_STEP, max_new_tokens=recipe.MAX_NEW_TOKENS, max_length=recipe.MAX_LENGTH,
                  temperature=1.0, engine="auto", vllm_memory=0.3, reward=recipe.REWARD, seed=0, **groups)


def eval_config(size: DemoSize) -> Config:
    """The demo's evaluation settings (``gft_train.evaluate.evaluate_model`` reads them)."""
    return Config(max_new_tokens=recipe.MAX_NEW_TOKENS, max_length=recipe.MAX_LENGTH, engine="auto",
                  vllm_memory=0.3, eval_n=size.eval_n, eval_k=[size.eval_n], seed=1, reward=recipe.REWARD,
                  rollout_batch_size=256)


SPLITS = {"in-distribution": "test", "harder (OOD)": "ood", "probe (reversal)": "probe"}


def run_demo(out: Path = Path("runs/demo"), quick: bool = False) -> dict:
    from ..evaluate import evaluate_model
    from ..trainer import train

    size = QUICK if quick else FULL
    start = time.time()
    out = Path(out)
    data = make_data(seed=0, sizes=dict(size.sizes))
    files = {name: recipe.write_rows(rows, out / "data" / f"{name}.jsonl") for name, rows in data.items()}
    build_model(out / "init", **recipe.BASE_SHAPE)
    print(f"[demo] pre-training ({size.base_steps} steps: single additions, digit reversal, a few three-number "
          "sums) makes the base model", flush=True)
    base = recipe.sft(out / "init", files["pretrain"], out / "base", size.base_steps, 3e-3)
    print(f"[demo] expert ({size.expert_steps} steps, largest addend first) and teacher ({size.teacher_steps} "
          "steps, any order) models, then their answers on the fine-tuning prompts", flush=True)
    expert = recipe.sft(base, files["expert_train"], out / "expert", size.expert_steps, 1e-3)
    teacher = recipe.sft(base, files["teacher_train"], out / "teacher", size.teacher_steps, 1e-3)
    rows, _ = recipe.build_finetune_rows(expert, teacher, data["train"])
    train_file = recipe.write_rows(rows, out / "data" / "finetune.jsonl")
    print(f"[demo] SFT and GFT from the base: {size.steps} steps of {SEQS_PER_STEP} sequences each "
          f"(SFT: {SEQS_PER_STEP} prompts x 1 demonstration; GFT: {SEQS_PER_STEP // 8} prompts x (1 expert + "
          "3 teacher + 4 self-samples))", flush=True)
    models = {"base": base}
    for method in ("sft", "gft"):
        models[method.upper()] = train(fine_tune_config(method, base, train_file, out / method, size))
    ecfg = eval_config(size)
    evals = {label: files[name] for label, name in SPLITS.items()}
    results = {name: evaluate_model(m, evals, ecfg, base_dir=None if name == "base" else base,
                                    kl_split="in-distribution") for name, m in models.items()}
    k = size.eval_n
    names = list(models)
    lines = [f"pass@1: mean over {k} samples at temperature {ecfg.eval_temperature}; greedy: one greedy completion "
             f"per prompt; pass@{k}: any of the {k} right",
             f"{'held-out split':<18}" + "".join(f"{f'{n} pass@1':>12}" for n in names)
             + "".join(f"{f'{n} greedy':>12}" for n in names) + "".join(f"{f'{n} pass@{k}':>12}" for n in names)]
    for label in SPLITS:
        lines.append(f"{label:<18}" + "".join(f"{results[n][label]['pass@1']:>12.3f}" for n in names)
                     + "".join(f"{results[n][label]['greedy_pass@1']:>12.3f}" for n in names)
                     + "".join(f"{results[n][label].get(f'pass@{k}', 0):>12.3f}" for n in names))
    for n in names[1:]:
        lines.append(f"KL(base || {n}) per response token on the base model's own samples: "
                     f"{results[n]['kl_base_model']:.4f}")
    table = "\n".join(lines)
    print(table)
    result = {"results": results, "seconds": round(time.time() - start, 1), "size": size.__dict__}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.txt").write_text(table + "\n")
    print(f"[demo] done in {result['seconds']} s; training plots: {out / 'gft' / 'training.png'}, "
          f"{out / 'sft' / 'training.png'}; results: {out / 'results.json'}")
    return result
