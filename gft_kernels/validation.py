"""Argument checks of the public API. Every message names the argument and the value seen.

Shape, dtype and option checks cost nothing. Value checks (target ids in range, finite
advantages, positive normalizer) read tensor contents: one host sync on CUDA, combined into a
single ``.item()``; ``check_values=False`` skips them.
"""
from __future__ import annotations

import math
import numbers
import os
import warnings

import torch
from torch import Tensor, nn

from .head import KL_ESTIMATORS, REDUCTIONS, PolicyTerms

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
        if reduction in ("sum", "none"):
            raise ValueError(f"normalizer applies to reduction='mean' and the 'seq-' reductions, got reduction={reduction!r}")
        if isinstance(normalizer, Tensor):
            if normalizer.numel() != 1:
                raise ValueError(f"normalizer must be a number or a one-element tensor, got shape {tuple(normalizer.shape)}")
        else:
            normalizer = _real("normalizer", normalizer)
            if normalizer <= 0:
                raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return tau, temperature, softcap, normalizer


def check_launch_options(launch_options) -> None:
    if launch_options is not None:
        from .triton_ops import LaunchOptions
        if not isinstance(launch_options, LaunchOptions):
            raise TypeError(f"launch_options must be a gft_kernels.triton_ops.LaunchOptions or None, "
                            f"got {type(launch_options).__name__}")


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


def check_scalar_policy_options(clip_low, clip_high, dual_clip, beta, kl, entropy_coef) -> tuple:
    """The GRPO-family scalars; returns (clip_low, clip_high, dual_clip, beta, entropy_coef) as floats."""
    clip_low = _real("clip_low", clip_low)
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1) (the ratio is clipped below at 1 - clip_low), got {clip_low}")
    clip_high = clip_low if clip_high is None else _real("clip_high", clip_high, allow_inf=True)
    if clip_high < 0:
        raise ValueError(f"clip_high must be >= 0 (the ratio is clipped above at 1 + clip_high), got {clip_high}")
    if dual_clip is not None:
        dual_clip = _real("dual_clip", dual_clip)
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 or None, got {dual_clip}")
    beta = _real("beta", beta)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {kl!r}")
    entropy_coef = _real("entropy_coef", entropy_coef)
    return clip_low, clip_high, dual_clip, beta, entropy_coef


def _per_token(name: str, x, targets: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a float tensor of per-token log-probs or None, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.device != targets.device:
        raise ValueError(f"{name} must be on the targets' device {targets.device}, got {x.device}")
    return broadcast_adv(x, targets, name)


def check_policy_terms(targets, reduction, normalizer, old_logp, clip_low, clip_high, dual_clip, ref_logp, beta, kl,
                       entropy_coef) -> tuple[PolicyTerms, dict]:
    """The GRPO-family options as a ``PolicyTerms`` (log-probs flat), and the per-token tensors
    by name (for the value checks)."""
    clip_low, clip_high, dual_clip, beta, entropy_coef = check_scalar_policy_options(
        clip_low, clip_high, dual_clip, beta, kl, entropy_coef)
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (the reference model's per-token log-probs)")
    if reduction.startswith("seq-") and targets.dim() < 2:
        raise ValueError(f"reduction={reduction!r} needs targets of shape [B, T, ...] (sequences first), "
                         f"got shape {tuple(targets.shape)}")
    per_token = {}
    if old_logp is not None:
        per_token["old_logp"] = _per_token("old_logp", old_logp, targets)
    if ref_logp is not None:
        per_token["ref_logp"] = _per_token("ref_logp", ref_logp, targets)
    flat = {k: v.reshape(-1) for k, v in per_token.items()}
    terms = PolicyTerms(old_logp=flat.get("old_logp"), clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                        ref_logp=flat.get("ref_logp"), beta=beta, kl=kl, entropy_coef=entropy_coef)
    return terms, per_token


def broadcast_adv(adv, targets: Tensor, name: str = "adv") -> Tensor:
    """adv as a float tensor of targets' shape: a scalar, one value per sequence [B], or per token."""
    if isinstance(adv, bool) or not isinstance(adv, (Tensor, numbers.Real)):
        raise TypeError(f"{name} must be a number or a float tensor, got {type(adv).__name__}")
    if not isinstance(adv, Tensor):
        adv = torch.tensor(float(adv), device=targets.device)
    if not adv.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {adv.dtype}")
    if adv.device != targets.device:
        raise ValueError(f"{name} must be on the targets' device {targets.device}, got {adv.device}")
    if adv.dim() == 1 and targets.dim() >= 2 and adv.shape[0] == targets.shape[0]:
        # [B] for [B, T]: one advantage per sequence (this reading wins over trailing-dim broadcasting)
        adv = adv.reshape(adv.shape[0], *([1] * (targets.dim() - 1)))
    try:
        return torch.broadcast_to(adv, targets.shape)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(adv.shape)} does not broadcast to targets' shape {tuple(targets.shape)} "
            f"(expected a scalar, [B] = ({targets.shape[0] if targets.dim() else 1},), or per token)"
        ) from None


