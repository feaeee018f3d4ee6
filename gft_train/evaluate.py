"""Held-out evaluation: the one function the CLI (``gft-train eval``), the demo and the study call.

``evaluate_model(model_dir, splits, cfg, base_dir=...)`` loads the model, samples through the
rollout engine and reports, per split (metrics as the paper defines them):

- ``pass@1``: mean pass@1 over ``cfg.eval_n`` samples per prompt at ``cfg.eval_temperature``
  (default 0.5, the paper's: "average Pass@1 across 16 decoding runs ... temperature of 0.5");
- ``greedy_pass@1``: one greedy completion per prompt (``cfg.eval_greedy``);
- ``pass@k`` for k in ``cfg.eval_k``, the powers of two and n itself, k <= n: the unbiased
  estimator ``1 - C(n - c, k) / C(n, k)`` (c correct of n), averaged over prompts (a pass@k curve);
- ``distinct_correct``: the number of distinct correct completions (solution paths, compared
  after collapsing whitespace) among the n samples, averaged over prompts (diversity);
- ``per_prompt``: each prompt's pass@1 (its share of correct samples), in the split's order:
  what paired comparisons between models resample (a bootstrap over prompts).

With a base model, also KL to the base both ways, per response token, full vocabulary:

- ``kl_to_base``: KL(model || base) on the held-out expert answers;
- ``kl_base_model``: KL(base || model) on the base model's own samples (temperature 1,
  ``cfg.eval_kl_samples`` per prompt), the direction and data the paper's forgetting analysis
  uses (after Shenfeld et al.: the drift measured where the base puts its mass).
"""

from __future__ import annotations

from math import comb
from pathlib import Path

import torch

from gft_kernels.options import IGNORE_INDEX

from .lm import encode


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_ks(n: int, ks=()) -> list[int]:
    """The k reported for n samples: the requested ones, the powers of two, and n, all <= n."""
    powers = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return sorted({k for k in (*ks, *powers, n) if 1 <= k <= n})


def _correct(rewards) -> list[bool]:
    return [r > 0.5 for r in rewards]


def accuracy(engine, rows, reward_fn, n: int, ks=(1,), seed: int = 0, temperature=None) -> dict:
    """pass@1 (mean over n samples), pass@k and distinct correct completions on ``rows``."""
    if not rows:
        raise ValueError("no held-out rows to evaluate on")
    completions = engine.generate([r.prompt for r in rows], n, seed=seed, temperature=temperature)
    flat = [(r.prompt, c, r.answer) for r, cs in zip(rows, completions) for c in cs]
    ok = _correct(reward_fn([p for p, _, _ in flat], [c for _, c, _ in flat], [a for _, _, a in flat]))
    correct, distinct = [], []
    for i, cs in enumerate(completions):
        marks = ok[i * n : (i + 1) * n]
        correct.append(sum(marks))
        distinct.append(len({" ".join(c.split()) for c, m in zip(cs, marks) if m}))
    out = {"pass@1": sum(c / n for c in correct) / len(rows)}
    for k in pass_ks(n, ks):
        if k > 1:
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(rows)
    out["distinct_correct"] = sum(distinct) / len(rows)
    out["per_prompt"] = [c / n for c in correct]
    return out


def split_accuracy(engine, rows, reward_fn, cfg) -> dict:
    """``accuracy`` with the evaluation settings of ``cfg`` (eval_n, eval_k, eval_temperature, seed),
    and greedy pass@1 when ``cfg.eval_greedy``: what gft-train eval and --eval-every report."""
    res = accuracy(engine, rows, reward_fn, cfg.eval_n, cfg.eval_k, seed=cfg.seed, temperature=cfg.eval_temperature)
    if cfg.eval_greedy:
        res["greedy_pass@1"] = accuracy(engine, rows, reward_fn, 1, seed=cfg.seed, temperature=0.0)["pass@1"]
    return res


