"""The model's head input (its forward run up to the head), and the probe that checks the
logits-transform table against the model's own logits (``check_model``)."""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transforms import (
    LogitsTransform,
    UnsupportedModelError,
    arch_name,
    config_field,
    config_number,
    head_linear,
    logits_transform,
    output_head,
    whole_head,
)


class _Stop(Exception):
    pass


def original_forward(model):
    return model.__dict__.get("_gft_original_forward") or model


def forward_kwargs(model, input_ids, attention_mask, extra):
    kwargs = dict(extra)
    kwargs["input_ids"] = input_ids
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    fwd = original_forward(model)
    fwd = fwd.forward if isinstance(fwd, nn.Module) else fwd
    params = inspect.signature(fwd).parameters
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def head_input(model, input_ids, attention_mask=None, **kwargs) -> Tensor:
    """The input of the model's output head, ``[B, T, H]``: the model's forward run up to its head.

    Keyword arguments go to the model's forward (``position_ids``, ``token_type_ids``, ...).
    Under ``torch.compile`` the model's backbone runs instead (``model.base_model``), where the
    probe (``check_model``) saw that its output is what the forward hands to the head: dynamo
    traces a call, not a hook that stops a forward.
    """
    if torch.compiler.is_compiling():
        return _backbone_head_input(model, input_ids, attention_mask, kwargs)
    head = output_head(model)
    captured = []

    def hook(module, args, kw):
        captured.append(args[0] if args else next(iter(kw.values())))
        raise _Stop

    # prepended: it stops the forward before a sharding framework's own pre-forward hook would
    # gather the head's weight (the loss's call of the head gathers it)
    handle = head.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        original_forward(model)(**forward_kwargs(model, input_ids, attention_mask, kwargs))
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise UnsupportedModelError(
            f"{arch_name(model)}: its forward does not call its output head {type(head).__name__} "
            "(it reads the weight directly or uses another head)"
        )
    return _checked_shape(model, captured[0], input_ids)


def _checked_shape(model, x: Tensor, input_ids: Tensor) -> Tensor:
    if x.dim() != 3 or tuple(x.shape[:2]) != tuple(input_ids.shape):
        raise UnsupportedModelError(
            f"{arch_name(model)}: its output head's input has shape {tuple(x.shape)}, not "
            f"[batch, tokens, hidden] = [{input_ids.shape[0]}, {input_ids.shape[1]}, H]"
        )
    return x


@dataclass(frozen=True)
class _BackboneCall:
    """How the probe found the model's head input as its backbone's output: the backbone's
    ``use_cache`` argument, decided outside a compiled region (dynamo does not trace ``inspect``)."""

    use_cache: bool


# model -> _BackboneCall, or why its backbone's output is not its head's input (a str)
_BACKBONES: weakref.WeakKeyDictionary[nn.Module, object] = weakref.WeakKeyDictionary()


def _backbone_of(model):
    backbone = getattr(model, "base_model", None)
    return backbone if isinstance(backbone, nn.Module) and backbone is not model else None


def _run_backbone(backbone, input_ids, attention_mask, extra: dict, use_cache: bool) -> Tensor:
    kwargs = dict(extra, input_ids=input_ids)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if use_cache:
        kwargs["use_cache"] = False
    out = backbone(**kwargs)
    x = getattr(out, "last_hidden_state", None)
    return out[0] if x is None else x


def _backbone_verdict(model, input_ids, attention_mask, head_x: Tensor):
    """A ``_BackboneCall`` where the backbone's output equals ``head_x`` (the head's input in the
    model's own forward on the same batch) exactly, else the reason it cannot stand in."""
    backbone = _backbone_of(model)
    if backbone is None:
        return "it has no backbone module apart from itself (base_model)"
    use_cache = "use_cache" in inspect.signature(backbone.forward).parameters
    try:
        x = _run_backbone(backbone, input_ids, attention_mask, {}, use_cache)
    except Exception as e:
        return f"its backbone {type(backbone).__name__} fails on the probe's batch ({type(e).__name__})"
    if not isinstance(x, Tensor) or x.shape != head_x.shape or x.dtype != head_x.dtype or not torch.equal(x, head_x):
        return (
            f"its forward changes its backbone {type(backbone).__name__}'s output before the head "
            "(or the backbone returns something else first)"
        )
    return _BackboneCall(use_cache)


def _backbone_head_input(model, input_ids, attention_mask, extra: dict) -> Tensor:
    verdict = _BACKBONES.get(model)
    if verdict is None:
        raise UnsupportedModelError(
            f"{arch_name(model)}: not probed; call check_model(model) (or patch(model)) before torch.compile"
        )
    if isinstance(verdict, str):
        raise UnsupportedModelError(
            f"{arch_name(model)}: torch.compile cannot trace how it reaches its output head: {verdict}; run it eagerly"
        )
    x = _run_backbone(_backbone_of(model), input_ids, attention_mask, extra, verdict.use_cache)
    return _checked_shape(model, x, input_ids)


_VERDICTS: weakref.WeakKeyDictionary[nn.Module, object] = weakref.WeakKeyDictionary()
PROBE_AMPLITUDE = 200.0  # largest |logit| of the amplified probe


def logits_tolerance(*dtypes) -> float:
    """Agreement expected of two computations of the same logits: the coarser dtype's."""
    return max({torch.float64: 1e-9, torch.float32: 2e-5}.get(d, 3e-2) for d in dtypes)


def logits_of(out):
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        logits = out[0]
    return logits


def probe_vocab(model, spec: LogitsTransform, weight: Tensor) -> int:
    """How many token ids a probe may draw from (a sharded head's weight is no guide)."""
    if weight.dim() == 2:
        return min(weight.shape[0], spec.vocab or weight.shape[0])
    return int(spec.vocab or config_number(config_field(model, "vocab_size")) or 2)


