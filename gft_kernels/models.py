"""From a transformers causal LM to the GFT loss, with no ``[tokens x vocab]`` logits.

Two entry points:

- ``causal_lm_gft_loss(model, input_ids, attention_mask, labels, adv, tau)``: the functional op.
- ``patch(model)``: the model's own ``forward(input_ids, labels=..., advantages=..., tau=...,
  num_items_in_batch=...)`` returns the GFT loss (the model's own loss when there are no
  advantages and ``tau=0``), like Liger's ``apply_liger_kernel_to_*`` or CCE's ``cce_patch``.

How the hidden states are found: the model's own forward runs until it calls its output
embedding (``model.get_output_embeddings()``, a linear layer); a forward pre-hook takes the
layer's input and stops the forward there. So whatever the model does before its head (a
final norm, a rescaling of the hidden state, a prediction transform with its own parameters)
is part of the captured input, with its autograd graph, and the head's product is never made.

What comes after the head's product (logit scales and multipliers, final softcaps, a
vocabulary cut) is read from a table of known configuration fields (``logits_transform``) and
checked once per model by a probe (``check_model``): on a few tokens the model's own
``model(...).logits`` are compared with the transform applied to the head's product, at the
model's natural logits and at logits amplified to about 200 (where a cap shows). A model the
table does not describe exactly is refused with ``UnsupportedModelError`` (a
``NotImplementedError``) naming the architecture and what differs: never a silently different
loss.
"""
from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .api import gft_loss
from .validation import check_options


class UnsupportedModelError(NotImplementedError):
    """The model's logits cannot be reproduced exactly from its hidden states and head."""


@dataclass(frozen=True)
class LogitsTransform:
    """``logits = softcap * tanh(scale * (x W^T + b) / softcap)``, then the first ``vocab`` columns."""

    arch: str
    scale: float = 1.0
    softcap: float | None = None
    vocab: int | None = None
    found: tuple[str, ...] = field(default=())   # what the table read, for messages

    def apply(self, raw: Tensor) -> Tensor:
        z = raw * self.scale if self.scale != 1.0 else raw
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z if self.vocab is None else z[..., : self.vocab]


def _arch(model) -> str:
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
        except ValueError:    # several text configs (an encoder's and a decoder's)
            text = getattr(cfg, "decoder", cfg)
        if text is not cfg:
            out.append(text)
    return out


def _field(model, name):
    for cfg in _configs(model):
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return None


def _number(value):
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
    arch = _arch(model)
    model_type = getattr(model.config, "model_type", "")
    scale, softcap, vocab, found = 1.0, None, None, []

    def mul(value, what):
        nonlocal scale
        v = _number(value)
        if v is None or v <= 0 or not math.isfinite(v):
            raise UnsupportedModelError(f"{arch}: {what} = {value!r} is not a positive number")
        scale *= v
        found.append(f"{what} = {v:g}")

    logit_scale = getattr(model, "logit_scale", None)
    if logit_scale is None:
        logit_scale = _field(model, "logit_scale")
    if logit_scale is not None and not isinstance(logit_scale, nn.Module):
        if isinstance(logit_scale, nn.Parameter):
            raise UnsupportedModelError(f"{arch}: its logit scale is a trained parameter (not supported)")
        mul(logit_scale, "logits * logit_scale")
    scaling = _field(model, "logits_scaling")
    if scaling is not None and model_type not in _SCALING_BEFORE_HEAD:
        if model_type in _SCALING_MULTIPLIES:
            mul(scaling, "logits * logits_scaling")
        else:
            v = _number(scaling)
            mul(None if v is None or v == 0 else 1.0 / v, "logits / logits_scaling")
            found[-1] = f"logits / logits_scaling = {v:g}"
    multiplier = getattr(getattr(model, "model", None), "lm_head_multiplier", None)
    if multiplier is None:
        multiplier = _field(model, "lm_head_multiplier")
    if multiplier is not None:
        mul(multiplier, "logits * lm_head_multiplier")
    out_mult = _field(model, "output_multiplier")
    if out_mult is not None:
        mul(out_mult, "logits * output_multiplier")
    for name in _SOFTCAP_FIELDS:
        cap = _field(model, name)
        if cap is not None:
            v = _number(cap)
            if v is None or v <= 0:
                raise UnsupportedModelError(f"{arch}: {name} = {cap!r} is not a positive number")
            softcap = v
            found.append(f"softcap {name} = {v:g}")
            break
    unpadded = _field(model, "unpadded_vocab_size")
    if unpadded is not None:
        vocab = int(unpadded)
        found.append(f"logits cut to unpadded_vocab_size = {vocab}")
    return LogitsTransform(arch, scale, softcap, vocab, tuple(found))


