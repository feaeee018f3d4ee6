"""One ``torch.autograd.Function`` for both bounded-memory engines (Triton and chunked torch).

An engine maps (hidden, lm_head, targets) to per-token fp32 log-probs without keeping the
``[N x V]`` logits, and maps the per-token upstream gradient ``g = dL/dlogp`` back to
dhidden / dlm_head / dbias by recomputing the logits. The GFT head (advantage, DCR, reduction)
lives in ``head.py`` and reaches the engine only through ``g``.

Engine contract (module-level functions):

    partials(hidden [N,H], weight [V,H], bias [V]|None, targets [N], valid [N] bool,
             temperature, softcap, with_entropy, options=None, *, outside=False)
        -> Tensor [3 | 5, S, N]: per-row statistics of S disjoint sets of columns, unmerged
    forward(<the same arguments>) -> RowStats          (rows_from_partials of the above)
    backward(hidden, weight, bias, targets, m, log_s, q, g [N] f32, temperature, softcap,
             need_dhidden, need_dweight, need_dbias, *, entropy=None, g_entropy=None, options=None,
             outside=False)
        -> (dhidden|None, dweight|None, dbias|None)

The partial statistics of a row over a set of columns are its max ``m``, ``s_excl`` = the sum
over the non-target columns of ``exp(z - m)``, the target logit ``z_t`` (0 when the target is
not among the columns) and, for entropy, ``s_all = sum exp(z - m)`` and ``t = sum exp(z - m)
(z - m)``; rows that are not valid hold zeros. ``merge_partials`` merges them, exactly and in
O(N) per set, whether the sets are the Triton forward's vocabulary splits or the vocabulary
shards of the ranks of a process group (``gft_loss(..., vocab_parallel_group=...)``); then
``finish_logprob`` gives the per-token results. ``outside=True``: some targets are -1, a token
whose target lies in another rank's shard; it matches no column (its ``z_t`` partial is 0 and
its backward has no target column here).

``options`` are the engine's own launch options (the Triton engine's ``LaunchOptions``; the
chunked engine has none and ignores them).

``g = dL/dlogp`` per row; ``g_entropy = dL/dentropy`` per row (with the forward's ``entropy``)
when the loss has an entropy term, else None. For entropy ``H = -sum p log p`` the logits'
gradient is ``dH/dz_j = -p_j (log p_j + H)``.

The log-sum-exp is carried in two parts, ``lse = m + log_s`` (``m`` the row's max logit,
``log_s = log sum exp(z - m)``), and the backward forms ``p = exp((z - m) - log_s)``: one fp32
``lse`` of a row with logits near 1e4 has an ulp of 1e-3, which would be a 1e-3 relative
error in every probability of that row.

``q = 1 - p`` of the target is carried separately, computed as ``sigmoid(lse_excl - z_t)`` from
the log-sum-exp of the *other* logits: ``1 - exp(logp)`` cancels catastrophically for confident
tokens (p near 1), which is where the target column of ``onehot - softmax`` is decided. For the
same reason ``logp = -softplus(lse_excl - z_t)`` keeps full relative precision near 0.

Gradients come back in the inputs' dtypes. Rows with ``g == 0`` (and ``g_entropy == 0``)
contribute nothing, so an engine may skip them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


class RowStats(NamedTuple):
    """Per-row results of an engine's forward, all ``[N]``, 0 at rows that were not valid."""

    logp: Tensor            # log-prob of the target, fp32 (fp64 for fp64 inputs)
    m: Tensor               # the row's max logit
    log_s: Tensor           # log sum exp(z - m): lse = m + log_s
    q: Tensor               # 1 - p of the target, without cancellation
    entropy: Tensor         # of the row's distribution; 0 unless asked for
    target_is_max: Tensor   # bool: the target's logit is a maximum of the row (argmax accuracy)


class LinearLogProb(torch.autograd.Function):
    """(logp, entropy, target_is_max) per row; entropy carries a gradient when asked for.

    With a process ``group`` (vocabulary parallelism), ``weight``/``bias`` are this rank's rows of
    the lm_head and ``targets`` are local (-1 where another rank owns the target): the forward
    merges the ranks' partial statistics (two all-reduces of O(N) floats), the backward forms
    this shard's dW/db and all-reduces dH, the sum of every shard's contribution.
    """

    @staticmethod
    def forward(ctx, engine, hidden, weight, bias, targets, valid, temperature, softcap, with_entropy, options,
                group=None):
        extra = {} if group is None else dict(outside=True)
        part = engine.partials(hidden, weight, bias, targets, valid, temperature, softcap, with_entropy, options,
                               **extra)
        rows = rows_from_partials(part, valid, group)
        ctx.options = options
        ctx.group = group
        ctx.save_for_backward(hidden, weight, bias, targets, rows.m, rows.log_s, rows.q, rows.entropy)
        ctx.engine = engine
        ctx.temperature = temperature
        ctx.softcap = softcap
        ctx.set_materialize_grads(False)  # an unused entropy gets None: no entropy term
        if not with_entropy:
            ctx.mark_non_differentiable(rows.entropy)
        ctx.mark_non_differentiable(rows.target_is_max)
        return rows.logp, rows.entropy, rows.target_is_max

    @staticmethod
    def backward(ctx, dlogp, dentropy, _dmax):
        hidden, weight, bias, targets, m, log_s, q, entropy = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[1:4]
        if dlogp is None:
            dlogp = torch.zeros_like(q)
        extra = {} if ctx.group is None else dict(outside=True)
        # A backward run inside an autocast region must not recast the engine's products
        # (custom_bwd's treatment: the forward ran with autocast off, so does the backward).
        with torch.autocast(hidden.device.type, enabled=False):
            dh, dw, db = ctx.engine.backward(
                hidden, weight, bias, targets, m, log_s, q, dlogp.to(q.dtype),
                ctx.temperature, ctx.softcap, need_dh, need_dw, need_db and bias is not None,
                entropy=entropy if dentropy is not None else None,
                g_entropy=dentropy.to(q.dtype) if dentropy is not None else None, options=ctx.options, **extra,
            )
        if ctx.group is not None and dh is not None:
            dist.all_reduce(dh, group=ctx.group)  # every shard's dz @ W_shard, summed
        return None, dh, dw, db, None, None, None, None, None, None, None


