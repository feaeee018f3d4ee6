"""The chunked pure-PyTorch engine: bounded memory, any device, the CPU default.

Rows are processed in chunks of ``C`` tokens; one ``[C x V]`` fp32 logits buffer (plus a
``[C x V]`` half buffer for bf16/fp16 inputs) is allocated once and reused with ``out=`` and
in-place ops, so the peak stays near ``C x V`` floats instead of ``N x V`` (with glibc malloc,
allocating a fresh chunk per step lets the resident size creep up; see the README's memory
numbers). Only valid rows (forward) and rows with ``g != 0`` (backward) are computed; on CUDA,
where selecting them would cost a host sync, every row is processed instead.

On a CPU with several intra-op threads the one-pass path (a scalar loss under autograd)
splits the vocabulary between the threads instead of splitting every op (``cpu_threads.py``:
one synchronisation per chunk instead of a barrier per op); the buffers are the same
``C x V`` floats in all, and the result is the one-thread result up to rounding.

Precision: the logits product is done in the input dtype (as naive PyTorch does), the
softmax in fp32 (float64 for float64 inputs); dlm_head is accumulated over chunks in that
precision from ``dz`` in that precision.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import cpu_threads
from .cpu_threads import helper_threads, intra_op_threads
from .engine import (
    BackwardRequest,
    ForwardRequest,
    Grads,
    KernelOptions,
    Needs,
    RowPartials,
    RowStats,
    finish_logprob,
    merge_partials,
    register_engine,
)

# Bytes of one fp32 [C x V] chunk buffer; C = max(1, CHUNK_BYTES // (4 V)).
CHUNK_BYTES = 32 * 1024 * 1024
# Fewest vocabulary columns per thread when the one-pass path splits the vocabulary between
# the CPU's threads (below, one chunk's work is too small to pay for a synchronisation).
MIN_SHARE_COLUMNS = 4096


def _chunk_rows(n: int, v: int) -> int:
    return max(1, min(n, CHUNK_BYTES // (4 * max(v, 1))))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _selected_rows(mask: Tensor) -> Tensor | None:
    """Indices of rows to compute, or None for 'all rows' (CUDA: no host sync)."""
    if mask.is_cuda:
        return None
    return mask.nonzero().squeeze(1)


def _chunks(mask: Tensor, v: int):
    """(chunk size, iterator of the row indices of each chunk) over the rows ``mask`` selects."""
    rows = _selected_rows(mask)
    count = mask.shape[0] if rows is None else rows.numel()
    c = _chunk_rows(count, v)

    def each():
        for start in range(0, count, c):
            if rows is None:
                yield torch.arange(start, min(start + c, count), device=mask.device)
            else:
                yield rows[start : start + c]

    return c, each()


class _LogitsChunk:
    """Reusable buffers computing z = softcap((h W^T + b) / T) for a chunk of rows, in fp32
    (float64 for float64 inputs)."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None, rows: int, options: KernelOptions, storage: Tensor | None = None
    ):
        v = weight.shape[0]
        self.weight, self.bias = weight, bias
        self.temperature, self.softcap = options.temperature, options.softcap
        acc = _acc_dtype(weight.dtype)
        # ``storage``: rows x v floats of a larger buffer (one allocation for every thread's share)
        self.z32 = torch.empty(rows, v, device=weight.device, dtype=acc) if storage is None else storage.view(rows, v)
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


def _targets(targets: Tensor, idx: Tensor, outside: bool):
    """(target column [C, 1], owned [C, 1] bool or None): with ``outside``, -1 marks a target in
    another rank's shard (its column here is 0, and not its target)."""
    tgt = targets.index_select(0, idx)[:, None]
    if not outside:
        return tgt, None
    own = tgt >= 0
    return tgt.clamp_min(0), own


def _add_products(dz, h, cap_grad, logits, dw32, db32, need_dh: bool) -> Tensor | None:
    """dz (the gradient w.r.t. the capped, scaled logits of the rows ``h``) through the softcap
    and temperature, then into db, dW (accumulated in their precision); returns those rows of
    dH (over ``logits``' columns) when ``need_dh``."""
    if cap_grad is not None:
        dz.mul_(cap_grad)
    if logits.temperature != 1.0:
        dz.mul_(1.0 / logits.temperature)  # dL/d(h W^T + b)
    if db32 is not None:
        db32 += dz.sum(dim=0)
    if dw32 is not None:
        dw32.addmm_(dz.t(), h.to(dw32.dtype))
    if not need_dh:
        return None
    dz_in = logits.zin[: dz.shape[0]].copy_(dz) if logits.half else dz
    return dz_in @ logits.weight


