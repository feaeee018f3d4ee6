"""The chunked pure-PyTorch engine: bounded memory, any device, the CPU default.

Rows are processed in chunks of ``C`` tokens; one ``[C x V]`` fp32 logits buffer (plus a
``[C x V]`` half buffer for bf16/fp16 inputs) is allocated once and reused with ``out=`` and
in-place ops, so the peak stays near ``C x V`` floats instead of ``N x V`` (with glibc malloc,
allocating a fresh chunk per step lets the resident size creep up; see the README's memory
numbers). Only valid rows (forward) and rows with ``g != 0`` (backward) are computed; on CUDA,
where selecting them would cost a host sync, every row is processed instead.

Precision: the logits product is done in the input dtype (as naive PyTorch does), the
softmax in fp32 (float64 for float64 inputs); dlm_head is accumulated over chunks in that
precision from ``dz`` in that precision.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .fused import RowStats, finish_logprob, rows_from_partials

# Bytes of one fp32 [C x V] chunk buffer; C = max(1, CHUNK_BYTES // (4 V)).
CHUNK_BYTES = 32 * 1024 * 1024


def _chunk_rows(n: int, v: int) -> int:
    return max(1, min(n, CHUNK_BYTES // (4 * max(v, 1))))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _selected_rows(mask: Tensor) -> Tensor | None:
    """Indices of rows to compute, or None for 'all rows' (CUDA: no host sync)."""
    if mask.is_cuda:
        return None
    return mask.nonzero().squeeze(1)


class _LogitsChunk:
    """Reusable buffers computing z = softcap((h W^T + b) / T) for a chunk of rows, in fp32
    (float64 for float64 inputs)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int, temperature: float, softcap):
        v = weight.shape[0]
        self.weight, self.bias = weight, bias
        self.temperature, self.softcap = temperature, softcap
        acc = _acc_dtype(weight.dtype)
        self.z32 = torch.empty(rows, v, device=weight.device, dtype=acc)
        self.half = weight.dtype != acc
        self.zin = torch.empty(rows, v, device=weight.device, dtype=weight.dtype) if self.half else None

    def __call__(self, h: Tensor) -> Tensor:
        c = h.shape[0]
        z = self.z32[:c]
        out = self.zin[:c] if self.half else z
        if self.bias is not None:
            torch.addmm(self.bias, h, self.weight.t(), out=out)
        else:
            torch.mm(h, self.weight.t(), out=out)
        if self.half:
            z.copy_(out)
        if self.temperature != 1.0:
            z.mul_(1.0 / self.temperature)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z


def partials(hidden, weight, bias, targets, valid, temperature, softcap, with_entropy, options=None, *,
             outside=False):
    """Per-row partial statistics ``[3 | 5, 1, N]`` over this weight's columns (fused.py)."""
    n, v = hidden.shape[0], weight.shape[0]
    stats = torch.zeros(5 if with_entropy else 3, n, device=hidden.device, dtype=_acc_dtype(hidden.dtype))
    rows = _selected_rows(valid)
    count = n if rows is None else rows.numel()
    c = _chunk_rows(count, v)
    logits = _LogitsChunk(weight, bias, c, temperature, softcap)
    for start in range(0, count, c):
        idx = torch.arange(start, min(start + c, count), device=hidden.device) if rows is None else rows[start:start + c]
        tgt = targets.index_select(0, idx)[:, None]
        own = None
        if outside:  # -1: the target is in another rank's shard
            own = tgt >= 0
            tgt = tgt.clamp_min(0)
        z = logits(hidden.index_select(0, idx))
        m = z.amax(dim=1)
        z_t = z.gather(1, tgt).squeeze(1)
        if own is not None:
            z_t = torch.where(own.squeeze(1), z_t, 0.0)
        e = z.sub_(m[:, None]).exp_()                           # exp(z - m), in place
        if with_entropy:
            # sum exp(z - m) (z - m) = -sum entr(e), entr(e) = -e ln e
            stats[3].index_copy_(0, idx, e.sum(dim=1))
            stats[4].index_copy_(0, idx, -torch.special.entr(e).sum(dim=1))
        # exclude the target column (a column of another shard's target keeps its value)
        e.scatter_(1, tgt, 0.0 if own is None else torch.where(own, 0.0, e.gather(1, tgt)))
        stats[0].index_copy_(0, idx, m)
        stats[1].index_copy_(0, idx, e.sum(dim=1))
        stats[2].index_copy_(0, idx, z_t)
    return stats[:, None]


