"""A task with several solution paths and a skill to learn: the sum of three numbers, written as
a scratchpad of partial sums whose addends may be combined in any order.

    prompt  "3+17+8="
    answer  "28"
    paths   "3+17=20+8=28", "8+17=25+3=28", "17+8=25+3=28", ... (6 orders)

The reward reads only the final number (after the last "="), so every order is right. The
models of the recipe (``gft_train.demo.recipe``) write it in these styles:

- ``no_carry``: the addends in the prompt's order, the last partial sum added digit by digit
  *without carrying* (``17+5=22+9=21``): the base model's pre-training corpus in the new-skill
  regime, a systematic misconception. It is right only where the last step does not carry (55%
  of the prompts), so the base has room to gain and something to unlearn;
- ``slip``: the prompt's order, the last step's carry dropped only when the last addend has two
  digits (``3+8=11+19=20``, but ``15+3=18+8=26``): the corpus of the imperfect regime, right on
  77.5% of the prompts (a rule a base can learn, not random noise);
- ``reversed``: the addends last to first, carried correctly (``8+17=25+3=28``): the expert's
  canonical style, written by the task's own solver (always right). The base never writes this
  order, so its tokens start at low probability under the base (what DCR rectifies);
- ``left_to_right``: carried correctly, in the prompt's order: the corpus of the competent regime
  (the base is right in its own order, the expert writes in another); the teacher model learns on
  half of its rows in this style and half ``reversed`` (two paths, and its own errors);
- ``descending`` and ``shuffled``: largest addend first / a random order per response.

Other pre-training skills: single additions ``a+b=`` (carried correctly: the base knows how to
add, and the scratchpad's steps are such additions) and digit reversal ``(3817)=`` -> ``7183``
(the forgetting probe: fine-tuning never trains it).
"""

from __future__ import annotations

import random

ADDEND_MAX = 19  # in-distribution addends: 0..19 (answers 0..57)
OOD_MAX = 29  # harder: addends 0..29, at least one above 19 (answers up to 87)
EXPERT_STYLE = "reversed"  # the demonstrations: the solver, last addend first, carried


def add_without_carry(a: int, b: int) -> int:
    """Digit-wise sum that drops every carry: 35 + 7 = 32, 17 + 8 = 15."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def scratchpad(order, carry_last: bool = True) -> str:
    """The addends in this order, each partial sum written out: ``3+17=20+8=28``; with
    ``carry_last=False`` the last step drops its carry (``17+5=22+9=21``)."""
    acc, text = order[0], str(order[0])
    for i, x in enumerate(order[1:], start=2):
        acc = acc + x if carry_last or i < len(order) else add_without_carry(acc, x)
        text += f"+{x}={acc}"
    return text


# The regimes of the study and the demo: what the base knows before fine-tuning, set by the style
# its pre-training corpus writes three-number sums in (``make_data``); name -> (style, summary).
REGIMES = {
    "new-skill": (
        "no_carry",
        "the base lacks a skill (its sums drop the last carry: right on about half), a perfect expert "
        "supplies it in an order the base never writes",
    ),
    "competent": (
        "left_to_right",
        "the paper's regime: a competent base (its sums are right, in the prompt's order), the expert "
        "correct in an order the base never writes",
    ),
    "imperfect": (
        "slip",
        "a competent but imperfect base (its sums drop the last carry when the last addend has two "
        "digits: right on about 3/4), so its own samples carry signal; the expert in a foreign order",
    ),
}
CORPUS_STYLES = tuple(style for style, _ in REGIMES.values())


def write(numbers, style: str, rng: random.Random | None = None) -> str:
    numbers = list(numbers)
    if style == "left_to_right":
        return scratchpad(numbers)
    if style == "no_carry":
        return scratchpad(numbers, carry_last=False)
    if style == "slip":
        return scratchpad(numbers, carry_last=numbers[-1] < 10)
    if style == "reversed":
        return scratchpad(numbers[::-1])
    if style == "descending":
        return scratchpad(sorted(numbers, reverse=True))
    if style == "shuffled":
        rng.shuffle(numbers)
        return scratchpad(numbers)
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


def make_data(seed: int = 0, sizes: dict | None = None, corpus_style: str = "no_carry") -> dict[str, list[dict]]:
    """Every split, from one seed; no prompt appears in two of them.

    pretrain: all single additions a+b (a <= 59, b <= 29, both orders, carried), digit reversals,
    and three-number sums in ``corpus_style`` (in-distribution, and a few harder ones so the
    base is not at zero on the harder split; the regimes differ only in this style); teacher_train: the prompts the teacher model
    learns on (half ``left_to_right``, half ``reversed``); train: the fine-tuning prompts, with
    the expert's demonstration (``reversed``); val: to choose learning rates; test / ood /
    probe: held out (their ``expert`` is the solver's answer, for KL measures)."""
    s = dict(
        pretrain_sums=1000,
        pretrain_hard_sums=100,
        teacher_train=1000,
        train=2000,
        val=200,
        test=300,
        ood=300,
        pretrain_reversal=3000,
        probe=300,
    )
    s.update(sizes or {})
    if corpus_style not in CORPUS_STYLES:
        raise ValueError(f"corpus_style: expected one of {CORPUS_STYLES}, got {corpus_style!r}")
    rng = random.Random(seed)
    triples = [(a, b, c) for a in range(ADDEND_MAX + 1) for b in range(ADDEND_MAX + 1) for c in range(ADDEND_MAX + 1)]
    rng.shuffle(triples)
    hard = [
        (a, b, c)
        for a in range(OOD_MAX + 1)
        for b in range(OOD_MAX + 1)
        for c in range(OOD_MAX + 1)
        if max(a, b, c) > ADDEND_MAX
    ]
    rng.shuffle(hard)
    pairs = {(a, b) for a in range(60) for b in range(30)} | {(b, a) for a in range(60) for b in range(30)}
    digits = set()
    while len(digits) < s["pretrain_reversal"] + s["probe"]:
        digits.add("".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5))))
    digits = sorted(digits)
    rng.shuffle(digits)

    out, start = {}, 0
    for name in ("pretrain_sums", "teacher_train", "train", "val", "test"):
        out[name] = triples[start : start + s[name]]
        start += s[name]
    corpus = out.pop("pretrain_sums") + hard[s["ood"] : s["ood"] + s["pretrain_hard_sums"]]
    pretrain = (
        [sum_row(t, corpus_style) for t in corpus]
        + [addition_row(a, b) for a, b in sorted(pairs)]
        + [reversal_row(d) for d in digits[: s["pretrain_reversal"]]]
    )
    rng.shuffle(pretrain)
    data = {"pretrain": pretrain}
    data["teacher_train"] = [
        sum_row(t, "reversed" if i % 2 else "left_to_right") for i, t in enumerate(out["teacher_train"])
    ]
    for name in ("train", "val", "test"):
        data[name] = [sum_row(t, EXPERT_STYLE) for t in out[name]]
    data["ood"] = [sum_row(t, EXPERT_STYLE) for t in hard[: s["ood"]]]
    data["probe"] = [reversal_row(d) for d in digits[s["pretrain_reversal"] :][: s["probe"]]]
    return data