def merge_partials(part, group=None):
    """Merge per-row partial statistics ``part [3 | 5, S, N]`` of S disjoint column sets (see
    the module docstring) onto the rows' common max: returns ``(m, s_excl, z_t, s_all, t)``,
    each ``[N]`` (s_all and t None without entropy). With a process ``group`` the sets of every
    rank are merged too: an all-reduce (max) of ``m``, then one (sum) of the rescaled sums, so
    every rank ends with the statistics of the whole vocabulary."""
    m = part[0].amax(dim=0)
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shift = part[0] - m                          # <= 0
    scale = torch.exp(shift)
    merged = [(part[1] * scale).sum(dim=0),
              part[2].sum(dim=0)]                # only the set holding the target adds a nonzero z_t
    if part.shape[0] == 5:
        merged.append((part[3] * scale).sum(dim=0))
        merged.append((scale * (part[4] + shift * part[3])).sum(dim=0))   # t re-centred on m
    if group is not None:
        merged = torch.stack(merged)
        dist.all_reduce(merged, group=group)
        merged = list(merged)
    s_excl, z_t, *ent = merged
    s_all, t = ent if ent else (None, None)
    return m, s_excl, z_t, s_all, t


def rows_from_partials(part, valid, group=None) -> "RowStats":
    """RowStats of the merged partial statistics (``merge_partials``), 0 at rows not valid."""
    m, s_excl, z_t, s_all, t = merge_partials(part, group)
    logp, log_s, q, entropy, is_max = finish_logprob(m, s_excl, z_t, s_all, t)
    zero = torch.zeros_like(logp)
    entropy = zero if entropy is None else entropy
    return RowStats(*(torch.where(valid, x, zero) for x in (logp, m, log_s, q, entropy)), is_max & valid)


def finish_logprob(m, s_excl, z_t, s_all=None, t=None):
    """Per-token results from the streamed statistics of one row (all fp32, any shape).

    m: max logit; s_excl: sum over non-target columns of exp(z - m); z_t: target logit;
    for entropy, s_all = sum over all columns of exp(z - m) and t = sum of exp(z - m) (z - m)
    (shifted by m, so logits of 1e4 lose nothing), else None.
    Returns (logp, log_s, q = 1 - p, entropy or None, target_is_max); lse = m + log_s.
    With V = 1, s_excl = 0 and p = 1 exactly.
    """
    d = s_excl.log() + m - z_t                    # lse_excl - z_t
    logp = -F.softplus(d)
    q = torch.sigmoid(d)
    log_s = torch.log(s_excl + torch.exp(z_t - m))  # >= 0: the max column adds exp(0) = 1
    entropy = None
    if t is not None:
        entropy = s_all.log() - t / s_all
    return logp, log_s, q, entropy, z_t >= m


@torch.compiler.disable
def fused_logprobs(engine, hidden, weight, bias, targets, valid, temperature, softcap, with_entropy, options=None,
                   group=None):
    """``LinearLogProb`` applied eagerly, also inside ``torch.compile``d code: dynamo graph-breaks
    here instead of tracing the chunk loops and kernel launches (which it would unroll per
    shape, or cannot trace at all through Triton's CPU interpreter). The model around the loss
    still compiles; gradients flow through the break."""
    return LinearLogProb.apply(engine, hidden, weight, bias, targets, valid, temperature, softcap, with_entropy, options,
                               group)


class _PrecomputedGrads(torch.autograd.Function):
    """A scalar loss whose gradients were formed in the forward: backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss, dh, dw, db):
        ctx.grads = (dh, dw, db)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.grads is None:
            raise RuntimeError("the chunked engine formed this loss's gradients in its forward: they can be "
                               "taken once (for retain_graph or double backward, use backend='reference')")
        dh, dw, db = ctx.grads
        ctx.grads = None  # scaled in place: no second copy of the gradients

        def scaled(x):
            return None if x is None else x.mul_(grad.to(x.dtype))
        return scaled(dh), scaled(dw), scaled(db), None, None, None, None


@torch.compiler.disable
def precomputed_loss(engine, hidden, weight, bias, targets, valid, temperature, softcap, with_entropy,
                     token_loss, token_weight):
    """(loss, RowStats) of ``engine.loss_and_grads``, differentiable to first order (the
    gradients come from the forward; a double backward is not supported on this path)."""
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    with torch.no_grad():  # the head inside differentiates itself (enable_grad)
        loss, rows, (dh, dw, db) = engine.loss_and_grads(
            hidden, weight, bias, targets, valid, temperature, softcap, with_entropy, token_loss, token_weight, *need)
    return _PrecomputedGrads.apply(hidden, weight, bias, loss, dh, dw, db), rows
