"""A task with several solution paths: the sum of three numbers, written as a scratchpad of
partial sums whose addends may be combined in any order.

    prompt  "3+17+8="
    answer  "28"
    paths   "3+17=20+8=28", "17+8=25+3=28", "8+3=11+17=28", ... (6 orders)

The reward reads only the final number (after the last "="), so every order is right. Three
writing styles, one per kind of model:

- ``left_to_right``: the addends in the prompt's order (the base model's pre-training style);
- ``descending``: largest first (the expert's canonical style; the base writes it only when the
  prompt is already in that order, so its tokens start at low probability under the base);
- ``shuffled``: a random order per response (the teacher's style: diverse paths).

Other pre-training skills: single additions ``a+b=`` (the steps of the scratchpad) and digit
reversal ``(3817)=`` -> ``7183`` (the forgetting probe: fine-tuning never trains it).
"""
from __future__ import annotations

import random

ADDEND_MAX = 19          # in-distribution addends: 0..19 (answers 0..57)
OOD_MAX = 29             # harder: addends 0..29, at least one above 19 (answers up to 87)


def scratchpad(order) -> str:
    """The addends in this order, each partial sum written out: ``3+17=20+8=28``."""
    acc, text = order[0], str(order[0])
    for x in order[1:]:
        acc += x
        text += f"+{x}={acc}"
    return text


def write(numbers, style: str, rng: random.Random | None = None) -> str:
    if style == "left_to_right":
        return scratchpad(list(numbers))
    if style == "descending":
        return scratchpad(sorted(numbers, reverse=True))
    if style == "shuffled":
        order = list(numbers)
        rng.shuffle(order)
        return scratchpad(order)
    raise ValueError(f"unknown style {style!r}")


def sum_prompt(numbers) -> str:
    return "+".join(map(str, numbers)) + "="


def sum_row(numbers, style: str = "left_to_right", rng=None) -> dict:
    return dict(prompt=sum_prompt(numbers), answer=str(sum(numbers)), expert=write(numbers, style, rng), teachers=[])


def addition_row(a: int, b: int) -> dict:
    return dict(prompt=f"{a}+{b}=", answer=str(a + b), expert=str(a + b), teachers=[])


def reversal_row(digits: str) -> dict:
    return dict(prompt=f"({digits})=", answer=digits[::-1], expert=digits[::-1], teachers=[])


def final_answer(completion: str) -> str:
    """The last number of a completion: what follows its last '=' (or the whole text)."""
    return completion.strip().rsplit("=", 1)[-1].strip()


def reward(prompts, completions, answers) -> list[float]:
    """1.0 when the completion's final number is the reference answer (as written), else 0.0.
    Use as ``--reward gft_train.demo.sums:reward``."""
    return [1.0 if final_answer(c) == a else 0.0 for c, a in zip(completions, answers)]


def make_data(seed: int = 0, sizes: dict | None = None) -> dict[str, list[dict]]:
    """Every split, from one seed; no prompt appears in two of them.

    pretrain: all single additions a+b (a <= 59, b <= 29, both orders), digit reversals and a
    little of the target task in the base's style (500 in-distribution sums, 100 harder ones, so
    the base is not at zero on the harder split the fine-tuning data never shows);
    expert_train / teacher_train: the prompts the expert and teacher models learn their styles
    on; train: the fine-tuning prompts; val: to choose learning rates; test / ood / probe: held out."""
    s = dict(pretrain_sums=500, pretrain_hard_sums=100, expert_train=1500, teacher_train=1500, train=2000, val=200,
             test=300, ood=300, pretrain_reversal=3000, probe=300)
    s.update(sizes or {})
    rng = random.Random(seed)
    triples = [(a, b, c) for a in range(ADDEND_MAX + 1) for b in range(ADDEND_MAX + 1) for c in range(ADDEND_MAX + 1)]
    rng.shuffle(triples)
    hard = [(a, b, c) for a in range(OOD_MAX + 1) for b in range(OOD_MAX + 1) for c in range(OOD_MAX + 1)
            if max(a, b, c) > ADDEND_MAX]
    rng.shuffle(hard)
    pairs = {(a, b) for a in range(60) for b in range(30)} | {(b, a) for a in range(60) for b in range(30)}
    digits = set()
    while len(digits) < s["pretrain_reversal"] + s["probe"]:
        digits.add("".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5))))
    digits = sorted(digits)
    rng.shuffle(digits)

    out, start = {}, 0
    for name in ("pretrain_sums", "expert_train", "teacher_train", "train", "val", "test"):
        out[name] = triples[start:start + s[name]]
        start += s[name]
    pretrain = ([sum_row(t) for t in out.pop("pretrain_sums") + hard[s["ood"]:s["ood"] + s["pretrain_hard_sums"]]]
                + [addition_row(a, b) for a, b in sorted(pairs)]
                + [reversal_row(d) for d in digits[:s["pretrain_reversal"]]])
    rng.shuffle(pretrain)
    data = {"pretrain": pretrain}
    data["expert_train"] = [sum_row(t, "descending") for t in out["expert_train"]]
    data["teacher_train"] = [sum_row(t, "shuffled", rng) for t in out["teacher_train"]]
    for name in ("train", "val", "test"):
        data[name] = [sum_row(t) for t in out[name]]
    data["ood"] = [sum_row(t) for t in hard[:s["ood"]]]
    data["probe"] = [reversal_row(d) for d in digits[s["pretrain_reversal"]:][:s["probe"]]]
    return data
