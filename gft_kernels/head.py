"""The GFT head: the few elementwise lines every backend shares.

Every backend turns (hidden, lm_head, targets) into per-token log-probs ``logp [N]``; the
loss is then the same function of ``logp`` for all of them (docs/spec.md):

    p      = exp(logp)
    C      = sg(p) if p < tau else 1          # Dynamic Coefficient Rectification, Eq. 5
    loss_t = -A_t * C_t * logp_t              # 0 at ignored tokens

Autograd through these lines hands the backends exactly ``g_t = dL/dlogp_t``; a zero ``g_t``
(ignored token, zero advantage) is a row the fused backward skips. SFT, DFT and on-policy
policy gradient are settings of this head (tau = 0, tau > 1, tau = 0 with any A).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GFTStats:
    """Monitoring values computed in the same pass as the loss (all detached).

    logp:           per-token log-prob of the target, fp32 (fp64 for fp64 inputs), shape of
                    ``targets``; 0 at ignored tokens.
    entropy:        per-token entropy of the (temperature/softcap-scaled) distribution, same shape;
                    0 at ignored tokens. Forward-only: it carries no gradient.
    rectified_frac: 0-dim, fraction of valid tokens whose coefficient is sg(p), i.e. p < tau.
    mean_prob:      0-dim, mean target probability over valid tokens.
    n_valid:        0-dim int64, number of valid (non-ignored) tokens.
    """

    logp: Tensor
    entropy: Tensor
    rectified_frac: Tensor
    mean_prob: Tensor
    n_valid: Tensor


def dcr_coefficient(logp: Tensor, tau: float) -> Tensor:
    """C(p) of Eq. 5, detached: p where p < tau, 1 where p >= tau (the paper: 1 at p == tau)."""
    p = logp.detach().exp()
    return torch.where(p < tau, p, torch.ones_like(p))


def gft_head(
    logp: Tensor,
    valid: Tensor,
    adv: Tensor,
    tau: float,
    reduction: str,
    normalizer: float | Tensor | None,
) -> Tensor:
    """Loss from per-token log-probs. ``logp``, ``valid``, ``adv`` are flat ``[N]``."""
    coef = dcr_coefficient(logp, tau)
    weight = torch.where(valid, adv.to(logp.dtype) * coef, torch.zeros_like(coef))
    loss_tok = -(weight * logp)
    if reduction == "none":
        return loss_tok
    total = loss_tok.sum()
    if reduction == "sum":
        return total
    if normalizer is None:
        # All tokens ignored: 0 / 1 = 0, and every gradient is 0 (never 0 / 0 = NaN).
        denom = valid.sum().clamp_min(1).to(logp.dtype)
    elif isinstance(normalizer, Tensor):
        denom = normalizer.to(device=logp.device, dtype=logp.dtype).reshape(())
    else:
        denom = torch.tensor(float(normalizer), device=logp.device, dtype=logp.dtype)
    return total / denom


def head_stats(logp: Tensor, entropy: Tensor, valid: Tensor, tau: float, shape: torch.Size) -> GFTStats:
    logp = logp.detach()
    n_valid = valid.sum()
    count = n_valid.clamp_min(1).to(logp.dtype)
    p = torch.where(valid, logp.exp(), torch.zeros_like(logp))
    rectified = (valid & (p < tau)).sum().to(logp.dtype)
    return GFTStats(
        logp=logp.reshape(shape),
        entropy=torch.where(valid, entropy.detach(), torch.zeros_like(logp)).reshape(shape),
        rectified_frac=rectified / count,
        mean_prob=p.sum() / count,
        n_valid=n_valid,
    )