def forward(hidden, weight, bias, targets, valid, temperature, softcap, with_entropy, options=None, *, outside=False):
    part = partials(hidden, weight, bias, targets, valid, temperature, softcap, with_entropy, options, outside=outside)
    return rows_from_partials(part, valid)


def _add_products(dz, h, idx, cap_grad, temperature, logits, dh, dw32, db32):
    """dz (the gradient w.r.t. the capped, scaled logits of rows ``idx``) through the softcap and
    temperature, then into db, dW (accumulated in their precision) and the rows of dH."""
    if cap_grad is not None:
        dz.mul_(cap_grad)
    if temperature != 1.0:
        dz.mul_(1.0 / temperature)                       # dL/d(h W^T + b)
    if db32 is not None:
        db32 += dz.sum(dim=0)
    if dw32 is not None:
        dw32.addmm_(dz.t(), h.to(dw32.dtype))
    if dh is not None:
        dz_in = logits.zin[: dz.shape[0]].copy_(dz) if logits.half else dz
        dh.index_copy_(0, idx, dz_in @ logits.weight)


def backward(hidden, weight, bias, targets, m, log_s, q, g, temperature, softcap, need_dh, need_dw, need_db, *,
             entropy=None, g_entropy=None, options=None, outside=False):
    n, v = hidden.shape[0], weight.shape[0]
    dh = torch.zeros_like(hidden) if need_dh else None
    # dW accumulates over chunks: in fp32 for half inputs (one rounding at the end).
    acc = _acc_dtype(weight.dtype)
    dw32 = torch.zeros_like(weight, dtype=acc) if need_dw else None
    db32 = torch.zeros(v, device=weight.device, dtype=acc) if need_db else None
    active = g != 0 if g_entropy is None else (g != 0) | (g_entropy != 0)
    rows = _selected_rows(active)
    count = n if rows is None else rows.numel()
    c = _chunk_rows(count, v)
    logits = _LogitsChunk(weight, bias, c, temperature, softcap)
    for start in range(0, count, c):
        idx = torch.arange(start, min(start + c, count), device=hidden.device) if rows is None else rows[start:start + c]
        h = hidden.index_select(0, idx)
        z = logits(h)
        g_c = g.index_select(0, idx)[:, None]
        # dL/dz = g (onehot(y) - softmax(z)), built in place in the logits buffer; the target
        # column is g (1 - p) with 1 - p = q from the forward (no cancellation near p = 1).
        cap_grad = None
        if softcap is not None:
            cap_grad = 1.0 - (z / softcap).square()          # d softcap(u)/du at u = z_lin
        # p = exp((z - m) - log_s): the two-part lse keeps p exact-ish at logits of 1e4. The
        # exponent is clamped at 0 (p <= 1): rows that are computed but skipped (g = 0; on CUDA
        # every row is computed) have m = log_s = 0, where exp(z) could overflow and 0 * inf
        # would be NaN.
        lp = z.sub_(m.index_select(0, idx)[:, None]).sub_(log_s.index_select(0, idx)[:, None]).clamp_max_(0.0)
        tgt = targets.index_select(0, idx)[:, None]
        own = None
        if outside:  # -1: the target is in another rank's shard (no target column here)
            own = tgt >= 0
            tgt = tgt.clamp_min(0)
        target_value = g_c * q.index_select(0, idx)[:, None]
        if g_entropy is None:
            dz = lp.exp_().mul_(-g_c)
        else:
            # the entropy term, dL/dz_j += g_H (-p_j (log p_j + H)): dz = -p (g + g_H (log p + H))
            g_h = g_entropy.index_select(0, idx)[:, None]
            ent = entropy.index_select(0, idx)[:, None]
            p = lp.exp()                                   # the one extra [C, V] buffer
            lp_h = lp.add_(ent)                            # log p + H, in place
            target_value = target_value - g_h * p.gather(1, tgt) * lp_h.gather(1, tgt)
            dz = lp_h.mul_(g_h).add_(g_c).mul_(p).neg_()
            del p
        if own is not None:
            target_value = torch.where(own, target_value, dz.gather(1, tgt))
        dz.scatter_(1, tgt, target_value)
        _add_products(dz, h, idx, cap_grad, temperature, logits, dh, dw32, db32)
    dw = None if dw32 is None else dw32.to(weight.dtype)
    db = None if db32 is None else db32.to(bias.dtype)
    return dh, dw, db


