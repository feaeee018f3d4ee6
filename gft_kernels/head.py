"""The GFT head: the few elementwise lines every backend shares.

Every backend turns (hidden, lm_head, targets) into per-token log-probs ``logp [N]`` (and the
entropy of each token's distribution); the loss is then the same function of them for all
(docs/spec.md and ``gft_loss``'s docstring give the formulas):

    C      = sg(p) if p < tau else 1                    # Dynamic Coefficient Rectification
    pg_t   = -A_t * logp_t                              # on-policy (no old_logp)
           = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high))   # r_t = exp(logp_t - old_logp_t)
             (dual clip c, where A_t < 0: min(that, -c A_t))
    loss_t = C_t * pg_t + beta * KL_t(logp_t, ref_logp_t) - entropy_coef * H_t

Autograd through these lines hands the engines exactly ``g_t = dL/dlogp_t`` (and
``dL/dH_t`` for an entropy term); a row where both are zero (ignored token, zero advantage and
no KL or entropy term) is a row the fused backward skips. SFT, DFT and on-policy policy gradient
are settings of this head (tau = 0, tau > 1, tau = 0 with any A); at ``old_logp = sg(logp)``
(r = 1) the clipped objective's gradient is the on-policy one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

# Per-token KL estimators of KL(model || ref), with d = ref_logp - logp (Schulman's k1, k2, k3).
KL_ESTIMATORS = ("k1", "k2", "k3")
# Reductions of the per-token losses; the "seq-" ones need targets of shape [B, T, ...] (a
# sequence per row) or a packed layout (``seq_ids`` / ``cu_seqlens``: the sequences of a row).
REDUCTIONS = ("mean", "sum", "none", "seq-mean-token-mean", "seq-mean-token-sum")


@dataclass(frozen=True)
class PolicyTerms:
    """The GRPO-family terms of the per-token loss beyond GFT (all optional; flat ``[N]`` tensors)."""

    old_logp: Tensor | None = None  # behaviour policy's log-probs: importance ratio and clipping
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    ref_logp: Tensor | None = None  # reference model's log-probs: KL penalty
    beta: float = 0.0
    kl: str = "k3"
    entropy_coef: float = 0.0

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef != 0.0


@dataclass(frozen=True)
class GFTStats:
    """Monitoring values computed in the same pass as the loss (all detached).

    logp:           per-token log-prob of the target, fp32 (fp64 for fp64 inputs), shape of
                    ``targets``; 0 at ignored tokens.
    entropy:        per-token entropy of the (temperature/softcap-scaled) distribution, same
                    shape; 0 at ignored tokens.
    rectified_frac: 0-dim, fraction of valid tokens whose coefficient is sg(p), i.e. p < tau.
    mean_prob:      0-dim, mean target probability over valid tokens.
    n_valid:        0-dim int64, number of valid (non-ignored) tokens.
    accuracy:       0-dim, fraction of valid tokens whose target has the largest logit.
    ratio_mean:     0-dim, mean importance ratio exp(logp - old_logp) over valid tokens (1 without old_logp).
    clip_frac:      0-dim, fraction of valid tokens where clipping zeroes the gradient (the ratio
                    is past 1 + eps_high with A > 0, or below 1 - eps_low with A < 0, or the dual
                    clip holds).
    kl_mean:        0-dim, mean per-token KL estimate over valid tokens (0 without ref_logp).
    """

    logp: Tensor
    entropy: Tensor
    rectified_frac: Tensor
    mean_prob: Tensor
    n_valid: Tensor
    accuracy: Tensor
    ratio_mean: Tensor
    clip_frac: Tensor
    kl_mean: Tensor


def dcr_coefficient(logp: Tensor, tau: float) -> Tensor:
    """C(p) of Eq. 5, detached: p where p < tau, 1 where p >= tau (the paper: 1 at p == tau)."""
    p = logp.detach().exp()
    return torch.where(p < tau, p, torch.ones_like(p))


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(model || ref) from the sampled token's log-probs."""
    d = ref_logp.to(logp.dtype) - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    return torch.expm1(d) - d  # k3 = exp(d) - d - 1, unbiased and >= 0