def _head(model):
    """The output head as the model calls it: the linear layer itself, or the FSDP1 unit that
    wraps it (``_linear`` gives the layer inside)."""
    arch = _arch(model)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise UnsupportedModelError(f"{arch}: get_output_embeddings() returns no output head")
    if not isinstance(head, nn.Module):
        raise UnsupportedModelError(f"{arch}: its output head is a {type(head).__name__}, not a linear layer")
    linear = _linear(head)
    names = sorted(n.replace(_FSDP1_PREFIX, "") for n, _ in head.named_parameters())
    if names == [_FSDP1_FLAT] or (names == [] and isinstance(getattr(linear, "weight", None), Tensor)):
        # FSDP1 without use_orig_params: the head's unit holds a flat parameter, or the head in
        # an outer unit has plain tensor views for weights; the weight is checked inside the call
        return head
    if not isinstance(getattr(linear, "weight", None), Tensor) or names not in (["weight"], ["bias", "weight"]):
        raise UnsupportedModelError(
            f"{arch}: its output head {type(linear).__name__} has parameters {names}; only a linear "
            "layer (weight [V, H] and an optional bias) can be fused")
    return head


_FSDP1_PREFIX = "_fsdp_wrapped_module."
_FSDP1_FLAT = "_flat_param"


def _linear(head):
    """The linear layer of a head: itself, or the module an FSDP1 unit wraps."""
    return getattr(head, "_fsdp_wrapped_module", head)


def _call_head(head, fn, x):
    """``fn(weight, bias, x)`` run as the head's own forward: ``head(x)`` with the linear layer's
    forward swapped for ``fn``. Whatever a sharding framework hooks onto the head's call then
    happens as for its usual product: FSDP1 and FSDP2 units and DeepSpeed ZeRO-3 gather the
    weight for the forward, release it after, gather it again for the backward (the fused
    backward recomputes the logits) and reduce its gradient into the sharded parameter. On an
    unsharded head this is just ``fn(head.weight, head.bias, x)``. (A forward hook a user put on
    the head sees ``fn``'s result in place of logits.)"""
    linear = _linear(head)
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


def _uses_fsdp2(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _whole(weight, bias, model=None):
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
                "FSDP2 gathers it")
        if mesh.ndim == 1 and placements == (Shard(0),) and (
                bias is None or tuple(getattr(bias, "placements", ())) == (Shard(0),)):
            return weight.to_local(), None if bias is None else bias.to_local(), mesh.get_group()
        if all(isinstance(p, (Replicate, Shard)) for p in placements):
            full = weight.full_tensor()
            b = bias.full_tensor() if type(bias).__name__ == "DTensor" else bias
            return full, b, None
        raise NotImplementedError(f"an lm_head weight DTensor with placements {placements} is not supported")
    if weight.dim() != 2:
        raise UnsupportedModelError(
            f"the output head's weight has shape {tuple(weight.shape)} inside its own call, not [V, H]: "
            "a sharding framework did not gather it")
    return weight, bias, None


class _Stop(Exception):
    pass


def _original_forward(model):
    return model.__dict__.get("_gft_original_forward") or model