@torch.no_grad()
def mean_token_kl(p_model, q_model, tokenizer, items, max_length=1024, batch_size=16) -> float:
    """Mean over response tokens of KL(p || q) over the full vocabulary, on (prompt, response)
    pairs (a response: a text, or sampled token ids as ``lm.encode`` takes them)."""
    total, count = 0.0, 0
    device = next(p_model.parameters()).device
    for i in range(0, len(items), batch_size):
        batch = encode(tokenizer, [(p, r, 1.0) for p, r in items[i : i + batch_size]], max_length).to(device)
        mask = batch.labels[:, 1:] != IGNORE_INDEX
        lp = (
            p_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            .logits[:, :-1]
            .float()
            .log_softmax(-1)
        )
        lq = (
            q_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            .logits[:, :-1]
            .float()
            .log_softmax(-1)
        )
        kl = (lp.exp() * (lp - lq)).sum(-1)
        total += kl[mask].sum().item()
        count += int(mask.sum())
    return total / max(count, 1)


def kl_to_base(model, base, tokenizer, rows, max_length=1024, batch_size=16) -> float:
    """Mean over response tokens of KL(model || base) on the rows' expert responses."""
    return mean_token_kl(model, base, tokenizer, [(r.prompt, r.expert) for r in rows], max_length, batch_size)


def kl_base_to_model(model, base, tokenizer, rows, n=1, max_new_tokens=256, seed=0, max_length=1024) -> float:
    """Mean over response tokens of KL(base || model) on the base model's own samples
    (temperature 1, n per prompt), trained-on ids exactly as sampled."""
    from .rollout import TransformersEngine

    engine = TransformersEngine(base, tokenizer, max_new_tokens=max_new_tokens, temperature=1.0)
    samples = engine.sample([r.prompt for r in rows], n, seed=seed)
    items = [(r.prompt, s.token_ids) for r, ss in zip(rows, samples) for s in ss if s.token_ids]
    return mean_token_kl(base, model, tokenizer, items, max_length)


def _rows(split, columns="", data_split="test", config=""):
    from .data import load_rows

    return load_rows(split, columns, data_split, config) if isinstance(split, (str, Path)) else list(split)


def evaluate_model(model_dir, splits: dict, cfg, *, base_dir=None, kl_split: str | None = None, reward_fn=None) -> dict:
    """Evaluate the saved model ``model_dir`` on ``splits`` (name -> data file or rows) with the
    evaluation settings of ``cfg`` (a ``Config``: eval_n, eval_k, eval_temperature, eval_greedy,
    eval_max_prompts, eval_kl_samples, max_new_tokens, engine, reward, seed). Returns
    ``{split: {metric: value}}``, plus ``kl_to_base`` and ``kl_base_model`` (on ``kl_split``,
    default the first split) when ``base_dir`` is given."""
    from .models import load_model, model_options
    from .rewards import load_reward
    from .rollout import make_engine

    reward = reward_fn or load_reward(cfg.reward)  # (before the model: a reward that cannot load stops here)
    model, tokenizer = load_model(str(model_dir), **model_options(cfg))
    engine = make_engine(
        cfg.engine,
        model=model,
        tokenizer=tokenizer,
        model_path=str(model_dir),
        cfg=cfg,
        temperature=cfg.eval_temperature,
    )
    if cfg.revision:  # vLLM loads the id's default revision itself: it samples the weights loaded here
        engine.load_weights(model)
    rows_by = {}
    out = {}
    try:
        for name, split in splits.items():
            rows = _rows(split, cfg.columns, cfg.eval_split, cfg.dataset_config)
            if cfg.eval_max_prompts:
                rows = rows[: cfg.eval_max_prompts]
            rows_by[name] = rows
            out[name] = split_accuracy(engine, rows, reward, cfg)
        if base_dir is not None:
            base, _ = load_model(str(base_dir), **model_options(cfg, teacher=True))
            base.to(model.device)
            rows = rows_by[kl_split or next(iter(rows_by))]
            out["kl_to_base"] = kl_to_base(model, base, tokenizer, rows, cfg.max_length)
            out["kl_base_model"] = kl_base_to_model(
                model, base, tokenizer, rows, cfg.eval_kl_samples, cfg.max_new_tokens, cfg.seed, cfg.max_length
            )
    finally:
        if reward_fn is None and hasattr(reward, "close"):
            reward.close()
    return out