def _policy_gradient_term(logp: Tensor, adv: Tensor, terms: PolicyTerms):
    """(pg_t, ratio, clipped) per token: -A logp on-policy, the (dual-)clipped surrogate off-policy."""
    if terms.old_logp is None:
        return -adv * logp, None, None
    ratio = torch.exp(logp - terms.old_logp.to(logp.dtype))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - terms.clip_low, 1.0 + terms.clip_high)
    pg = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    if terms.dual_clip is not None:
        floor = -adv * terms.dual_clip
        dual = (adv < 0) & (floor < pg)
        pg = torch.where(adv < 0, torch.minimum(pg, floor), pg)
        is_clipped = is_clipped | dual
    return pg, ratio, is_clipped


def per_token_loss(logp, entropy, valid, adv, tau, terms: PolicyTerms):
    """``loss_t`` for flat ``[N]`` inputs (0 at ignored tokens), and what the stats need."""
    adv = adv.to(logp.dtype)
    pg, ratio, clipped = _policy_gradient_term(logp, adv, terms)
    loss = dcr_coefficient(logp, tau) * pg
    kl = None
    if terms.ref_logp is not None:
        kl = kl_estimate(logp, terms.ref_logp, terms.kl)
        if terms.beta:
            loss = loss + terms.beta * kl
    if terms.entropy_coef:
        loss = loss - terms.entropy_coef * entropy
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, dict(ratio=ratio, clipped=clipped, kl=kl)


def _denominator(count: Tensor, normalizer, like: Tensor) -> Tensor:
    if normalizer is None:
        # nothing to count: 0 / 1 = 0, and every gradient is 0 (never 0 / 0 = NaN)
        return count.clamp_min(1).to(like.dtype)
    if isinstance(normalizer, Tensor):
        return normalizer.to(device=like.device, dtype=like.dtype).reshape(())
    return torch.tensor(float(normalizer), device=like.device, dtype=like.dtype)


class Sequences(NamedTuple):
    """The sequences of a packed (varlen) layout: each flat token's sequence index ``[N]`` (int64)
    and ``count``, the size of the per-sequence buffers (every index is below it)."""

    index: Tensor
    count: int


def reduction_weights(
    valid: Tensor, reduction: str, normalizer, shape: torch.Size, dtype, sequences: Sequences | None = None
) -> Tensor:
    """Per-token weights w_t, flat, with the loss ``sum_t w_t loss_t``: the one definition of
    every reduction but "none" (``reduce_loss`` applies it; the chunked engine's one-pass path
    weights its tokens with it). ``shape`` is the targets'; the sequences of the "seq-"
    reductions are its leading dim, or those of a packed layout (``sequences``)."""
    ones = valid.to(dtype)
    if reduction == "sum":
        return ones
    if reduction == "mean":
        return ones / _denominator(valid.sum(), normalizer, ones)
    # per sequence, then the mean over sequences with a valid token
    if sequences is None:
        counts = valid.reshape(shape[0], -1).sum(dim=1, keepdim=True)
        per_seq = valid.reshape(shape[0], -1).to(dtype)
        if reduction == "seq-mean-token-mean":
            per_seq = per_seq / counts.clamp_min(1).to(dtype)
        return (per_seq / _denominator((counts > 0).sum(), normalizer, ones)).reshape(-1)
    counts = torch.zeros(sequences.count, dtype=torch.int64, device=valid.device)
    counts = counts.index_add_(0, sequences.index, valid.to(torch.int64))
    if reduction == "seq-mean-token-mean":
        ones = ones / counts.clamp_min(1)[sequences.index].to(dtype)
    return ones / _denominator((counts > 0).sum(), normalizer, ones)