def check_input_values(targets: Tensor, adv: Tensor, normalizer, vocab: int, ignore_index: int,
                       per_token: dict | None = None) -> None:
    """Content checks, one host sync for all of them; details are computed only on failure.
    Per-token log-probs (``per_token``: name -> tensor of targets' shape) must be finite and
    <= 0 at valid tokens (anything at ignored ones)."""
    valid = targets != ignore_index
    bad_target = valid & ((targets < 0) | (targets >= vocab))
    bad_adv = ~torch.isfinite(adv)
    bad_logp = {name: valid & ~(torch.isfinite(x) & (x <= 0)) for name, x in (per_token or {}).items()}
    flags = [bad_target.any(), bad_adv.any(), *(b.any() for b in bad_logp.values())]
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
    for name, bad in bad_logp.items():
        if bad.any():
            seen = per_token[name][bad].unique()[:8].tolist()
            raise ValueError(f"{name} must be finite log-probs (<= 0) at valid tokens; found {seen}")
    raise ValueError(f"normalizer must be > 0, got {normalizer.reshape(()).item()}")


# What the Triton engine is built and checked for: NVIDIA GPUs of compute capability 8.0 or
# later whose blocks can opt into the shared memory of its largest default tile (144 KiB: the
# A100, H100, H200 and later data-centre parts; not the 99-KiB consumer cards), and the Triton
# the package requires (pyproject.toml: triton>=3.2; tests/test_validation.py keeps them equal).
TRITON_MIN_CAPABILITY = (8, 0)
TRITON_MIN_SHARED_BYTES = 144 * 1024
TRITON_MIN_VERSION = (3, 2)
_auto_warned: set = set()


def triton_unsupported_reason(device: torch.device) -> str | None:
    """Why ``backend="auto"`` does not take the Triton engine on this CUDA device, or None."""
    if getattr(torch.version, "hip", None):
        return "ROCm GPUs are not a target the Triton engine is checked on"
    try:
        import triton
    except ImportError:
        return "the triton package is not installed"
    version = tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit())
    if version < TRITON_MIN_VERSION:
        return f"triton {triton.__version__} is older than {'.'.join(map(str, TRITON_MIN_VERSION))}"
    capability = torch.cuda.get_device_capability(device)
    if capability < TRITON_MIN_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]} is below {TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]}"
    shared = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
    if shared is None:  # an unknown amount is not a pass: the kernels would fail at launch
        return "this torch does not report the shared memory a block can use (shared_memory_per_block_optin)"
    if shared < TRITON_MIN_SHARED_BYTES:
        return f"blocks can use {shared // 1024} KiB of shared memory, the kernels' tiles need {TRITON_MIN_SHARED_BYTES // 1024}"
    return None


def check_backend(backend: str, hidden: Tensor) -> str:
    if backend == "auto":
        if not hidden.is_cuda or hidden.dtype == torch.float64:
            return "torch"
        reason = triton_unsupported_reason(hidden.device)
        if reason is None:
            return "triton"
        key = (str(hidden.device), reason)
        if key not in _auto_warned:
            _auto_warned.add(key)
            warnings.warn(f"gft_loss(backend='auto') uses the chunked torch engine on {hidden.device}: {reason} "
                          "(backend='triton' forces the Triton engine)", stacklevel=3)
        return "torch"
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