def _forward_kwargs(model, input_ids, attention_mask, extra):
    kwargs = dict(extra)
    kwargs["input_ids"] = input_ids
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    fwd = _original_forward(model)
    fwd = fwd.forward if isinstance(fwd, nn.Module) else fwd
    params = inspect.signature(fwd).parameters
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def head_input(model, input_ids, attention_mask=None, **kwargs) -> Tensor:
    """The input of the model's output head, ``[B, T, H]``: the model's forward run up to its head.

    Keyword arguments go to the model's forward (``position_ids``, ``token_type_ids``, ...).
    """
    head = _head(model)
    captured = []

    def hook(module, args, kw):
        captured.append(args[0] if args else next(iter(kw.values())))
        raise _Stop

    # prepended: it stops the forward before a sharding framework's own pre-forward hook would
    # gather the head's weight (the loss's call of the head gathers it)
    handle = head.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        _original_forward(model)(**_forward_kwargs(model, input_ids, attention_mask, kwargs))
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise UnsupportedModelError(
            f"{_arch(model)}: its forward does not call its output head {type(head).__name__} "
            "(it reads the weight directly or uses another head)")
    x = captured[0]
    if x.dim() != 3 or tuple(x.shape[:2]) != tuple(input_ids.shape):
        raise UnsupportedModelError(
            f"{_arch(model)}: its output head's input has shape {tuple(x.shape)}, not "
            f"[batch, tokens, hidden] = [{input_ids.shape[0]}, {input_ids.shape[1]}, H]")
    return x


# ---- the probe -----------------------------------------------------------------------------

_VERDICTS: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()
PROBE_AMPLITUDE = 200.0   # largest |logit| of the amplified probe


def _tolerance(*dtypes) -> float:
    """Agreement expected of two computations of the same logits: the coarser dtype's."""
    return max({torch.float64: 1e-9, torch.float32: 2e-5}.get(d, 3e-2) for d in dtypes)


def _logits_of(out):
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        logits = out[0]
    return logits


def _probe_vocab(model, spec: LogitsTransform, weight: Tensor) -> int:
    """How many token ids a probe may draw from (a sharded head's weight is no guide)."""
    if weight.dim() == 2:
        return min(weight.shape[0], spec.vocab or weight.shape[0])
    return int(spec.vocab or _number(_field(model, "vocab_size")) or 2)


