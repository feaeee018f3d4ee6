"""Argument checks of the public API. Every message names the argument and the value seen.

Shape, dtype and option checks cost nothing. Value checks (target ids in range, finite
advantages, positive normalizer) read tensor contents: one host sync on CUDA, combined into a
single ``.item()``; ``check_values=False`` skips them.
"""

from __future__ import annotations

import numbers
import warnings

import torch
from torch import Tensor, nn

from .engine import Engine, KernelOptions, describe, select
from .head import Sequences

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
        raise TypeError(
            f"hidden and lm_head must have the same dtype, got hidden {hidden.dtype} and lm_head {weight.dtype}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"hidden and lm_head must be on the same device, got {hidden.device} and {weight.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(
                f"bias must match hidden's dtype and device ({hidden.dtype}, {hidden.device}), got ({bias.dtype}, {bias.device})"
            )
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be an integer tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"targets must be on hidden's device {hidden.device}, got {targets.device}")
    return targets.long(), broadcast_adv(adv, targets)


def _per_token(name: str, x, targets: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a float tensor of per-token log-probs or None, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.device != targets.device:
        raise ValueError(f"{name} must be on the targets' device {targets.device}, got {x.device}")
    return broadcast_adv(x, targets, name)


def check_policy_tensors(targets, reduction, old_logp, ref_logp, packed: bool = False) -> dict:
    """The per-token log-probs by name, broadcast to targets' shape (for the value checks)."""
    if reduction.startswith("seq-") and targets.dim() < 2 and not packed:
        raise ValueError(
            f"reduction={reduction!r} needs targets of shape [B, T, ...] (sequences first), "
            f"got shape {tuple(targets.shape)}"
        )
    per_token = {}
    if old_logp is not None:
        per_token["old_logp"] = _per_token("old_logp", old_logp, targets)
    if ref_logp is not None:
        per_token["ref_logp"] = _per_token("ref_logp", ref_logp, targets)
    return per_token


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


def check_input_values(
    targets: Tensor,
    adv: Tensor,
    normalizer,
    vocab: int,
    ignore_index: int,
    per_token: dict | None = None,
    layout: tuple = (),
) -> None:
    """Content checks, one host sync for all of them; details are computed only on failure.
    Per-token log-probs (``per_token``: name -> tensor of targets' shape) must be finite and
    <= 0 at valid tokens (anything at ignored ones). ``layout``: a packed layout's checks, pairs
    of (0-dim bool flag, the message when it is set) from ``layout_value_checks``."""
    valid = targets != ignore_index
    bad_target = valid & ((targets < 0) | (targets >= vocab))
    bad_adv = ~torch.isfinite(adv)
    bad_logp = {name: valid & ~(torch.isfinite(x) & (x <= 0)) for name, x in (per_token or {}).items()}
    flags = [bad_target.any(), bad_adv.any(), *(b.any() for b in bad_logp.values())]
    if isinstance(normalizer, Tensor):
        flags.append(~(normalizer.reshape(()) > 0))
    layout_flags = [flag for flag, _ in layout]
    if not torch.stack(flags + layout_flags).any().item():
        return
    for flag, message in layout:
        if flag:
            raise ValueError(message())
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


_INT_DTYPES = (torch.int32, torch.int64)


def _layout_tensor(name: str, x, device) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {type(x).__name__}")
    if x.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on the targets' device {device}, got {x.device}")
    return x


def check_layout(targets: Tensor, adv, seq_ids=None, cu_seqlens=None) -> tuple[Sequences | None, object]:
    """A packed (varlen) layout, checked by shape and dtype: ``(Sequences, adv)`` with ``adv``
    per token where it was one per sequence (``[S]``); ``(None, adv)`` without a layout.

    ``seq_ids``: each token's sequence, targets' shape or flat ``[N]``, in ``[0, S)`` where ``S``
    is ``len(adv)`` for a per-sequence ``adv``, else ``N``. ``cu_seqlens``: int ``[S + 1]``, the
    sequences' cumulative lengths over the flat tokens (flash-attention's name and layout; an
    empty sequence is allowed). Their values are checked by ``layout_value_checks``."""
    if seq_ids is None and cu_seqlens is None:
        return None, adv
    if seq_ids is not None and cu_seqlens is not None:
        raise ValueError("pass one packed layout: seq_ids or cu_seqlens, not both")
    n = targets.numel()
    per_sequence = isinstance(adv, Tensor) and adv.dim() == 1 and adv.shape[0] != n
    if per_sequence and adv.shape[0] == 0:
        raise ValueError(f"adv has no entry (shape (0,)) but targets have {n} tokens")
    if seq_ids is not None:
        seq_ids = _layout_tensor("seq_ids", seq_ids, targets.device)
        if seq_ids.shape != targets.shape and seq_ids.shape != (n,):
            raise ValueError(
                f"seq_ids must have targets' shape {tuple(targets.shape)} or [N] = ({n},), got {tuple(seq_ids.shape)}"
            )
        index = seq_ids.reshape(-1).to(torch.int64)
        count = adv.shape[0] if per_sequence else n
    else:
        cu_seqlens = _layout_tensor("cu_seqlens", cu_seqlens, targets.device)
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
            raise ValueError(
                f"cu_seqlens must have shape [S + 1] (cumulative sequence lengths, 0 first), "
                f"got {tuple(cu_seqlens.shape)}"
            )
        count = cu_seqlens.shape[0] - 1
        if count == 0 and n > 0:
            raise ValueError(f"cu_seqlens has no sequence (shape (1,)) but targets have {n} tokens")
        if per_sequence and adv.shape[0] != count:
            raise ValueError(
                f"adv of shape {tuple(adv.shape)} is neither per token (N = {n}) nor per sequence "
                f"(S = {count}, from cu_seqlens of shape {tuple(cu_seqlens.shape)})"
            )
        positions = torch.arange(n, device=targets.device)
        index = torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)
    sequences = Sequences(index, count)
    if per_sequence:
        adv = adv.index_select(0, index.clamp(0, max(adv.shape[0] - 1, 0))).reshape(targets.shape)
    elif isinstance(adv, Tensor) and adv.dim() == 1 and targets.dim() != 1:
        adv = adv.reshape(targets.shape)  # [N], one per flat token
    return sequences, adv


def layout_value_checks(sequences: Sequences, seq_ids, cu_seqlens) -> tuple:
    """The layout's value checks as ``check_input_values`` takes them: (flag, message) pairs."""
    if seq_ids is not None:
        index, count = sequences.index, sequences.count
        bad = (index < 0) | (index >= count)
        return (
            (
                bad.any(),
                lambda: f"seq_ids must be in [0, {count}) (the number of sequences: len(adv) for one "
                f"advantage per sequence, else the number of tokens); found {index[bad].unique()[:8].tolist()}",
            ),
        )
    cu = cu_seqlens.to(torch.int64)
    n = sequences.index.shape[0]
    steps = cu[1:] - cu[:-1]
    return (
        (cu[0] != 0, lambda: f"cu_seqlens must start at 0, got {cu[0].item()}"),
        ((steps < 0).any(), lambda: f"cu_seqlens must be non-decreasing (cumulative lengths), got {cu[:16].tolist()}"),
        (cu[-1] != n, lambda: f"cu_seqlens must end at the number of tokens N = {n}, got {cu[-1].item()}"),
    )


_auto_warned: set = set()


def choose_engine(backend: str, hidden: Tensor, options: KernelOptions | None = None, op: str = "gft_loss") -> Engine:
    """``engine.select``'s engine; when ``"auto"`` passed over an engine that serves this
    device (an untested GPU, a missing package), it says why, once per device and reason."""
    choice = select(backend, hidden, KernelOptions() if options is None else options)
    if choice.passed_over is not None:
        key = (str(hidden.device), choice.reason)
        if key not in _auto_warned:
            _auto_warned.add(key)
            warnings.warn(
                f"{op}(backend='auto') uses {describe(choice.engine)} on {hidden.device}: {choice.reason} "
                f"(backend={choice.passed_over!r} forces it)",
                stacklevel=4,
            )
    return choice.engine


def check_backend(backend: str, hidden: Tensor, options: KernelOptions = KernelOptions()) -> str:  # noqa: B008 (frozen)
    """The name of the engine that runs (``choose_engine``)."""
    return choose_engine(backend, hidden, options).name
