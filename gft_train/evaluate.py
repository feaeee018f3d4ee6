"""Held-out evaluation: accuracy through the rollout engine, and KL to the base model.

- mean pass@1 over n samples per prompt, and the unbiased pass@k estimator
  ``1 - C(n - c, k) / C(n, k)`` (c correct of n), averaged over prompts;
- KL(model || base) per response token on held-out expert responses, the paper's forgetting
  proxy (full-vocabulary KL on small evaluation batches).
"""
from __future__ import annotations

from math import comb

import torch

from .lm import encode


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def accuracy(engine, rows, reward_fn, n: int, ks=(1,), seed: int = 0) -> dict:
    completions = engine.generate([r.prompt for r in rows], n, seed=seed)
    flat = [(r.prompt, c, r.answer) for r, cs in zip(rows, completions) for c in cs]
    rewards = reward_fn([p for p, _, _ in flat], [c for _, c, _ in flat], [a for _, _, a in flat])
    correct = [sum(1 for x in rewards[i * n:(i + 1) * n] if x > 0.5) for i in range(len(rows))]
    out = {"pass@1": sum(c / n for c in correct) / len(rows)}
    for k in ks:
        if 1 < k <= n:
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(rows)
    return out


@torch.no_grad()
def kl_to_base(model, base, tokenizer, rows, max_length=1024, batch_size=16) -> float:
    """Mean over response tokens of KL(model || base) on the rows' expert responses."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = encode(tokenizer, [(r.prompt, r.expert, 1.0) for r in rows[i:i + batch_size]], max_length)
        batch = batch.to(next(model.parameters()).device)
        mask = batch.labels[:, 1:] != -100
        lp = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float().log_softmax(-1)
        lq = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float().log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        total += kl[mask].sum().item()
        count += int(mask.sum())
    return total / max(count, 1)
