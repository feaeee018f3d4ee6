"""``patch`` / ``unpatch``: a transformers model's own forward returns the GFT loss."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..options import IGNORE_INDEX, check_backend_name, check_tau
from .loss import causal_lm_gft_loss
from .probe import check_model, forward_kwargs, logits_of, logits_tolerance, original_forward, probe_length, probe_vocab
from .transforms import UnsupportedModelError, arch_name, head_linear, output_head


def _loss_probe(model):
    """Whether the model's own loss shifts its labels (True: position t predicts label t + 1, as
    most causal LMs; False: label t, as the decoders of encoder-decoder families). Refuses a model
    whose own loss is neither cross-entropy of its logits."""
    arch = arch_name(model)
    weight = head_linear(output_head(model)).weight
    device = weight.device
    g = torch.Generator().manual_seed(4321)
    spec = check_model(model)
    vocab = probe_vocab(model, spec, weight)
    input_ids = torch.randint(0, max(1, min(vocab, 1000)), (2, probe_length(model)), generator=g).to(device)
    labels = input_ids.clone()
    labels[0, :2] = IGNORE_INDEX
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            kwargs = forward_kwargs(model, input_ids, torch.ones_like(input_ids), {})
            try:
                out = original_forward(model)(labels=labels, **kwargs)
            except Exception as e:
                raise UnsupportedModelError(
                    f"{arch}: its own forward with labels fails on a text batch "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
                ) from e
            own = getattr(out, "loss", None)
            logits = logits_of(out) if own is not None else None
            if own is None:
                raise UnsupportedModelError(f"{arch}: its forward computes no loss from labels")
            acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
            flat = logits.to(acc)
            shifted = F.cross_entropy(flat[:, :-1].reshape(-1, flat.shape[-1]), labels[:, 1:].reshape(-1))
            unshifted = F.cross_entropy(flat.reshape(-1, flat.shape[-1]), labels.reshape(-1))
            tol = logits_tolerance(weight.dtype, logits.dtype, own.dtype)
            for shift, ce in ((True, shifted), (False, unshifted)):
                if abs(float(own) - float(ce)) <= tol * max(1.0, abs(float(ce))):
                    return shift
            raise UnsupportedModelError(
                f"{arch}: its own loss ({float(own):.6g}) is not the cross-entropy of its logits, "
                f"shifted ({float(shifted):.6g}) or not ({float(unshifted):.6g}): it adds or changes "
                "terms (an auxiliary router loss, a z-loss); a patched forward would silently differ"
            )
    finally:
        for m, training in modes:
            m.training = training


@dataclass
class _PatchOptions:
    tau: float
    backend: str
    shift: bool = True


def patch(model, *, tau: float = 0.0, backend: str = "auto"):
    """Make ``model.forward`` return the GFT loss when given labels, without materializing logits.

    After ``patch(model)``::

        out = model(input_ids, attention_mask=..., labels=labels,
                    advantages=None,            # scalar, [B] or per token [B, T]; None: 1
                    tau=None,                   # None: the patch's tau (default 0)
                    num_items_in_batch=None,    # the normalizer across accumulation / processes
                    return_gft_stats=False)     # out.gft_stats: a GFTStats
        out.loss

    ``labels`` are the model's usual ones (-100 ignored; shifted inside, or not for the models
    whose own loss does not shift them, e.g. BartForCausalLM; ``shift_labels`` is accepted as
    transformers accepts it). With no advantages and ``tau=0`` the loss is the
    model's own (shifted cross-entropy, summed over ``num_items_in_batch`` when given), so a
    patched model trains unchanged in ``transformers.Trainer``. ``out.logits`` is None when a
    loss is computed; without labels the original forward runs (generation is unchanged).

    Probes the model first and refuses (``UnsupportedModelError``) what it cannot reproduce,
    including models whose own loss adds terms (auxiliary router loss, z-loss).
    Returns the model; ``unpatch(model)`` restores the original forward.
    """
    check_tau(tau)  # before touching the model
    check_backend_name(backend)
    if "_gft_original_forward" in model.__dict__:
        shift = model.__dict__["_gft_options"].shift
        model.__dict__["_gft_options"] = _PatchOptions(float(tau), backend, shift)
        return model
    shift = _loss_probe(model)
    original = model.forward
    model.__dict__["_gft_original_forward"] = original
    model.__dict__["_gft_options"] = _PatchOptions(float(tau), backend, shift)

    def forward(
        input_ids=None,
        attention_mask=None,
        labels=None,
        *,
        advantages=None,
        tau=None,
        num_items_in_batch=None,
        return_gft_stats=False,
        shift_labels=None,
        **kwargs,
    ):
        if labels is None and shift_labels is None:
            if advantages is not None or return_gft_stats:
                raise ValueError("advantages / return_gft_stats need labels")
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        options = model.__dict__["_gft_options"]
        tau_ = options.tau if tau is None else tau
        if shift_labels is None and not options.shift:
            shift_labels = labels  # this model's own loss reads label t at position t
        kwargs.pop("return_dict", None)
        ref = shift_labels if shift_labels is not None else labels
        adv = 1.0 if advantages is None else advantages
        if isinstance(adv, Tensor) and adv.dim() == 2 and shift_labels is None and adv.shape[-1] == ref.shape[-1]:
            adv = adv[:, 1:]
        result = causal_lm_gft_loss(
            model,
            input_ids,
            attention_mask,
            labels,
            adv,
            tau_,
            normalizer=num_items_in_batch,
            return_stats=return_gft_stats,
            backend=options.backend,
            shift_labels=shift_labels,
            **kwargs,
        )
        loss, stats = result if return_gft_stats else (result, None)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = CausalLMOutputWithPast(loss=loss)
        if return_gft_stats:
            out.gft_stats = stats
        return out

    forward.__signature__ = inspect.Signature(
        [
            inspect.Parameter("input_ids", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
            inspect.Parameter("attention_mask", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
            inspect.Parameter("labels", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
            *(
                inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
                for n, d in (
                    ("advantages", None),
                    ("tau", None),
                    ("num_items_in_batch", None),
                    ("return_gft_stats", False),
                    ("shift_labels", None),
                )
            ),
            inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
        ]
    )
    model.forward = forward
    return model


def unpatch(model):
    """Restore the forward ``patch`` replaced."""
    original = model.__dict__.pop("_gft_original_forward", None)
    model.__dict__.pop("_gft_options", None)
    if original is not None:
        if getattr(original, "__self__", None) is model and original.__func__ is type(model).forward:
            model.__dict__.pop("forward", None)
        else:
            model.forward = original
    return model
