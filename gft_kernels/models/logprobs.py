"""``causal_lm_logprobs``: a transformers causal LM's per-token log-probs through the fused op."""

from __future__ import annotations

import torch

from ..api import TokenLogprobs, logprobs
from ..options import IGNORE_INDEX
from .probe import check_model, head_input
from .transforms import arch_name, call_head, logits_transform, output_head, whole_head


def causal_lm_logprobs(
    model,
    input_ids,
    attention_mask=None,
    labels=None,
    *,
    shift_labels=None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    ignore_index: int = IGNORE_INDEX,
    check: bool = True,
    **forward_kwargs,
) -> TokenLogprobs:
    """Per-token log-probs (and entropies) of a causal LM, ``[B, T - 1]``, with no ``[tokens x
    vocab]`` logits: what ``model(...).logits[:, :-1].float().div(temperature).log_softmax(-1)``
    gathers at ``labels[:, 1:]`` (``labels`` defaults to ``input_ids``; ``ignore_index`` marks
    tokens that do not count, 0 there), or at ``shift_labels [B, T]`` already aligned
    (``[B, T]`` outputs). The model's logits transform (scale, softcap, vocabulary cut) is
    applied exactly, as ``causal_lm_gft_loss`` applies it; the first call probes the model
    (``check=False`` trusts the table). Differentiable; extra keyword arguments go to the
    model's forward."""
    spec = check_model(model) if check else logits_transform(model)
    head = output_head(model)
    x = head_input(model, input_ids, attention_mask, **forward_kwargs)
    if shift_labels is None:
        labels = input_ids if labels is None else labels
        x, targets = x[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels

    def logprobs_of(weight, bias, x):
        weight, bias, group = whole_head(weight, bias, model)
        if spec.vocab is not None and group is not None:
            raise NotImplementedError(
                f"{arch_name(model)}: a vocabulary cut ({spec.vocab}) on a vocabulary-sharded head is not supported"
            )
        if spec.vocab is not None and spec.vocab < weight.shape[0]:
            weight = weight[: spec.vocab]
            bias = None if bias is None else bias[: spec.vocab]
        if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight.dtype)  # as models that cast before the head do
        # cap_c(scale * z) / T == cap_{c / T}(z * scale / T): the op's temperature and softcap carry both
        return logprobs(
            x,
            weight,
            targets,
            bias=bias,
            temperature=temperature / spec.scale,
            softcap=None if spec.softcap is None else spec.softcap / temperature,
            return_entropy=return_entropy,
            backend=backend,
            ignore_index=ignore_index,
            vocab_parallel_group=group,
        )

    return call_head(head, logprobs_of, x)
