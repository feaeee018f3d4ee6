"""From a transformers causal LM and a batch to the GFT loss, with no [tokens x vocab] logits.

``causal_lm_gft_loss`` is public: users of other trainers can call it with any
``AutoModelForCausalLM`` and a batch of (input_ids, attention_mask, labels, per-sequence
advantages).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import gft_kernels


def format_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it: its chat template when it has one, else the raw text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor          # [B, T], -100 on prompt and padding tokens
    adv: torch.Tensor             # [B], the advantage of each sequence's response

    def to(self, device):
        return Batch(*(x.to(device) for x in (self.input_ids, self.attention_mask, self.labels, self.adv)))

    @property
    def n_valid(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())


def encode(tokenizer, items: list[tuple[str, str, float]], max_length: int) -> Batch:
    """(prompt, response, advantage) triples -> a right-padded batch; prompt tokens are masked."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    rows, labels = [], []
    for prompt, response, _ in items:
        p_ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p_ids + r_ids)[:max_length]
        lab = ([-100] * len(p_ids) + r_ids)[:max_length]
        rows.append(ids)
        labels.append(lab)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab_t = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    adv = torch.tensor([a for _, _, a in items], dtype=torch.float32)
    return Batch(input_ids, mask, lab_t, adv)


def _full_weight(module):
    """The lm_head weight as one tensor the loss can read in forward and backward."""
    weight = module.weight
    if hasattr(weight, "ds_id"):
        raise NotImplementedError(
            "DeepSpeed ZeRO-3 partitions the lm_head weight; gathering it across the fused loss's "
            "backward is not supported yet: use ZeRO-2, DDP or FSDP2")
    if type(weight).__name__ == "DTensor" or hasattr(weight, "full_tensor"):
        return weight.full_tensor()   # FSDP2 / tensor parallel: differentiable all-gather
    if weight.dim() != 2:
        raise NotImplementedError(
            f"the lm_head weight has shape {tuple(weight.shape)} (a flattened FSDP1 shard?); "
            "use FSDP2 (fully_shard) or DDP")
    return weight


def causal_lm_gft_loss(model, input_ids, attention_mask, labels, adv, tau=0.7, *, normalizer=None,
                       reduction="mean", return_stats=False, backend="auto"):
    """GFT loss of a causal LM on a batch, through the fused kernel.

    Runs the model's backbone to its last hidden states ``[B, T, H]``, shifts them against
    ``labels`` (position t predicts token t + 1; -100 marks prompt and padding tokens) and calls
    ``gft_kernels.gft_loss`` with the output embedding's weight (and bias, and the model's final
    logit softcap, if any). ``adv`` is ``[B]`` (per sequence) or ``[B, T - 1]``.
    Under autocast, hidden states and weight meet in the autocast dtype, as ``nn.Linear`` would.
    """
    backbone = model.get_decoder()
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    head = model.get_output_embeddings()
    weight = _full_weight(head)
    bias = getattr(head, "bias", None)
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        dtype = weight.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    with torch.autocast(hidden.device.type, enabled=False):
        return gft_kernels.gft_loss(hidden, weight, targets, adv, tau, bias=bias, normalizer=normalizer,
                                    reduction=reduction, softcap=softcap, backend=backend,
                                    return_stats=return_stats, check_values=False)
