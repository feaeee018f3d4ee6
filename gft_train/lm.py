"""Prompts and responses to batches for the trainer.

The model-to-loss path lives in the library, ``gft_kernels.models``: ``causal_lm_gft_loss`` is
re-exported here (and as ``gft_train.causal_lm_gft_loss``) for existing callers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gft_kernels.models import causal_lm_gft_loss  # noqa: F401  (re-exported)
from gft_kernels.options import IGNORE_INDEX

from .render import prompt_text, render, render_prompts


def format_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The prompt as the model sees it: its chat template when it has one, else the raw text.
    Chat messages (a list) need the template. (``render.prompt_text``.)"""
    return prompt_text(tokenizer, prompt)


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """The prompt's token ids as the trainer scores them and the rollout engines continue them."""
    return prompts_ids(tokenizer, [prompt])[0]


def prompts_ids(tokenizer, prompts: list) -> list[list[int]]:
    """``prompt_ids`` of each prompt (``render.render_prompts``: one tokenizer call for all)."""
    return render_prompts(tokenizer, prompts)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE_INDEX (-100) on prompt and padding tokens
    adv: torch.Tensor  # [B], the advantage of each sequence's response
    n_cut: int = 0  # responses cut at max_length: their reward saw more than is trained

    def to(self, device):
        return Batch(
            *(x.to(device) for x in (self.input_ids, self.attention_mask, self.labels, self.adv)), n_cut=self.n_cut
        )

    def masked(self) -> Batch:
        """The same sequences with every label ignored and no advantage: a forward that adds
        nothing to the loss or the gradients."""
        return Batch(
            self.input_ids, self.attention_mask, torch.full_like(self.labels, IGNORE_INDEX), torch.zeros_like(self.adv)
        )

    @property
    def n_valid(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def n_seqs(self) -> int:
        """Sequences with at least one token that counts."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).any(dim=1).sum())


def encode(tokenizer, items: list[tuple[str, str | list[int], float]], max_length: int) -> Batch:
    """(prompt, response, advantage) triples -> a right-padded batch; prompt tokens are masked.
    A response is a text (rendered as the model ends it at inference: the template's end-of-turn
    token, or eos) or the token ids a rollout engine sampled (trained as they are): ``render``."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    rows, labels, cut = [], [], 0
    for p_ids, r_ids in render(tokenizer, [(prompt, response) for prompt, response, _ in items]):
        cut += len(p_ids) + len(r_ids) > max_length
        ids = (p_ids + r_ids)[:max_length]
        lab = ([IGNORE_INDEX] * len(p_ids) + r_ids)[:max_length]
        rows.append(ids)
        labels.append(lab)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab_t = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels])
    adv = torch.tensor([a for _, _, a in items], dtype=torch.float32)
    return Batch(input_ids, mask, lab_t, adv, n_cut=cut)