def reduce_loss(
    loss_tok: Tensor, valid: Tensor, reduction: str, normalizer, shape: torch.Size, sequences: Sequences | None = None
) -> Tensor:
    """The reductions of ``gft_loss`` (``loss_tok``, ``valid`` flat; ``shape`` the targets')."""
    if reduction == "none":
        return loss_tok.reshape(shape)
    weights = reduction_weights(valid, reduction, normalizer, shape, loss_tok.dtype, sequences)
    return (loss_tok * weights).sum()


# The one map from a loss aggregation's name to the op's reduction and what its normalizer
# counts. The names are verl's ``loss_agg_mode`` (the trainer's ``--loss-aggregation`` takes
# them): the mean over all tokens (DAPO); the mean over sequences of each one's token mean
# (GRPO) or token sum; the token sum over sequences x max_length (Dr. GRPO's constant).
AGGREGATION_REDUCTIONS = {
    "token-mean": ("mean", "tokens"),
    "seq-mean-token-mean": ("seq-mean-token-mean", "sequences"),
    "seq-mean-token-sum": ("seq-mean-token-sum", "sequences"),
    "seq-mean-token-sum-norm": ("mean", "sequences x max_length"),
}
AGGREGATIONS = tuple(AGGREGATION_REDUCTIONS)
# TRL's ``loss_type`` as one of these aggregations (the counts it normalizes by are TRL's: the
# global or the local tokens, the micro-batch's sequences; gft_train.integrations.trl).
TRL_LOSS_TYPES = {
    "dapo": "token-mean",
    "cispo": "token-mean",
    "bnpo": "token-mean",
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "luspo": "seq-mean-token-sum",
    "dr_grpo": "seq-mean-token-sum-norm",
}


def aggregation_reduction(name: str, n_tokens=None, n_seqs=None, max_length: int | None = None):
    """``(reduction, normalizer)`` of ``gft_loss`` that computes the aggregation ``name`` over a batch
    of ``n_tokens`` valid tokens in ``n_seqs`` sequences (global counts, so every micro-batch and
    process divides by the same number; numbers or one-element tensors). Without the counts the
    normalizer is None: the reduction alone, fixed for a run, as a ``GFTLoss`` is built."""
    if name not in AGGREGATION_REDUCTIONS:
        raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {name!r}")
    reduction, counted = AGGREGATION_REDUCTIONS[name]
    if n_tokens is None and n_seqs is None:
        return reduction, None
    if counted == "tokens":
        return reduction, _at_least_tiny(n_tokens)
    if counted == "sequences":
        return reduction, _at_least_tiny(n_seqs)
    return reduction, _at_least_tiny(n_seqs) * max_length


def _at_least_tiny(count):
    # a batch with nothing to count divides 0 by a tiny positive number: 0, never 0 / 0
    return count.clamp_min(1e-9) if isinstance(count, Tensor) else max(count, 1e-9)


def head_stats(
    logp: Tensor, entropy: Tensor, target_is_max: Tensor, valid: Tensor, tau: float, aux: dict, shape: torch.Size
) -> GFTStats:
    logp = logp.detach()
    n_valid = valid.sum()
    count = n_valid.clamp_min(1).to(logp.dtype)

    def mean(x):
        return torch.where(valid, x.detach().to(logp.dtype), torch.zeros_like(logp)).sum() / count

    p = torch.where(valid, logp.exp(), torch.zeros_like(logp))
    zero = torch.zeros((), device=logp.device, dtype=logp.dtype)
    return GFTStats(
        logp=logp.reshape(shape),
        entropy=torch.where(valid, entropy.detach(), torch.zeros_like(logp)).reshape(shape),
        rectified_frac=(valid & (p < tau)).sum().to(logp.dtype) / count,
        mean_prob=p.sum() / count,
        n_valid=n_valid,
        accuracy=mean(target_is_max),
        ratio_mean=mean(aux["ratio"]) if aux["ratio"] is not None else (n_valid > 0).to(logp.dtype),
        clip_frac=mean(aux["clipped"]) if aux["clipped"] is not None else zero,
        kl_mean=mean(aux["kl"]) if aux["kl"] is not None else zero,
    )