def loss_and_grads(hidden, weight, bias, targets, valid, temperature, softcap, with_entropy, token_loss, token_weight,
                   need_dh, need_dw, need_db):
    """The loss and its gradients in one chunked pass, for a scalar loss that will be
    differentiated: 3 matrix products (logits, dW, dH) instead of 4, since the logits are not
    recomputed in a backward.

    ``token_loss(logp, entropy, idx) -> loss_t`` is the per-token loss of the rows ``idx`` (a
    differentiable function of their log-probs and entropies); the loss is
    ``sum_t token_weight_t * loss_t``. Returns (loss, RowStats, (dhidden, dweight, dbias)); the
    gradients are those of the loss (scaled by the upstream gradient in backward).
    """
    n, v = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(weight.dtype)
    dh = torch.zeros_like(hidden) if need_dh else None
    dw32 = torch.zeros_like(weight, dtype=acc) if need_dw else None
    db32 = torch.zeros(v, device=weight.device, dtype=acc) if need_db else None
    stats = torch.zeros(6, n, device=hidden.device, dtype=acc)   # logp, m, log_s, q, entropy, is_max
    loss = torch.zeros((), device=hidden.device, dtype=acc)
    rows = _selected_rows(valid)
    count = n if rows is None else rows.numel()
    c = _chunk_rows(count, v)  # as the forward: the same chunks give bit-identical log-probs
    logits = _LogitsChunk(weight, bias, c, temperature, softcap)
    # a second [C x V] buffer only with entropy (its value and gradient need z - m beside exp(z - m))
    probs = torch.empty(c, v, device=hidden.device, dtype=acc) if with_entropy else None
    for start in range(0, count, c):
        idx = torch.arange(start, min(start + c, count), device=hidden.device) if rows is None else rows[start:start + c]
        h = hidden.index_select(0, idx)
        tgt = targets.index_select(0, idx)[:, None]
        z = logits(h)
        cap_grad = None if softcap is None else 1.0 - (z / softcap).square()
        m = z.amax(dim=1)
        z_t = z.gather(1, tgt).squeeze(1)
        zm = z.sub_(m[:, None])                                  # z - m, in place
        e = torch.exp(zm, out=probs[: idx.numel()]) if with_entropy else zm.exp_()   # exp(z - m)
        s_all = t = None
        if with_entropy:
            s_all, t = e.sum(dim=1), (e * zm).sum(dim=1)
        e_t = e.gather(1, tgt)
        s_excl = e.scatter_(1, tgt, 0.0).sum(dim=1)
        logp, log_s, q, entropy, is_max = finish_logprob(m, s_excl, z_t, s_all, t)
        if entropy is None:
            entropy = torch.zeros_like(logp)
        p = e.scatter_(1, tgt, e_t).mul_(torch.exp(-log_s)[:, None])   # softmax
        # the head, differentiated per token: g = dL/dlogp, g_H = dL/dH
        with torch.enable_grad():
            lp_leaf = logp.detach().requires_grad_()
            ent_leaf = entropy.detach().requires_grad_(with_entropy)
            weighted = token_loss(lp_leaf, ent_leaf, idx) * token_weight.index_select(0, idx)
            leaves = (lp_leaf, ent_leaf) if with_entropy else (lp_leaf,)
            grads = torch.autograd.grad(weighted.sum(), leaves, allow_unused=True)
        loss += weighted.detach().sum()
        g = grads[0] if grads[0] is not None else torch.zeros_like(logp)
        g_h = grads[1] if with_entropy else None
        target_value = (g * q)[:, None]
        if g_h is None:
            dz = p.mul_(-g[:, None])
        else:
            lp_h = zm.sub_(log_s[:, None]).add_(entropy[:, None])          # log p + H, in z's buffer
            target_value = target_value - g_h[:, None] * p.gather(1, tgt) * lp_h.gather(1, tgt)
            dz = lp_h.mul_(g_h[:, None]).add_(g[:, None]).mul_(p).neg_()
        dz.scatter_(1, tgt, target_value)
        _add_products(dz, h, idx, cap_grad, temperature, logits, dh, dw32, db32)
        for k, x in enumerate((logp, m, log_s, q, entropy, is_max)):
            stats[k].index_copy_(0, idx, x.to(acc))
    if rows is None:  # every row was computed: rows that are not valid report 0
        stats.mul_(valid.to(acc))
    out = RowStats(*stats[:5], stats[5].bool())
    grads = (dh, None if dw32 is None else dw32.to(weight.dtype), None if db32 is None else db32.to(bias.dtype))
    return loss, out, grads