class TorchEngine:
    """The chunked PyTorch engine (the contract: ``engine.py``)."""

    name = "torch"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    launch_options = None

    def supports(self, hidden: Tensor, options: KernelOptions) -> str | None:
        return None  # any device, any float dtype

    def partials(self, request: ForwardRequest, options: KernelOptions) -> RowPartials:
        """Per-row partial statistics ``[1, N]`` over this weight's columns (one column set)."""
        hidden, weight, bias, targets, valid = request
        n, v = hidden.shape[0], weight.shape[0]
        # one [3 | 5, 1, N] buffer, by name (a single column set)
        part = RowPartials(
            *torch.zeros(5 if options.with_entropy else 3, 1, n, device=hidden.device, dtype=_acc_dtype(hidden.dtype))
        )
        c, chunks = _chunks(valid, v)
        logits = _LogitsChunk(weight, bias, c, options)
        for idx in chunks:
            tgt, own = _targets(targets, idx, options.outside)
            z = logits(hidden.index_select(0, idx))
            m = z.amax(dim=1)
            z_t = z.gather(1, tgt).squeeze(1)
            if own is not None:
                z_t = torch.where(own.squeeze(1), z_t, 0.0)
            e = z.sub_(m[:, None]).exp_()  # exp(z - m), in place
            if options.with_entropy:
                # sum exp(z - m) (z - m) = -sum entr(e), entr(e) = -e ln e
                part.s_all[0].index_copy_(0, idx, e.sum(dim=1))
                part.t[0].index_copy_(0, idx, -torch.special.entr(e).sum(dim=1))
            # exclude the target column (a column of another shard's target keeps its value)
            e.scatter_(1, tgt, 0.0 if own is None else torch.where(own, 0.0, e.gather(1, tgt)))
            part.m[0].index_copy_(0, idx, m)
            part.s_excl[0].index_copy_(0, idx, e.sum(dim=1))
            part.z_t[0].index_copy_(0, idx, z_t)
        return part

    def backward(self, request: BackwardRequest, options: KernelOptions) -> Grads:
        (hidden, weight, bias, targets, _), rows, g, g_entropy, need = request
        grads = _Gradients(hidden, weight, bias, need)
        active = g != 0 if g_entropy is None else (g != 0) | (g_entropy != 0)
        c, chunks = _chunks(active, weight.shape[0])
        logits = _LogitsChunk(weight, bias, c, options)
        for idx in chunks:
            h = hidden.index_select(0, idx)
            z = logits(h)
            # dL/dz = g (onehot(y) - softmax(z)), built in place in the logits buffer; the target
            # column is g (1 - p) with 1 - p = q from the forward (no cancellation near p = 1).
            cap_grad = None if options.softcap is None else 1.0 - (z / options.softcap).square()
            # p = exp((z - m) - log_s): the two-part lse keeps p exact-ish at logits of 1e4. The
            # exponent is clamped at 0 (p <= 1): rows that are computed but skipped (g = 0; on
            # CUDA every row is computed) have m = log_s = 0, where exp(z) could overflow and
            # 0 * inf would be NaN.
            lp = z.sub_(rows.m.index_select(0, idx)[:, None]).sub_(rows.log_s.index_select(0, idx)[:, None])
            lp.clamp_max_(0.0)
            tgt, own = _targets(targets, idx, options.outside)
            g_c = g.index_select(0, idx)[:, None]
            target_value = g_c * rows.q.index_select(0, idx)[:, None]
            if g_entropy is None:
                dz = lp.exp_().mul_(-g_c)
            else:
                # the entropy term, dL/dz_j += g_H (-p_j (log p_j + H)): dz = -p (g + g_H (log p + H))
                g_h = g_entropy.index_select(0, idx)[:, None]
                p = lp.exp()  # the one extra [C, V] buffer
                lp_h = lp.add_(rows.entropy.index_select(0, idx)[:, None])  # log p + H, in place
                target_value = target_value - g_h * p.gather(1, tgt) * lp_h.gather(1, tgt)
                dz = lp_h.mul_(g_h).add_(g_c).mul_(p).neg_()
                del p
            if own is not None:
                target_value = torch.where(own, target_value, dz.gather(1, tgt))
            dz.scatter_(1, tgt, target_value)
            grads.add_rows(idx, _add_products(dz, h, cap_grad, logits, grads.dw32, grads.db32, grads.need_dh))
        return grads.result()

    def loss_and_grads(
        self, request: ForwardRequest, options: KernelOptions, token_loss, token_weight: Tensor, need: Needs
    ):
        """The loss and its gradients in one chunked pass, for a scalar loss that will be
        differentiated: 3 matrix products (logits, dW, dH) instead of 4, since the logits are
        not recomputed in a backward.

        ``token_loss(logp, entropy, idx) -> loss_t`` is the per-token loss of the rows ``idx`` (a
        differentiable function of their log-probs and entropies); the loss is
        ``sum_t token_weight_t * loss_t``. Returns (loss, RowStats, Grads); the gradients are
        those of the loss (scaled by the upstream gradient in backward).
        """
        hidden, weight, bias, targets, valid = request
        acc = _acc_dtype(weight.dtype)
        grads = _Gradients(hidden, weight, bias, need)
        shares = _column_shares(hidden, weight.shape[0], options)
        if shares is not None:
            loss, stats = _shared_loss_and_grads(request, options, (token_loss, token_weight), grads, shares)
            return loss, stats, grads.result()
        buffer = torch.zeros(6, hidden.shape[0], device=hidden.device, dtype=acc)
        stats = RowStats(*buffer)  # its fields by name, one buffer (target_is_max as 0 / 1 until the end)
        loss = torch.zeros((), device=hidden.device, dtype=acc)
        c, chunks = _chunks(valid, weight.shape[0])  # as the forward: bit-identical log-probs
        logits = _LogitsChunk(weight, bias, c, options)
        # a second [C x V] buffer only with entropy (its value and gradient need z - m beside exp(z - m))
        probs = torch.empty(c, weight.shape[0], device=hidden.device, dtype=acc) if options.with_entropy else None
        for idx in chunks:
            h = hidden.index_select(0, idx)
            tgt = targets.index_select(0, idx)[:, None]
            z = logits(h)
            cap_grad = None if options.softcap is None else 1.0 - (z / options.softcap).square()
            row, zm, e, e_t = _softmax_rows(z, tgt, probs, options.with_entropy)
            g, g_h, chunk_loss = _head_grads(token_loss, token_weight, row, idx, options.with_entropy)
            loss += chunk_loss
            target_value = (g * row.q)[:, None]
            scale = torch.exp(-row.log_s)  # exp(z - m) * scale = softmax
            if g_h is None:
                # -g p off the target column in one pass (e's target column is 0; it is set below)
                dz = e.mul_((-g * scale)[:, None])
            else:
                p = e.scatter_(1, tgt, e_t).mul_(scale[:, None])
                lp_h = zm.sub_(row.log_s[:, None]).add_(row.entropy[:, None])  # log p + H, in z's buffer
                target_value = target_value - g_h[:, None] * p.gather(1, tgt) * lp_h.gather(1, tgt)
                dz = lp_h.mul_(g_h[:, None]).add_(g[:, None]).mul_(p).neg_()
            dz.scatter_(1, tgt, target_value)
            grads.add_rows(idx, _add_products(dz, h, cap_grad, logits, grads.dw32, grads.db32, grads.need_dh))
            for into, x in zip(stats, row):
                into.index_copy_(0, idx, x.to(acc))
        if valid.is_cuda:  # every row was computed (_selected_rows): rows that are not valid report 0
            buffer.mul_(valid.to(acc))
        return loss, stats._replace(target_is_max=stats.target_is_max.bool()), grads.result()


