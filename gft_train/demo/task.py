"""A synthetic, verifiable arithmetic task.

Training prompts are easy (two numbers below ``easy_max``); held-out prompts are
in-distribution (same range, unseen pairs) and harder (out-of-distribution: numbers from
``easy_max`` to twice that). The expert answers
exactly; "teacher distillations" are right 70% of the time and otherwise make the mistakes a
weaker model makes (off by one, off by ten), so groups carry real reward variance.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def problem(a: int, b: int) -> tuple[str, str]:
    return f"{a}+{b}=", str(a + b)


def _teacher(rng: random.Random, answer: int) -> str:
    if rng.random() < 0.7:
        return str(answer)
    return str(max(0, answer + rng.choice([-10, -1, 1, 10])))


def make_rows(pairs, rng: random.Random, n_teachers: int = 3) -> list[dict]:
    rows = []
    for a, b in pairs:
        prompt, answer = problem(a, b)
        rows.append(
            dict(
                prompt=prompt, answer=answer, expert=answer, teachers=[_teacher(rng, a + b) for _ in range(n_teachers)]
            )
        )
    return rows


def make_splits(seed: int = 0, n_train: int = 800, n_eval: int = 100, easy_max: int = 30) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    easy = [(a, b) for a in range(easy_max) for b in range(easy_max)]
    rng.shuffle(easy)
    hard = [(a, b) for a in range(easy_max, 2 * easy_max) for b in range(easy_max, 2 * easy_max)]
    rng.shuffle(hard)
    return {
        "train": make_rows(easy[:n_train], rng),
        "eval_id": make_rows(easy[n_train : n_train + n_eval], rng),
        "eval_ood": make_rows(hard[:n_eval], rng),
    }


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