def _probe_length(model, tokens: int = 6) -> int:
    """Tokens per probe row, a length the model accepts: xLSTM in its ``mode="train"`` refuses a
    length that is not a multiple of its ``chunk_size`` (its other modes, and Mamba2's chunks, pad)."""
    config = getattr(model, "config", None)
    chunk = getattr(config, "chunk_size", None)
    if getattr(config, "mode", None) == "train" and isinstance(chunk, int) and chunk > 1:
        return -(-tokens // chunk) * chunk
    return tokens


def _probe(model, spec: LogitsTransform) -> None:
    arch = _arch(model)
    linear = _linear(_head(model))
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
                f"(got {None if not isinstance(x, Tensor) else tuple(x.shape)})")
        w, b, group = _whole(module.weight, getattr(module, "bias", None))
        if group is not None:
            raise UnsupportedModelError(f"{arch}: the probe cannot check a vocabulary-sharded head; "
                                        "check the model before sharding it (check_model)")
        if state["amplify"]:
            synth = torch.randn(x.shape, generator=g, dtype=acc).to(device)
            peak = float(F.linear(synth, w.to(acc)).abs().max())
            x = (synth * (PROBE_AMPLITUDE / max(peak, 1e-30))).to(x.dtype)
        state["ours"] = F.linear(x, w, b)
        state["dtypes"] = (w.dtype, x.dtype)
        return ((x,) + tuple(args[1:]), kw) if args else None

    def run():
        state["calls"] = 0
        out = _original_forward(model)(**_forward_kwargs(model, input_ids, mask, {}))
        logits = _logits_of(out)
        if logits is None:
            raise UnsupportedModelError(f"{arch}: its forward returns no logits to compare with")
        if state["calls"] != 1:
            raise UnsupportedModelError(
                f"{arch}: its forward calls its output head {state['calls']} times (one expected)")
        return logits

    def compare(logits, what):
        ours = spec.apply(state["ours"].to(acc))
        if tuple(ours.shape) != tuple(logits.shape):
            raise UnsupportedModelError(
                f"{arch}: its logits have shape {tuple(logits.shape)}, the head's product after "
                f"{', '.join(spec.found) or 'no transform'} has {tuple(ours.shape)}")
        theirs = logits.to(acc)
        err = float((theirs - ours).abs().max())
        size = max(1.0, float(theirs.abs().max()))
        if not err <= _tolerance(*state["dtypes"], logits.dtype) * size:
            ratio = float((theirs * ours).sum() / ours.square().sum().clamp_min(1e-30))
            raise UnsupportedModelError(
                f"{arch}: its logits are not the head's product after "
                f"{', '.join(spec.found) or 'no transform (plain x @ W.T + b)'}: at {what} logits "
                f"(largest {size:.3g}) they differ by {err:.3g} (best scalar fit x{ratio:.4g}); "
                "it transforms its logits in a way this library does not know")

    vocab = _probe_vocab(model, spec, weight)
    input_ids = torch.randint(0, max(1, min(vocab, 1000)), (2, _probe_length(model)), generator=g).to(device)
    mask = torch.ones_like(input_ids)
    modes = [(m, m.training) for m in model.modules()]
    handle = linear.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, enabled=False), \
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            compare(run(), "natural")
            state["amplify"] = True
            compare(run(), "amplified")
    finally:
        handle.remove()
        for m, training in modes:
            m.training = training


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
    try:
        _head(model)
        spec = logits_transform(model)
        _probe(model, spec)
    except UnsupportedModelError as e:
        _VERDICTS[model] = e
        raise
    _VERDICTS[model] = spec
    return spec


# ---- the functional op ---------------------------------------------------------------------

def causal_lm_gft_loss(model, input_ids, attention_mask, labels, adv, tau=0.7, *, normalizer=None,
                       reduction="mean", return_stats=False, backend="auto", ignore_index=-100,
                       shift_labels=None, check=True, temperature=1.0, loss_options: dict | None = None,
                       **forward_kwargs):
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
    spec = check_model(model) if check else logits_transform(model)
    head = _head(model)
    x = head_input(model, input_ids, attention_mask, **forward_kwargs)
    if shift_labels is None:
        x, targets = x[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels

    def loss_of(weight, bias, x):
        weight, bias, group = _whole(weight, bias, model)
        if spec.vocab is not None and group is not None:
            raise NotImplementedError(f"{_arch(model)}: a vocabulary cut ({spec.vocab}) on a "
                                      "vocabulary-sharded head is not supported")
        if spec.vocab is not None and spec.vocab < weight.shape[0]:
            weight = weight[: spec.vocab]
            bias = None if bias is None else bias[: spec.vocab]
        if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight.dtype)        # as models that cast before the head (Mamba, xLSTM) do
        return gft_loss(x, weight, targets, adv, tau, bias=bias, normalizer=normalizer, reduction=reduction,
                        temperature=temperature / spec.scale,
                        softcap=None if spec.softcap is None else spec.softcap / temperature, backend=backend,
                        ignore_index=ignore_index, return_stats=return_stats, check_values=False,
                        vocab_parallel_group=group, **(loss_options or {}))

    return _call_head(head, loss_of, x)


# ---- patching --------------------------------------------------------------------------------

