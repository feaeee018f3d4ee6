"""``causal_lm_gft_loss``: a transformers causal LM's GFT loss through the fused op."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..api import gft_loss
from ..options import IGNORE_INDEX
from .probe import check_model, head_input
from .transforms import arch_name, call_head, logits_transform, output_head, whole_head


def causal_lm_gft_loss(
    model,
    input_ids,
    attention_mask,
    labels,
    adv,
    tau=0.7,
    *,
    normalizer=None,
    reduction="mean",
    return_stats=False,
    backend="auto",
    ignore_index=IGNORE_INDEX,
    shift_labels=None,
    check=True,
    temperature=1.0,
    loss_options: dict | None = None,
    **forward_kwargs,
):
    """GFT loss of a transformers causal LM on a batch, through the fused op.

    Runs the model's forward up to its output head, shifts the head's input against ``labels``
    (position t predicts token t + 1; ``ignore_index`` marks prompt and padding tokens), or takes
    ``shift_labels`` ``[B, T]`` already aligned, and calls ``gft_loss`` with the head's weight and
    bias and the model's logits transform (scale, softcap, vocabulary cut). ``adv`` is a scalar,
    ``[B]`` (per sequence), or per token ``[B, T - 1]`` (``[B, T]`` with ``shift_labels``).

    The first call probes the model (``check_model``; ``check=False`` skips it and trusts the
    table). Under autocast the head's product runs in the autocast dtype, as ``nn.Linear``'s
    would. ``temperature`` divides the model's final logits (after its own scale and softcap),
    as samplers and RL trainers (TRL, verl) score their samples: ``cap_c(scale * z) / T`` equals
    ``cap_{c/T}(z * scale / T)``, so the op's own temperature and softcap carry it exactly.
    ``loss_options`` go to ``gft_loss`` (e.g. ``old_logp``, ``ref_logp``, ``beta``,
    ``entropy_coef``); extra keyword arguments go to the model's forward.
    """
    options = HeadLossOptions(
        tau, normalizer, reduction, return_stats, backend, ignore_index, temperature, dict(loss_options or {})
    )
    batch = CausalLMBatch(input_ids, attention_mask, labels, adv, shift_labels)
    return _causal_lm_loss(model, batch, options, check, forward_kwargs)


@dataclass(frozen=True)
class HeadLossOptions:
    """``causal_lm_gft_loss``'s options for ``gft_loss`` (the model adds its logits transform)."""

    tau: float
    normalizer: Any
    reduction: str
    return_stats: bool
    backend: str
    ignore_index: int
    temperature: float
    loss_options: dict = field(default_factory=dict)  # more ``gft_loss`` keywords


@dataclass(frozen=True)
class CausalLMBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    adv: Any
    shift_labels: torch.Tensor | None = None


def _causal_lm_loss(model, batch: CausalLMBatch, options: HeadLossOptions, check: bool, forward_kwargs: dict):
    spec = check_model(model) if check else logits_transform(model)
    head = output_head(model)
    x = head_input(model, batch.input_ids, batch.attention_mask, **forward_kwargs)
    if batch.shift_labels is None:
        x, targets = x[:, :-1], batch.labels[:, 1:]
    else:
        targets = batch.shift_labels
    temperature = options.temperature

    def loss_of(weight, bias, x):
        weight, bias, group = whole_head(weight, bias, model)
        if spec.vocab is not None and group is not None:
            raise NotImplementedError(
                f"{arch_name(model)}: a vocabulary cut ({spec.vocab}) on a vocabulary-sharded head is not supported"
            )
        if spec.vocab is not None and spec.vocab < weight.shape[0]:
            weight = weight[: spec.vocab]
            bias = None if bias is None else bias[: spec.vocab]
        if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight.dtype)  # as models that cast before the head (Mamba, xLSTM) do
        return gft_loss(
            x,
            weight,
            targets,
            batch.adv,
            options.tau,
            bias=bias,
            normalizer=options.normalizer,
            reduction=options.reduction,
            temperature=temperature / spec.scale,
            softcap=None if spec.softcap is None else spec.softcap / temperature,
            backend=options.backend,
            ignore_index=options.ignore_index,
            return_stats=options.return_stats,
            check_values=False,
            vocab_parallel_group=group,
            **options.loss_options,
        )

    return call_head(head, loss_of, x)
