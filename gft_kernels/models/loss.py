"""``causal_lm_gft_loss``: a transformers causal LM's GFT loss through the fused op."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..api import GFTLoss, gft_loss_with_options
from ..options import IGNORE_INDEX, GFTOptions, LogitOptions
from .probe import check_model, head_input
from .transforms import arch_name, call_head, logits_transform, output_head, whole_head


def causal_lm_gft_loss(
    model,
    input_ids,
    attention_mask,
    labels,
    adv,
    tau=None,
    *,
    loss: GFTLoss | None = None,
    normalizer=None,
    reduction=None,
    return_stats=None,
    backend=None,
    ignore_index=None,
    shift_labels=None,
    check=True,
    temperature=None,
    loss_options: dict | None = None,
    seq_ids=None,
    cu_seqlens=None,
    **forward_kwargs,
):
    """GFT loss of a transformers causal LM on a batch, through the fused op.

    Runs the model's forward up to its output head, shifts the head's input against ``labels``
    (position t predicts token t + 1; ``ignore_index`` marks prompt and padding tokens), or takes
    ``shift_labels`` ``[B, T]`` already aligned, and calls ``gft_loss`` with the head's weight and
    bias and the model's logits transform (scale, softcap, vocabulary cut). ``adv`` is a scalar,
    ``[B]`` (per sequence), or per token ``[B, T - 1]`` (``[B, T]`` with ``shift_labels``).

    The loss's options come from ``loss``, a :class:`gft_kernels.GFTLoss` built once (a trainer
    holds one; its ``check_values``, and nothing else, decides the value checks), or, without
    it, from the keywords, as ``gft_loss`` takes them (``tau`` 0.7, ``reduction`` "mean",
    ``return_stats`` False, ``backend`` "auto", ``ignore_index`` -100, ``temperature`` 1.0, and
    ``loss_options``: more ``gft_loss`` keywords, e.g. ``beta``, ``entropy_coef``), with the
    value checks off. Per batch, with either: ``normalizer`` (None: the loss's), ``old_logp`` and
    ``ref_logp`` (in ``loss_options``), and a packed layout, ``seq_ids`` or ``cu_seqlens`` (a row
    of several sequences, ``shift_labels`` aligned per sequence and ``position_ids`` restarting
    at each: the "seq-" reductions count these sequences; ``gft_loss`` documents both).

    The first call probes the model (``check_model``; ``check=False`` skips it and trusts the
    table). Under autocast the head's product runs in the autocast dtype, as ``nn.Linear``'s
    would. ``temperature`` (the loss's logits temperature) divides the model's final logits
    (after its own scale and softcap), as samplers and RL trainers (TRL, verl) score their
    samples: ``cap_c(scale * z) / T`` equals ``cap_{c/T}(z * scale / T)``, so the op's own
    temperature and softcap carry it exactly. Extra keyword arguments go to the model's forward.
    """
    keywords = KeywordOptions(tau, reduction, return_stats, backend, ignore_index, temperature, loss_options)
    loss, logprobs = keywords.loss_for(loss)
    batch = CausalLMBatch(input_ids, attention_mask, labels, adv, shift_labels)
    per_batch = dict(normalizer=normalizer, seq_ids=seq_ids, cu_seqlens=cu_seqlens, **logprobs)
    return _causal_lm_loss(model, batch, loss.options, per_batch, check, forward_kwargs)


@dataclass(frozen=True)
class KeywordOptions:
    """``causal_lm_gft_loss``'s option keywords, None where not given."""

    tau: float | None = None
    reduction: str | None = None
    return_stats: bool | None = None
    backend: str | None = None
    ignore_index: int | None = None
    temperature: float | None = None
    loss_options: dict | None = None

    def loss_for(self, loss: GFTLoss | None) -> tuple[GFTLoss, dict]:
        """(the loss, the per-call ``old_logp`` / ``ref_logp`` of ``loss_options``): ``loss`` as
        given (no option may be given again here), else one built from these keywords (``gft_loss``'s
        defaults, value checks off). What comes from the model is refused in the loss."""
        per_call = dict(self.loss_options or {})
        logprobs = {k: per_call.pop(k) for k in ("old_logp", "ref_logp") if k in per_call}
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "loss_options"}
        if loss is None:
            defaults = dict(tau=0.7, reduction="mean", return_stats=False, backend="auto", temperature=1.0)
            defaults["ignore_index"] = IGNORE_INDEX
            options = {k: defaults[k] if v is None else v for k, v in given.items()}
            loss = GFTLoss(options.pop("tau"), check_values=False, **options, **per_call)
        elif not isinstance(loss, GFTLoss):
            raise TypeError(f"loss must be a gft_kernels.GFTLoss, got {type(loss).__name__}")
        elif twice := sorted(k for k, v in {**given, **per_call}.items() if v is not None):
            raise TypeError(f"causal_lm_gft_loss: pass the loss's options in loss, not again as {twice}")
        if loss.bias is not None:
            raise ValueError("causal_lm_gft_loss: the bias is the model head's; loss must have none")
        if loss.options.logits.softcap is not None:
            raise ValueError(
                "causal_lm_gft_loss: the softcap is the model's (its logits transform); loss must have none"
            )
        if loss.options.run.vocab_parallel_group is not None:
            raise ValueError(
                "causal_lm_gft_loss: the vocabulary-parallel group is the model head's; loss must have none"
            )
        return loss, logprobs


@dataclass(frozen=True)
class CausalLMBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    adv: Any
    shift_labels: torch.Tensor | None = None


def _model_options(options: GFTOptions, spec, group) -> GFTOptions:
    """The loss's options with the model's logits transform (``cap_c(scale * z) / T``) and the
    head's vocabulary-parallel group; the loss options (tau, the reduction) are kept as built."""
    temperature = options.logits.temperature
    logits = LogitOptions.build(temperature / spec.scale, None if spec.softcap is None else spec.softcap / temperature)
    return dataclasses.replace(options, logits=logits, run=dataclasses.replace(options.run, vocab_parallel_group=group))


def _causal_lm_loss(model, batch: CausalLMBatch, options: GFTOptions, per_batch: dict, check: bool, forward_kwargs):
    spec = check_model(model) if check else logits_transform(model)
    head = output_head(model)
    x = head_input(model, batch.input_ids, batch.attention_mask, **forward_kwargs)
    if batch.shift_labels is None:
        x, targets = x[:, :-1], batch.labels[:, 1:]
    else:
        targets = batch.shift_labels

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
        return gft_loss_with_options(
            x, weight, targets, batch.adv, _model_options(options, spec, group), bias=bias, **per_batch
        )

    return call_head(head, loss_of, x)