def probe_length(model, tokens: int = 6) -> int:
    """Tokens per probe row, a length the model accepts: xLSTM in its ``mode="train"`` refuses a
    length that is not a multiple of its ``chunk_size`` (its other modes, and Mamba2's chunks, pad)."""
    config = getattr(model, "config", None)
    chunk = getattr(config, "chunk_size", None)
    if getattr(config, "mode", None) == "train" and isinstance(chunk, int) and chunk > 1:
        return -(-tokens // chunk) * chunk
    return tokens


def _compare(arch: str, spec: LogitsTransform, state: dict, logits: Tensor, acc: torch.dtype, what: str) -> None:
    """The model's logits against the head's product (``state["ours"]``) after ``spec``, within
    the rounding of the dtypes the product ran in."""
    ours = spec.apply(state["ours"].to(acc))
    if tuple(ours.shape) != tuple(logits.shape):
        raise UnsupportedModelError(
            f"{arch}: its logits have shape {tuple(logits.shape)}, the head's product after "
            f"{', '.join(spec.found) or 'no transform'} has {tuple(ours.shape)}"
        )
    theirs = logits.to(acc)
    err = float((theirs - ours).abs().max())
    size = max(1.0, float(theirs.abs().max()))
    if not err <= logits_tolerance(*state["dtypes"], logits.dtype) * size:
        ratio = float((theirs * ours).sum() / ours.square().sum().clamp_min(1e-30))
        raise UnsupportedModelError(
            f"{arch}: its logits are not the head's product after "
            f"{', '.join(spec.found) or 'no transform (plain x @ W.T + b)'}: at {what} logits "
            f"(largest {size:.3g}) they differ by {err:.3g} (best scalar fit x{ratio:.4g}); "
            "it transforms its logits in a way this library does not know"
        )


def _probe(model, spec: LogitsTransform):
    """Checks ``spec`` against the model's own logits; returns its backbone's verdict (``_BACKBONES``)."""
    arch = arch_name(model)
    linear = head_linear(output_head(model))
    weight = linear.weight
    device = weight.device
    g = torch.Generator().manual_seed(1234)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    # The head's product is formed by hooks on the linear layer, where a sharding framework has
    # gathered its weight (its pre-hook runs after the framework's; its forward hook before).
    state = {"ours": None, "amplify": False, "calls": 0}

    def pre_hook(module, args, kw):
        state["calls"] += 1
        x = args[0] if args else next(iter(kw.values()), None)
        if not isinstance(x, Tensor) or x.dim() != 3 or tuple(x.shape[:2]) != tuple(input_ids.shape):
            raise UnsupportedModelError(
                f"{arch}: its output head's input is not [batch, tokens, hidden] "
                f"(got {None if not isinstance(x, Tensor) else tuple(x.shape)})"
            )
        w, b, group = whole_head(module.weight, getattr(module, "bias", None))
        if group is not None:
            raise UnsupportedModelError(
                f"{arch}: the probe cannot check a vocabulary-sharded head; "
                "check the model before sharding it (check_model)"
            )
        if state["amplify"]:
            synth = torch.randn(x.shape, generator=g, dtype=acc).to(device)
            peak = float(F.linear(synth, w.to(acc)).abs().max())
            x = (synth * (PROBE_AMPLITUDE / max(peak, 1e-30))).to(x.dtype)
        else:
            state["x"] = x
        state["ours"] = F.linear(x, w, b)
        state["dtypes"] = (w.dtype, x.dtype)
        return ((x,) + tuple(args[1:]), kw) if args else None

    def run():
        state["calls"] = 0
        out = original_forward(model)(**forward_kwargs(model, input_ids, mask, {}))
        logits = logits_of(out)
        if logits is None:
            raise UnsupportedModelError(f"{arch}: its forward returns no logits to compare with")
        if state["calls"] != 1:
            raise UnsupportedModelError(
                f"{arch}: its forward calls its output head {state['calls']} times (one expected)"
            )
        return logits

    vocab = probe_vocab(model, spec, weight)
    input_ids = torch.randint(0, max(1, min(vocab, 1000)), (2, probe_length(model)), generator=g).to(device)
    mask = torch.ones_like(input_ids)
    modes = [(m, m.training) for m in model.modules()]
    handle = linear.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        model.eval()
        with (
            torch.no_grad(),
            torch.autocast(device.type, enabled=False),
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        ):
            _compare(arch, spec, state, run(), acc, "natural")
            backbone = _backbone_verdict(model, input_ids, mask, state["x"])
            state["amplify"] = True
            _compare(arch, spec, state, run(), acc, "amplified")
    finally:
        handle.remove()
        for m, training in modes:
            m.training = training
    return backbone


def check_model(model, *, force: bool = False) -> LogitsTransform:
    """The model's logits transform, probed once per model (the verdict is cached).

    Raises ``UnsupportedModelError`` (a ``NotImplementedError``) naming the architecture and
    what it does when the fused path cannot reproduce the model's own logits.
    """
    if not force and model in _VERDICTS:
        verdict = _VERDICTS[model]
        if isinstance(verdict, Exception):
            raise verdict
        return verdict
    if torch.compiler.is_compiling():
        raise UnsupportedModelError(
            f"{arch_name(model)}: not probed; call check_model(model) (or patch(model)) before torch.compile"
        )
    try:
        output_head(model)
        spec = logits_transform(model)
        _BACKBONES[model] = _probe(model, spec)
    except UnsupportedModelError as e:
        _VERDICTS[model] = e
        raise
    _VERDICTS[model] = spec
    return spec