def _loss_probe(model):
    """Whether the model's own loss shifts its labels (True: position t predicts label t + 1, as
    most causal LMs; False: label t, as the decoders of encoder-decoder families). Refuses a model
    whose own loss is neither cross-entropy of its logits."""
    arch = _arch(model)
    weight = _linear(_head(model)).weight
    device = weight.device
    g = torch.Generator().manual_seed(4321)
    spec = check_model(model)
    vocab = _probe_vocab(model, spec, weight)
    input_ids = torch.randint(0, max(1, min(vocab, 1000)), (2, _probe_length(model)), generator=g).to(device)
    labels = input_ids.clone()
    labels[0, :2] = -100
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            kwargs = _forward_kwargs(model, input_ids, torch.ones_like(input_ids), {})
            try:
                out = _original_forward(model)(labels=labels, **kwargs)
            except Exception as e:
                raise UnsupportedModelError(
                    f"{arch}: its own forward with labels fails on a text batch "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from e
            own = getattr(out, "loss", None)
            logits = _logits_of(out) if own is not None else None
            if own is None:
                raise UnsupportedModelError(f"{arch}: its forward computes no loss from labels")
            acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
            flat = logits.to(acc)
            shifted = F.cross_entropy(flat[:, :-1].reshape(-1, flat.shape[-1]), labels[:, 1:].reshape(-1))
            unshifted = F.cross_entropy(flat.reshape(-1, flat.shape[-1]), labels.reshape(-1))
            tol = _tolerance(weight.dtype, logits.dtype, own.dtype)
            for shift, ce in ((True, shifted), (False, unshifted)):
                if abs(float(own) - float(ce)) <= tol * max(1.0, abs(float(ce))):
                    return shift
            raise UnsupportedModelError(
                f"{arch}: its own loss ({float(own):.6g}) is not the cross-entropy of its logits, "
                f"shifted ({float(shifted):.6g}) or not ({float(unshifted):.6g}): it adds or changes "
                "terms (an auxiliary router loss, a z-loss); a patched forward would silently differ")
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
    check_options(tau, "mean", None, 1.0, None, backend, -100)   # before touching the model
    if "_gft_original_forward" in model.__dict__:
        shift = model.__dict__["_gft_options"].shift
        model.__dict__["_gft_options"] = _PatchOptions(float(tau), backend, shift)
        return model
    shift = _loss_probe(model)
    original = model.forward
    model.__dict__["_gft_original_forward"] = original
    model.__dict__["_gft_options"] = _PatchOptions(float(tau), backend, shift)

    def forward(input_ids=None, attention_mask=None, labels=None, *, advantages=None, tau=None,
                num_items_in_batch=None, return_gft_stats=False, shift_labels=None, **kwargs):
        if labels is None and shift_labels is None:
            if advantages is not None or return_gft_stats:
                raise ValueError("advantages / return_gft_stats need labels")
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        options = model.__dict__["_gft_options"]
        tau_ = options.tau if tau is None else tau
        if shift_labels is None and not options.shift:
            shift_labels = labels       # this model's own loss reads label t at position t
        kwargs.pop("return_dict", None)
        ref = shift_labels if shift_labels is not None else labels
        adv = 1.0 if advantages is None else advantages
        if isinstance(adv, Tensor) and adv.dim() == 2 and shift_labels is None and adv.shape[-1] == ref.shape[-1]:
            adv = adv[:, 1:]
        result = causal_lm_gft_loss(
            model, input_ids, attention_mask, labels, adv, tau_, normalizer=num_items_in_batch,
            return_stats=return_gft_stats, backend=options.backend, shift_labels=shift_labels,
            **kwargs)
        loss, stats = result if return_gft_stats else (result, None)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = CausalLMOutputWithPast(loss=loss)
        if return_gft_stats:
            out.gft_stats = stats
        return out

    forward.__signature__ = inspect.Signature([
        inspect.Parameter("input_ids", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        inspect.Parameter("attention_mask", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        inspect.Parameter("labels", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        *(inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in (
            ("advantages", None), ("tau", None), ("num_items_in_batch", None),
            ("return_gft_stats", False), ("shift_labels", None))),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ])
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
