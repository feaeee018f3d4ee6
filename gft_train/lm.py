"""Prompts and responses to batches for the trainer.

The model-to-loss path lives in the library, ``gft_kernels.models``: ``causal_lm_gft_loss`` is
re-exported here (and as ``gft_train.causal_lm_gft_loss``) for existing callers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gft_kernels.models import causal_lm_gft_loss  # noqa: F401  (re-exported)
from gft_kernels.options import IGNORE_INDEX


def format_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The prompt as the model sees it: its chat template when it has one, else the raw text.
    Chat messages (a list) need the template."""
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"chat-message prompts need a tokenizer with a chat template; {tokenizer.name_or_path!r} has none"
            )
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids as the trainer scores them and the rollout engines continue them."""
    return prompts_ids(tokenizer, [prompt])[0]


def prompts_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """``prompt_ids`` of each prompt, in one tokenizer call (a call per text is a visible share of
    a small model's training step)."""
    if not prompts:
        return []
    return tokenizer([format_prompt(tokenizer, p) for p in prompts], add_special_tokens=False)["input_ids"]


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


def responses_ids(tokenizer, responses: list[str | list[int]]) -> list[list[int]]:
    """Each response's training ids: sampled ids (a list) exactly as the engine sampled them (an
    EOS only if it sampled one; a truncated sample ends without); a text (expert, teacher)
    tokenized and ended with EOS. The texts go through the tokenizer in one call."""
    texts = [r for r in responses if isinstance(r, str)]
    text_ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    return [next(text_ids) + [tokenizer.eos_token_id] if isinstance(r, str) else [int(t) for t in r] for r in responses]


def encode(tokenizer, items: list[tuple[str, str | list[int], float]], max_length: int) -> Batch:
    """(prompt, response, advantage) triples -> a right-padded batch; prompt tokens are masked.
    A response is a text (tokenized, EOS appended) or the token ids a rollout engine sampled
    (trained as they are: ``responses_ids``)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    all_p_ids = prompts_ids(tokenizer, [prompt for prompt, _, _ in items])
    all_r_ids = responses_ids(tokenizer, [response for _, response, _ in items])
    rows, labels, cut = [], [], 0
    for p_ids, r_ids in zip(all_p_ids, all_r_ids):
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
