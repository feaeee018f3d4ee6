"""The study's data: addition (the fine-tuning task, with 7 teacher responses per prompt so every
group ratio can be built) and subtraction (a skill the base model learns in its warm-up that the
fine-tuning data never trains: the forgetting probe)."""
from __future__ import annotations

import random

from gft_train.demo.task import make_rows

EASY_MAX = 30


def subtraction_rows(pairs) -> list[dict]:
    return [dict(prompt=f"{a}-{b}=", answer=str(a - b), expert=str(a - b), teachers=[]) for a, b in pairs]


def make_data(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    easy = [(a, b) for a in range(EASY_MAX) for b in range(EASY_MAX)]
    rng.shuffle(easy)
    hard = [(a, b) for a in range(EASY_MAX, 2 * EASY_MAX) for b in range(EASY_MAX, 2 * EASY_MAX)]
    rng.shuffle(hard)
    sub = [(a, b) for a in range(EASY_MAX) for b in range(a + 1)]
    rng.shuffle(sub)
    add_train = make_rows(easy[:800], rng, n_teachers=7)
    sub_train = subtraction_rows(sub[:300])
    warmup = add_train + sub_train
    rng.shuffle(warmup)
    return {
        "warmup": warmup,                        # the base model's SFT: addition and subtraction
        "train": add_train,                      # fine-tuning: addition only
        "eval_id": make_rows(easy[800:900], rng),
        "eval_ood": make_rows(hard[:100], rng),
        "eval_sub": subtraction_rows(sub[300:400]),
    }
