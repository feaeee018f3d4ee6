"""Argument checks of the public API. Every message names the argument and the value seen.

Shape, dtype and option checks cost nothing. Value checks (target ids in range, finite
advantages, positive normalizer) read tensor contents: one host sync on CUDA, combined into a
single ``.item()``; ``check_values=False`` skips them.
"""
from __future__ import annotations

import math
import numbers
import os

import torch
from torch import Tensor, nn

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _real(name: str, value, *, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def split_lm_head(lm_head, bias):
    """``lm_head`` as a [V, H] weight (and the bias an nn.Linear carries)."""
    if isinstance(lm_head, nn.Linear):
        if lm_head.bias is not None:
            if bias is not None:
                raise ValueError("bias was passed, but lm_head is an nn.Linear that has its own bias; pass one of them")
            bias = lm_head.bias
        return lm_head.weight, bias
    if not isinstance(lm_head, Tensor):
        raise TypeError(f"lm_head must be a [V, H] tensor or an nn.Linear, got {type(lm_head).__name__}")
    return lm_head, bias


def check_options(tau, reduction, normalizer, temperature, softcap, backend, ignore_index):
    tau = _real("tau", tau, allow_inf=True)
    if tau < 0:
        raise ValueError(f"tau must be >= 0 (0: plain SFT/policy gradient, > 1: DFT), got {tau}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    temperature = _real("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None:
        softcap = _real("softcap", softcap)
        if softcap <= 0:
            raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if normalizer is not None:
        if reduction != "mean":
            raise ValueError(f"normalizer only applies to reduction='mean', got reduction={reduction!r}")
        if isinstance(normalizer, Tensor):
            if normalizer.numel() != 1:
                raise ValueError(f"normalizer must be a number or a one-element tensor, got shape {tuple(normalizer.shape)}")
        else:
            normalizer = _real("normalizer", normalizer)
            if normalizer <= 0:
                raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return tau, temperature, softcap, normalizer


def check_tensors(hidden, weight, bias, targets, adv) -> tuple[Tensor, Tensor]:
    """Shapes, dtypes, devices. Returns (targets as int64, adv broadcast to targets' shape)."""
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a tensor, got {type(hidden).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"lm_head must have shape [V, H], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head is [V, H] = {tuple(weight.shape)} but hidden's last dim is H = {hidden.shape[-1]}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"lm_head must have V >= 1 and H >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and lm_head must have the same dtype, got hidden {hidden.dtype} and lm_head {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"hidden and lm_head must be on the same device, got {hidden.device} and {weight.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(f"bias must match hidden's dtype and device ({hidden.dtype}, {hidden.device}), got ({bias.dtype}, {bias.device})")
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be an integer tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    if targets.device != hidden.device:
        raise ValueError(f"targets must be on hidden's device {hidden.device}, got {targets.device}")
    return targets.long(), broadcast_adv(adv, targets)


def broadcast_adv(adv, targets: Tensor) -> Tensor:
    """adv as a float tensor of targets' shape: a scalar, one value per sequence [B], or per token."""
    if isinstance(adv, bool) or not isinstance(adv, (Tensor, numbers.Real)):
        raise TypeError(f"adv must be a number or a float tensor, got {type(adv).__name__}")
    if not isinstance(adv, Tensor):
        adv = torch.tensor(float(adv), device=targets.device)
    if not adv.dtype.is_floating_point:
        raise TypeError(f"adv must be a floating tensor, got {adv.dtype}")
    if adv.device != targets.device:
        raise ValueError(f"adv must be on the targets' device {targets.device}, got {adv.device}")
    if adv.dim() == 1 and targets.dim() >= 2 and adv.shape[0] == targets.shape[0]:
        # [B] for [B, T]: one advantage per sequence (this reading wins over trailing-dim broadcasting)
        adv = adv.reshape(adv.shape[0], *([1] * (targets.dim() - 1)))
    try:
        return torch.broadcast_to(adv, targets.shape)
    except RuntimeError:
        raise ValueError(
            f"adv of shape {tuple(adv.shape)} does not broadcast to targets' shape {tuple(targets.shape)} "
            f"(expected a scalar, [B] = ({targets.shape[0] if targets.dim() else 1},), or per token)"
        ) from None


def check_input_values(targets: Tensor, adv: Tensor, normalizer, vocab: int, ignore_index: int) -> None:
    """Content checks, one host sync for all of them; details are computed only on failure."""
    bad_target = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    bad_adv = ~torch.isfinite(adv)
    flags = [bad_target.any(), bad_adv.any()]
    if isinstance(normalizer, Tensor):
        flags.append(~(normalizer.reshape(()) > 0))
    if not torch.stack(flags).any().item():
        return
    if flags[0]:
        seen = targets[bad_target].unique()[:8].tolist()
        raise ValueError(f"targets must be in [0, V={vocab}) or ignore_index={ignore_index}; found {seen}")
    if flags[1]:
        seen = adv[bad_adv].unique()[:8].tolist()
        raise ValueError(f"adv must be finite; found {seen}")
    raise ValueError(f"normalizer must be > 0, got {normalizer.reshape(()).item()}")


def check_backend(backend: str, hidden: Tensor) -> str:
    if backend == "auto":
        return "triton" if hidden.is_cuda and hidden.dtype != torch.float64 else "torch"
    if backend == "triton":
        if hidden.dtype == torch.float64:
            raise TypeError("backend='triton' supports float16, bfloat16 and float32 inputs, got float64 (use backend='reference')")
        if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {hidden.device}); on a CPU it runs only "
                "under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)"
            )
        try:
            import triton  # noqa: F401
        except ImportError as err:
            raise ValueError("backend='triton' needs the triton package (pip install 'gft[triton]')") from err
    return backend