def _column_shares(hidden: Tensor, v: int, options: KernelOptions) -> list[slice] | None:
    """The vocabulary's columns split between the CPU's intra-op threads for the one-pass path
    (``cpu_threads.py`` says why), or None: one thread, a small vocabulary, a GPU, 16-bit inputs
    (whose dH would be rounded once per share), a torch without OpenMP threads."""
    threads = torch.get_num_threads()
    if (
        hidden.device.type != "cpu"
        or hidden.dtype not in (torch.float32, torch.float64)
        or options.outside
        or threads < 2
        or not cpu_threads.SUPPORTED
    ):
        return None
    count = min(threads, v // MIN_SHARE_COLUMNS)
    return [slice(k * v // count, (k + 1) * v // count) for k in range(count)] if count > 1 else None


class _ColumnShare:
    """One thread's columns in the one-pass path: their logits, partial statistics and
    products (the rows of dW and db of these columns are this share's alone)."""

    def __init__(
        self,
        cols: slice,
        request: ForwardRequest,
        rows: int,
        options: KernelOptions,
        grads: _Gradients,
        buffers: dict[str, Tensor],
    ):
        weight, bias = request.weight[cols], None if request.bias is None else request.bias[cols]
        self.start, self.count = cols.start, cols.stop - cols.start
        # this share's rows x count floats of each buffer: the logits, with a softcap its
        # derivative, with entropy exp(z - m) beside z - m and their product (the one-thread path's
        # temporary)
        span = slice(rows * self.start, rows * cols.stop)
        views = {name: b[span].view(rows, self.count) for name, b in buffers.items()}
        self.logits = _LogitsChunk(weight, bias, rows, options, views["logits"])
        self.cap, self.probs, self.product = views.get("cap"), views.get("probs"), views.get("product")
        self.dw32 = None if grads.dw32 is None else grads.dw32[cols]
        self.db32 = None if grads.db32 is None else grads.db32[cols]
        self.need_dh = grads.need_dh
        self.held = None

    def partials(self, h: Tensor, tgt: Tensor):
        """(m, s_excl, z_t[, s_all, t]) of the rows ``h`` over these columns (RowPartials' fields);
        keeps exp(z - m) (and z - m) for ``products``."""
        z = self.logits(h)
        cap_grad = None
        if self.cap is not None:  # 1 - (z / c)^2, into its buffer
            cap_grad = torch.div(z, self.logits.softcap, out=self.cap[: z.shape[0]]).square_().neg_().add_(1.0)
        local = tgt - self.start
        own = (local >= 0) & (local < self.count)  # the target is one of these columns
        local = local.clamp(0, self.count - 1)
        m = z.amax(dim=1)
        z_t = torch.where(own, z.gather(1, local), 0.0).squeeze(1)
        zm = z.sub_(m[:, None])  # z - m, in place
        e = zm.exp_() if self.probs is None else torch.exp(zm, out=self.probs[: z.shape[0]])
        entropy_parts = ()
        if self.probs is not None:  # sum exp(z - m) and sum exp(z - m) (z - m), the product in its buffer
            entropy_parts = (e.sum(dim=1), torch.mul(e, zm, out=self.product[: z.shape[0]]).sum(dim=1))
        e_t = e.gather(1, local)
        e.scatter_(1, local, torch.where(own, 0.0, e_t))
        self.held = (h, e, zm, local, own, m, e_t, cap_grad)
        return (m, e.sum(dim=1), z_t, *entropy_parts)

    def products(self, row: RowStats, g: Tensor, g_h: Tensor | None, target_value: Tensor) -> Tensor | None:
        """dz = dL/dz on these columns (as ``TorchEngine.loss_and_grads`` forms it) into dW, db;
        returns the rows' dH share."""
        h, e, zm, local, own, m_share, e_t, cap_grad = self.held
        self.held = None
        shift = row.m - m_share + row.log_s  # z - m_share - shift = log softmax
        scale = torch.exp(-shift)  # exp(z - m_share) * scale = softmax
        if g_h is None:
            dz = e.mul_((-g * scale)[:, None])
        else:
            p = e.scatter_(1, local, torch.where(own, e_t, e.gather(1, local))).mul_(scale[:, None])
            lp_h = zm.sub_(shift[:, None]).add_(row.entropy[:, None])  # log p + H, in place
            target_value = target_value - g_h[:, None] * p.gather(1, local) * lp_h.gather(1, local)
            dz = lp_h.mul_(g_h[:, None]).add_(g[:, None]).mul_(p).neg_()
        dz.scatter_(1, local, torch.where(own, target_value, dz.gather(1, local)))
        return _add_products(dz, h, cap_grad, self.logits, self.dw32, self.db32, self.need_dh)


def _share_step(share: _ColumnShare, previous, h: Tensor | None, tgt: Tensor | None):
    """One thread's work between two synchronisations: the previous chunk's products, then
    this chunk's partial statistics."""
    dh_rows = None if previous is None else share.products(*previous[1:])
    return dh_rows, None if h is None else share.partials(h, tgt)


def _shared_loss_and_grads(request: ForwardRequest, options: KernelOptions, head, grads: _Gradients, cols: list[slice]):
    """``TorchEngine.loss_and_grads`` with the vocabulary split between threads: per chunk,
    each thread forms its columns' partial statistics, this thread merges them
    (``merge_partials``, as the vocabulary-parallel op does) and differentiates the head, and
    each thread then forms its columns' products. Returns (loss, RowStats)."""
    hidden, weight, _, targets, valid = request
    acc = _acc_dtype(weight.dtype)
    buffer = torch.zeros(6, hidden.shape[0], device=hidden.device, dtype=acc)
    stats = RowStats(*buffer)
    loss = torch.zeros((), device=hidden.device, dtype=acc)
    c, chunks = _chunks(valid, weight.shape[0])
    # each buffer one C x V allocation cut between the shares, as one thread's: separate smaller
    # ones would come from glibc's heap and arenas rather than mmap, and the resident size creeps
    names = ["logits"] + ["cap"] * (options.softcap is not None) + ["probs", "product"] * options.with_entropy
    buffers = {name: torch.empty(c * weight.shape[0], device=hidden.device, dtype=acc) for name in names}
    shares = [_ColumnShare(s, request, c, options, grads, buffers) for s in cols]
    previous = None
    with intra_op_threads(1):
        threads = helper_threads(len(shares) - 1)
        for idx in [*chunks, None]:
            h = tgt = None
            if idx is not None:
                h, tgt = hidden.index_select(0, idx), targets.index_select(0, idx)[:, None]
            done = threads.run([functools.partial(_share_step, share, previous, h, tgt) for share in shares])
            if previous is not None and grads.need_dh:
                grads.add_rows(previous[0], functools.reduce(torch.add, [rows for rows, _ in done]))
            if idx is None:
                break
            row = _row_stats(merge_partials(RowPartials(*(torch.stack(x) for x in zip(*(p for _, p in done))))))
            g, g_h, chunk_loss = _head_grads(head[0], head[1], row, idx, options.with_entropy)
            loss += chunk_loss
            previous = (idx, row, g, g_h, (g * row.q)[:, None])
            for into, x in zip(stats, row):
                into.index_copy_(0, idx, x.to(acc))
    return loss, stats._replace(target_is_max=stats.target_is_max.bool())


def _row_stats(merged: RowPartials) -> RowStats:
    logp, log_s, q, entropy, is_max = finish_logprob(merged)
    return RowStats(logp, merged.m, log_s, q, torch.zeros_like(logp) if entropy is None else entropy, is_max)


def _softmax_rows(z: Tensor, tgt: Tensor, probs: Tensor | None, with_entropy: bool):
    """(RowStats of the chunk's rows, z - m, exp(z - m) with its target column 0, that column's
    value): in place in z's buffer (and in ``probs`` with entropy, which needs z - m beside
    exp(z - m))."""
    m = z.amax(dim=1)
    z_t = z.gather(1, tgt).squeeze(1)
    zm = z.sub_(m[:, None])  # z - m, in place
    e = torch.exp(zm, out=probs[: z.shape[0]]) if with_entropy else zm.exp_()  # exp(z - m)
    s_all = t = None
    if with_entropy:
        s_all, t = e.sum(dim=1), (e * zm).sum(dim=1)
    e_t = e.gather(1, tgt)
    s_excl = e.scatter_(1, tgt, 0.0).sum(dim=1)
    logp, log_s, q, entropy, is_max = finish_logprob(RowPartials(m, s_excl, z_t, s_all, t))
    if entropy is None:
        entropy = torch.zeros_like(logp)
    return RowStats(logp, m, log_s, q, entropy, is_max), zm, e, e_t


def _head_grads(token_loss, token_weight, row: RowStats, idx, with_entropy):
    """The head differentiated per token: (g = dL/dlogp, g_H = dL/dH or None, the chunk's loss)."""
    with torch.enable_grad():
        lp_leaf = row.logp.detach().requires_grad_()
        ent_leaf = row.entropy.detach().requires_grad_(with_entropy)
        weighted = token_loss(lp_leaf, ent_leaf, idx) * token_weight.index_select(0, idx)
        leaves = (lp_leaf, ent_leaf) if with_entropy else (lp_leaf,)
        grads = torch.autograd.grad(weighted.sum(), leaves, allow_unused=True)
    g = grads[0] if grads[0] is not None else torch.zeros_like(row.logp)
    return g, grads[1] if with_entropy else None, weighted.detach().sum()


class _Gradients:
    """The gradient buffers of one backward: dH in the input dtype, dW and db accumulated over
    chunks in fp32 for half inputs (one rounding at the end)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, need: Needs):
        acc = _acc_dtype(weight.dtype)
        self.weight, self.bias = weight, bias
        self.dh = torch.zeros_like(hidden) if need.dhidden else None
        self.dw32 = torch.zeros_like(weight, dtype=acc) if need.dweight else None
        self.db32 = torch.zeros(weight.shape[0], device=weight.device, dtype=acc) if need.dbias else None
        self.need_dh = self.dh is not None

    def add_rows(self, idx: Tensor, rows: Tensor | None) -> None:
        """Write the dH rows of ``idx``."""
        if rows is not None:
            self.dh.index_copy_(0, idx, rows)

    def result(self) -> Grads:
        dw = None if self.dw32 is None else self.dw32.to(self.weight.dtype)
        db = None if self.db32 is None else self.db32.to(self.bias.dtype)
        return Grads(self.dh, dw, db)


ENGINE = register_engine(TorchEngine())
