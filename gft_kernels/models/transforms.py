"""What comes after a causal LM's head product: the table of known logits transforms (scales,
softcaps, a vocabulary cut), and the head itself as the model calls it (FSDP / ZeRO / DTensor
aware)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


class UnsupportedModelError(NotImplementedError):
    """The model's logits cannot be reproduced exactly from its hidden states and head."""


@dataclass(frozen=True)
class LogitsTransform:
    """``logits = softcap * tanh(scale * (x W^T + b) / softcap)``, then the first ``vocab`` columns."""

    arch: str
    scale: float = 1.0
    softcap: float | None = None
    vocab: int | None = None
    found: tuple[str, ...] = field(default=())  # what the table read, for messages

    def apply(self, raw: Tensor) -> Tensor:
        z = raw * self.scale if self.scale != 1.0 else raw
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z if self.vocab is None else z[..., : self.vocab]


def arch_name(model) -> str:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} (model_type {mt!r})" if mt else type(model).__name__


def _configs(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    out = [cfg]
    if hasattr(cfg, "get_text_config"):
        try:
            text = cfg.get_text_config()
        except ValueError:  # several text configs (an encoder's and a decoder's)
            text = getattr(cfg, "decoder", cfg)
        if text is not cfg:
            out.append(text)
    return out


def config_field(model, name):
    for cfg in _configs(model):
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return None


def config_number(value):
    if isinstance(value, Tensor):
        return float(value.detach().reshape(-1)[0]) if value.numel() == 1 else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# Logit transforms after the head's product, as transformers' causal LMs apply them.
# ``logits_scaling`` divides in Granite's family and multiplies in HyperCLOVAX; MiniCPM3 and
# Inkling divide the hidden state before the head (captured with the head's input, nothing to do).
_SCALING_MULTIPLIES = {"hyperclovax"}
_SCALING_BEFORE_HEAD = {"minicpm3"}
_SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


def logits_transform(model) -> LogitsTransform:
    """What the model does to ``x W^T + b`` to make its logits, from the table of known fields.

    Not a guarantee on its own: ``check_model`` probes the model against it.
    """
    arch = arch_name(model)
    model_type = getattr(model.config, "model_type", "")
    scale, softcap, vocab, found = 1.0, None, None, []

    def mul(value, what):
        nonlocal scale
        v = config_number(value)
        if v is None or v <= 0 or not math.isfinite(v):
            raise UnsupportedModelError(f"{arch}: {what} = {value!r} is not a positive number")
        scale *= v
        found.append(f"{what} = {v:g}")

    logit_scale = getattr(model, "logit_scale", None)
    if logit_scale is None:
        logit_scale = config_field(model, "logit_scale")
    if logit_scale is not None and not isinstance(logit_scale, nn.Module):
        if isinstance(logit_scale, nn.Parameter):
            raise UnsupportedModelError(f"{arch}: its logit scale is a trained parameter (not supported)")
        mul(logit_scale, "logits * logit_scale")
    scaling = config_field(model, "logits_scaling")
    if scaling is not None and model_type not in _SCALING_BEFORE_HEAD:
        if model_type in _SCALING_MULTIPLIES:
            mul(scaling, "logits * logits_scaling")
        else:
            v = config_number(scaling)
            mul(None if v is None or v == 0 else 1.0 / v, "logits / logits_scaling")
            found[-1] = f"logits / logits_scaling = {v:g}"
    multiplier = getattr(getattr(model, "model", None), "lm_head_multiplier", None)
    if multiplier is None:
        multiplier = config_field(model, "lm_head_multiplier")
    if multiplier is not None:
        mul(multiplier, "logits * lm_head_multiplier")
    out_mult = config_field(model, "output_multiplier")
    if out_mult is not None:
        mul(out_mult, "logits * output_multiplier")
    for name in _SOFTCAP_FIELDS:
        cap = config_field(model, name)
        if cap is not None:
            v = config_number(cap)
            if v is None or v <= 0:
                raise UnsupportedModelError(f"{arch}: {name} = {cap!r} is not a positive number")
            softcap = v
            found.append(f"softcap {name} = {v:g}")
            break
    unpadded = config_field(model, "unpadded_vocab_size")
    if unpadded is not None:
        vocab = int(unpadded)
        found.append(f"logits cut to unpadded_vocab_size = {vocab}")
    return LogitsTransform(arch, scale, softcap, vocab, tuple(found))


def output_head(model):
    """The output head as the model calls it: the linear layer itself, or the FSDP1 unit that
    wraps it (``head_linear`` gives the layer inside)."""
    arch = arch_name(model)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise UnsupportedModelError(f"{arch}: get_output_embeddings() returns no output head")
    if not isinstance(head, nn.Module):
        raise UnsupportedModelError(f"{arch}: its output head is a {type(head).__name__}, not a linear layer")
    linear = head_linear(head)
    names = sorted(n.replace(_FSDP1_PREFIX, "") for n, _ in head.named_parameters())
    if names == [_FSDP1_FLAT] or (names == [] and isinstance(getattr(linear, "weight", None), Tensor)):
        # FSDP1 without use_orig_params: the head's unit holds a flat parameter, or the head in
        # an outer unit has plain tensor views for weights; the weight is checked inside the call
        return head
    if not isinstance(getattr(linear, "weight", None), Tensor) or names not in (["weight"], ["bias", "weight"]):
        raise UnsupportedModelError(
            f"{arch}: its output head {type(linear).__name__} has parameters {names}; only a linear "
            "layer (weight [V, H] and an optional bias) can be fused"
        )
    return head


_FSDP1_PREFIX = "_fsdp_wrapped_module."
_FSDP1_FLAT = "_flat_param"


def head_linear(head):
    """The linear layer of a head: itself, or the module an FSDP1 unit wraps."""
    return getattr(head, "_fsdp_wrapped_module", head)


def call_head(head, fn, x):
    """``fn(weight, bias, x)`` run as the head's own forward: ``head(x)`` with the linear layer's
    forward swapped for ``fn``. Whatever a sharding framework hooks onto the head's call then
    happens as for its usual product: FSDP1 and FSDP2 units and DeepSpeed ZeRO-3 gather the
    weight for the forward, release it after, gather it again for the backward (the fused
    backward recomputes the logits) and reduce its gradient into the sharded parameter. On an
    unsharded head this is just ``fn(head.weight, head.bias, x)``. (A forward hook a user put on
    the head sees ``fn``'s result in place of logits.)"""
    linear = head_linear(head)
    if linear is head and not _has_hooks(head):
        # what head(x) would run; a call that dynamo traces (it does not trace the swap below)
        return fn(linear.weight, getattr(linear, "bias", None), x)
    if torch.compiler.is_compiling():
        raise UnsupportedModelError(
            f"the output head {type(head).__name__} is wrapped or has hooks (a sharding framework's or a "
            "user's): torch.compile cannot trace the adapter's call of it; run it eagerly"
        )
    had = "forward" in linear.__dict__
    own = linear.__dict__.get("forward")
    linear.forward = lambda inp: fn(linear.weight, getattr(linear, "bias", None), inp)
    try:
        return head(x)
    finally:
        if had:
            linear.forward = own
        else:
            del linear.forward


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its forward (the condition of ``Module.__call__``)."""
    from torch.nn.modules import module as _module

    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or module._backward_pre_hooks
        or module._backward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_backward_pre_hooks
        or _module._global_backward_hooks
    )


def _uses_fsdp2(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def whole_head(weight, bias, model=None):
    """(weight, bias, vocabulary-parallel group): the head's parameters as the loss reads them.

    Inside the head's call the frameworks have gathered them; a DTensor still sharded on the
    vocabulary dimension (tensor parallelism: every rank of its mesh holds the same tokens) is
    taken shard by shard by the vocabulary-parallel op, and any other DTensor is gathered. If
    ``model`` uses FSDP2, a DTensor here is a data-parallel shard the framework failed to gather
    (each rank holds other tokens): an error, never the vocabulary-parallel path."""
    if type(weight).__name__ == "DTensor":
        from torch.distributed.tensor import Replicate, Shard

        placements = tuple(weight.placements)
        mesh = weight.device_mesh
        if model is not None and _uses_fsdp2(model):
            raise UnsupportedModelError(
                "the output head's weight is still an FSDP2 shard inside its call: compute the loss "
                "inside the forward of the FSDP root module (as gft_train's GFTPolicy does), where "
                "FSDP2 gathers it"
            )
        if (
            mesh.ndim == 1
            and placements == (Shard(0),)
            and (bias is None or tuple(getattr(bias, "placements", ())) == (Shard(0),))
        ):
            return weight.to_local(), None if bias is None else bias.to_local(), mesh.get_group()
        if all(isinstance(p, (Replicate, Shard)) for p in placements):
            full = weight.full_tensor()
            b = bias.full_tensor() if type(bias).__name__ == "DTensor" else bias
            return full, b, None
        raise NotImplementedError(f"an lm_head weight DTensor with placements {placements} is not supported")
    if weight.dim() != 2:
        raise UnsupportedModelError(
            f"the output head's weight has shape {tuple(weight.shape)} inside its own call, not [V, H]: "
            "a sharding framework did not gather it"
        )
    return weight, bias, None
