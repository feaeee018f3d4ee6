"""An independent float64 truth of the whole loss, for the policy-term tests.

Written apart from the library on purpose: no import of gft_kernels. It materializes the
logits, broadcasts the advantages and log-probs by its own rule, and writes every term of the
per-token loss and every reduction out again, so a bug in the library's head, broadcasting or
reductions cannot hide behind the same code in the truth.
"""

from __future__ import annotations

import torch


def _per_token(x, targets):
    """Scalar, one value per sequence ([B] for [B, T, ...]), or anything broadcastable."""
    x = torch.as_tensor(x, dtype=torch.float64, device=targets.device)
    if x.dim() == 1 and targets.dim() >= 2 and x.shape[0] == targets.shape[0]:
        x = x.reshape(-1, *([1] * (targets.dim() - 1)))
    return x.expand(targets.shape).double()


def truth_loss(
    hidden,
    weight,
    bias,
    targets,
    adv,
    tau,
    *,
    reduction="mean",
    normalizer=None,
    temperature=1.0,
    softcap=None,
    old_logp=None,
    clip_low=0.2,
    clip_high=None,
    dual_clip=None,
    ref_logp=None,
    beta=0.0,
    kl="k3",
    entropy_coef=0.0,
    ignore_index=-100,
):
    """The loss in float64 from float64 leaves (gradients by autograd)."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_probs = z - torch.logsumexp(z, dim=-1, keepdim=True)
    valid = targets != ignore_index
    logp = torch.gather(log_probs, -1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    a = _per_token(adv, targets)
    p = logp.detach().exp()
    coef = torch.where(p >= tau, torch.ones_like(p), p)
    if old_logp is None:
        pg = -a * logp
    else:
        high = clip_low if clip_high is None else clip_high
        ratio = torch.exp(logp - _per_token(old_logp, targets))
        pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip_low, 1 + high))
        if dual_clip is not None:
            pg = torch.where(a < 0, torch.minimum(pg, -dual_clip * a), pg)
    loss_t = coef * pg
    if ref_logp is not None and beta:
        d = _per_token(ref_logp, targets) - logp
        loss_t = loss_t + beta * {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[kl]
    loss_t = loss_t - entropy_coef * entropy
    loss_t = torch.where(valid, loss_t, torch.zeros_like(loss_t))
    if reduction == "none":
        return loss_t
    if reduction == "sum":
        return loss_t.sum()
    if reduction == "mean":
        denom = normalizer if normalizer is not None else max(int(valid.sum()), 1)
        return loss_t.sum() / denom
    b = targets.shape[0]
    seq_sum = loss_t.reshape(b, -1).sum(1)
    seq_n = valid.reshape(b, -1).sum(1)
    if reduction == "seq-mean-token-mean":
        seq_sum = seq_sum / seq_n.clamp_min(1)
    denom = normalizer if normalizer is not None else max(int((seq_n > 0).sum()), 1)
    return seq_sum.sum() / denom
