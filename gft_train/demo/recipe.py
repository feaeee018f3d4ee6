"""The recipe the study and the demo share: the data, the base model (pre-trained to
convergence), the teacher model, and the fine-tuning rows (demonstrations and teacher samples).

Recipe (fixed; the study's and the demo's budgets only scale step counts and split sizes):

1. Data (``gft_train.demo.sums.make_data``, seed 0): disjoint prompt sets for pre-training, the
   teacher's training, fine-tuning, validation and test.
2. Base: a tiny Qwen2-style model (``BASE_SHAPE``), SFT on the pre-training mix (single additions
   carried correctly, digit reversal, three-number sums whose last step drops its carry), cosine
   schedule, until held-out accuracy flattens (the study records the curve). It scores about half
   of the three-number sums: the ones whose last step does not carry.
3. Expert: the task's own solver, writing each fine-tuning row's demonstration in the
   ``reversed`` style (last addend first, carried correctly; always right; an order the base
   never writes). Teacher: a real model, the base trained ``TEACHER_STEPS`` more steps on
   correct scratchpads in two orders; 7 samples of it at temperature 1 are each row's teacher
   responses, errors included, so it sits between the base and the expert.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..trainer import Trainer

REWARD = "gft_train.demo.sums:reward"
BASE_SHAPE = dict(hidden_size=64, layers=2)
MAX_NEW_TOKENS, MAX_LENGTH = 16, 32
N_TEACHERS = 7
TEACHER_STEPS, TEACHER_LR = 800, 1e-3


def write_rows(rows, path: Path) -> Path:
    from .task import write_jsonl

    return write_jsonl(rows, path)


def sft(model: Path, train_file: Path, out: Path, steps: int, lr: float, seed: int = 0, snapshots=()) -> Path:
    """Plain SFT of ``model`` on ``train_file`` (64 rows a step, cosine schedule); returns final/.
    A finished one is reused (the study resumes; the demo clears its folder first)."""
    final = out / "final"
    if final.exists():
        return final
    cfg = Config(
        method="sft",
        model=str(model),
        output_dir=str(out),
        train_file=str(train_file),
        max_steps=steps,
        lr=lr,
        lr_scheduler="cosine",
        warmup_steps=min(50, steps // 10),
        prompts_per_step=64,
        micro_batch_size=64,
        max_length=MAX_LENGTH,
        max_new_tokens=MAX_NEW_TOKENS,
        reward=REWARD,
        seed=seed,
        overwrite_output_dir=True,
    )
    return train_with_snapshots(cfg, snapshots)


def sample(model_dir: Path, prompts: list[str], n: int, temperature: float, seed: int = 0) -> list[list[str]]:
    from ..models import load_model
    from ..rollout import TransformersEngine

    model, tok = load_model(str(model_dir))
    engine = TransformersEngine(model, tok, max_new_tokens=MAX_NEW_TOKENS, temperature=temperature, batch_size=512)
    return engine.generate(prompts, n, seed=seed)


def build_finetune_rows(teacher: Path, rows: list[dict], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(fine-tuning rows, filtered-teacher rows): each row keeps its demonstration (the solver's)
    and gets ``N_TEACHERS`` teacher samples at temperature 1; the filtered set keeps every correct
    teacher response as its own demonstration (SFT on filtered teacher data)."""
    from .sums import reward

    teach = sample(teacher, [r["prompt"] for r in rows], N_TEACHERS, 1.0, seed + 1)
    out, filtered = [], []
    for r, ts in zip(rows, teach):
        out.append(dict(r, teachers=ts))
        ok = reward([r["prompt"]] * len(ts), ts, [r["answer"]] * len(ts))
        filtered += [dict(prompt=r["prompt"], answer=r["answer"], expert=t, teachers=[]) for t, g in zip(ts, ok) if g]
    return out, filtered


def make_teacher(base: Path, teacher_train: Path, out: Path, steps: int = TEACHER_STEPS) -> Path:
    return sft(base, teacher_train, out, steps, TEACHER_LR)


def style_share(model_dir: Path, rows: list[dict], style: str) -> float:
    """The share of greedy answers written in ``style``, among prompts where that style differs
    from the prompt's own order (how often the model 'speaks' that style)."""
    from .sums import write

    nums = [tuple(int(x) for x in r["prompt"][:-1].split("+")) for r in rows]
    keep = [i for i, n in enumerate(nums) if write(n, style) != write(n, "left_to_right")]
    outs = sample(model_dir, [rows[i]["prompt"] for i in keep], 1, 0.0)
    return sum(o[0] == write(nums[i], style) for i, o in zip(keep, outs)) / max(len(keep), 1)


# Snapshots: training with the model saved at chosen steps, so accuracy can be measured along the
# way (a learning curve) without touching the trainer. A snapshot is written after the optimizer
# step it is named after, as OUTPUT_DIR/at/step-N (a saved transformers model).
class SnapshotTrainer(Trainer):
    def __init__(self, cfg, points=()):
        super().__init__(cfg)
        self.points = set(points)

    def train_step(self, groups) -> dict:
        metrics = super().train_step(groups)
        done = self.step + 1  # the loop counts the step after train_step returns
        if done in self.points and done < self.cfg.max_steps and self.acc.is_main_process:
            path = self.out / "at" / f"step-{done}"
            self.model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
        return metrics


def train_with_snapshots(cfg, points=()) -> Path:
    return SnapshotTrainer(cfg, points).train()


def snapshot_dirs(output_dir: Path, max_steps: int) -> dict[int, Path]:
    """step -> model directory, the final model included."""
    out = {int(p.name.split("-")[1]): p for p in (Path(output_dir) / "at").glob("step-*")}
    out[max_steps] = Path(output_dir) / "final"
    return dict(sorted(out.items()))
