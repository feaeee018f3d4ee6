"""The chunked pure-PyTorch engine: bounded memory, any device, the CPU default.

Two paths, chosen by the tensors' device (``SYNC_FREE`` forces one; the tests run the GPU's
path on CPU tensors):

**The CPU path.** Rows are processed in chunks of ``C`` tokens; one ``[C x V]`` fp32 logits
buffer (plus a ``[C x V]`` half buffer for bf16/fp16 inputs) is allocated once and reused with
``out=`` and in-place ops, so the peak stays near ``C x V`` floats instead of ``N x V`` (with
glibc malloc, allocating a fresh chunk per step lets the resident size creep up; see the
README's memory numbers). Only valid rows (forward) and rows with ``g != 0`` (backward) are
computed: selecting them is a host sync, which costs nothing on a CPU. With several intra-op
threads the one-pass path (a scalar loss under autograd) splits the vocabulary between the
threads instead of splitting every op (``cpu_threads.py``: one synchronisation per chunk
instead of a barrier per op); the buffers are the same ``C x V`` floats in all, and the result
is the one-thread result up to rounding. dlm_head is accumulated over the row chunks in fp32
(float64 for float64 inputs) from ``dz`` in that precision.

**The device path** (a GPU, or any device but the CPU): no host sync at all, so the chunk loop
is queued without waiting and can be captured. Every row is computed (rows that are not active
are zeroed in a copy of ``hidden``, so whatever they hold is never read), in vocabulary chunks
of ``cols`` columns over all rows (``plan_device``: blocks of ``rows`` rows only where the
buffers would exceed ``DEVICE_SCRATCH_FRACTION`` of the gradients' bytes), as the Triton
engine's split backward does: a chunk's dlm_head rows come from one product over all rows
(cuBLAS accumulates in fp32 and rounds once into the input dtype), dhidden is added per chunk
into an fp32 accumulator (``products.addmm_fp32``: 16-bit operands, fp32 output), and the
chunk sizes are decided from the shapes alone. The one-pass path is a forward sweep, the head
on all rows, and a backward sweep: 4 products, as a recomputing backward.

Precision: the products take the inputs in their dtype, as naive PyTorch does (on the device
path on CUDA the logits come out of the product in fp32 where torch has ``out_dtype``; elsewhere
they are rounded to the input dtype first, as naive PyTorch rounds them); the softmax runs in
fp32 (float64 for float64 inputs); ``dz`` is rounded to the input dtype for the device path's
products, as naive PyTorch rounds its logits' gradient.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from . import cpu_threads, products
from .cpu_threads import helper_threads, intra_op_threads
from .engine import (
    BackwardRequest,
    Capabilities,
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
# The device path (no host syncs; module docstring): None takes it off the CPU; True / False force it.
SYNC_FREE: bool | None = None
# The device path's chunk buffers (logits, their 16-bit copy, the softcap's and entropy's extra
# buffers) within this fraction of the gradients' bytes; its accumulators (fp32 dhidden, for
# 16-bit inputs twice dhidden's own bytes) come on top. A chunk is at least DEVICE_MIN_COLS wide
# and DEVICE_MIN_ROWS high (thinner products run below the matmul rate), at most
# DEVICE_MAX_COLS wide, a multiple of DEVICE_STEP.
DEVICE_SCRATCH_FRACTION = 0.125
DEVICE_MIN_COLS = 1024
DEVICE_MAX_COLS = 16384
DEVICE_MIN_ROWS = 512
DEVICE_STEP = 256


def _chunk_rows(n: int, v: int) -> int:
    return max(1, min(n, CHUNK_BYTES // (4 * max(v, 1))))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sync_free(hidden: Tensor) -> bool:
    """Whether the device path runs (module docstring)."""
    return hidden.device.type != "cpu" if SYNC_FREE is None else SYNC_FREE


def _chunks(mask: Tensor, v: int):
    """(chunk size, iterator of the row indices of each chunk) over the rows ``mask`` selects
    (the CPU path: selecting them is a host sync)."""
    rows = mask.nonzero().squeeze(1)
    c = _chunk_rows(rows.numel(), v)
    return c, (rows[start : start + c] for start in range(0, rows.numel(), c))


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


def _recomputed_dz(z: Tensor, stats, g_c: Tensor, g_h: Tensor | None, target) -> Tensor:
    """dL/dz = g (onehot(y) - softmax(z)) (+ the entropy term), built in place in the logits
    ``z`` of a chunk's rows from the forward's per-row ``stats`` (m, log_s, q, entropy; each
    ``[C, 1]``); ``target`` is (its column ``[C, 1]``, whether these columns own it ``[C, 1]`` or
    None: always). The target column is g (1 - p) with 1 - p = q from the forward (no
    cancellation near p = 1)."""
    m, log_s, q, entropy = stats
    tgt, own = target
    # p = exp((z - m) - log_s): the two-part lse keeps p exact-ish at logits of 1e4. The exponent
    # is clamped at 0 (p <= 1): rows that are computed but not active (g = 0; the device path
    # computes every row) may have m = log_s = 0, where exp(z) could overflow and 0 * inf is NaN.
    lp = z.sub_(m).sub_(log_s)
    lp.clamp_max_(0.0)
    target_value = g_c * q
    if g_h is None:
        dz = lp.exp_().mul_(-g_c)
    else:
        # the entropy term, dL/dz_j += g_H (-p_j (log p_j + H)): dz = -p (g + g_H (log p + H))
        p = lp.exp()  # the one extra [C, V] buffer
        lp_h = lp.add_(entropy)  # log p + H, in place
        target_value = target_value - g_h * p.gather(1, tgt) * lp_h.gather(1, tgt)
        dz = lp_h.mul_(g_h).add_(g_c).mul_(p).neg_()
        del p
    if own is not None:
        target_value = torch.where(own, target_value, dz.gather(1, tgt))
    return dz.scatter_(1, tgt, target_value)


class TorchEngine:
    """The chunked PyTorch engine (the contract: ``engine.py``)."""

    name = "torch"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    launch_options = None
    # backend="auto"'s fallback on every device; its loss_and_grads is the one-pass path
    capabilities = Capabilities(auto_rank=10, one_pass=True, description="the chunked torch engine")

    def supports(self, hidden: Tensor, options: KernelOptions) -> str | None:
        return None  # any device, any float dtype

    def partials(self, request: ForwardRequest, options: KernelOptions) -> RowPartials:
        """Per-row partial statistics ``[1, N]`` over this weight's columns (one column set; the
        device path: one per vocabulary chunk)."""
        if _sync_free(request.hidden):
            return _device_partials(request, options, _DeviceBuffers(request, options))
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
        if _sync_free(request.inputs.hidden):
            return _device_backward(request, options, _DeviceBuffers(request.inputs, options))
        (hidden, weight, bias, targets, _), rows, g, g_entropy, need = request
        grads = _Gradients(hidden, weight, bias, need)
        active = g != 0 if g_entropy is None else (g != 0) | (g_entropy != 0)
        c, chunks = _chunks(active, weight.shape[0])
        logits = _LogitsChunk(weight, bias, c, options)
        for idx in chunks:
            h = hidden.index_select(0, idx)
            z = logits(h)
            cap_grad = None if options.softcap is None else 1.0 - (z / options.softcap).square()
            tgt, own = _targets(targets, idx, options.outside)
            stats = [x.index_select(0, idx)[:, None] for x in (rows.m, rows.log_s, rows.q, rows.entropy)]
            g_c = g.index_select(0, idx)[:, None]
            g_h = None if g_entropy is None else g_entropy.index_select(0, idx)[:, None]
            dz = _recomputed_dz(z, stats, g_c, g_h, (tgt, own))
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
        if _sync_free(request.hidden):
            return _device_loss_and_grads(request, options, (token_loss, token_weight), need)
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


class DevicePlan(NamedTuple):
    """The device path's chunks: ``cols`` vocabulary columns by ``rows`` rows (all N but where
    the buffers would exceed the budget), and the bytes of its chunk buffers."""

    cols: int
    rows: int
    buffer_bytes: int


def plan_device(n: int, v: int, h_dim: int, dtype: torch.dtype, options: KernelOptions) -> DevicePlan:
    """Chunk sizes of the device path, from the shapes alone (no host sync): the widest chunk
    whose ``[N x cols]`` buffers fit ``DEVICE_SCRATCH_FRACTION`` of the gradients' bytes, within
    ``[DEVICE_MIN_COLS, DEVICE_MAX_COLS]``; where even the narrowest does not fit, row blocks of
    what fits (at least ``DEVICE_MIN_ROWS``)."""
    acc, elem = _acc_dtype(dtype).itemsize, dtype.itemsize
    # per element of a chunk: the logits (acc), their 16-bit copy (dz's too), and one more acc
    # buffer each for the softcap's derivative and the entropy's probabilities
    per = acc * (1 + (options.softcap is not None) + options.with_entropy) + (elem if elem < acc else 0)
    budget = DEVICE_SCRATCH_FRACTION * elem * h_dim * (n + v)
    fit = int(budget // (max(n, 1) * per)) // DEVICE_STEP * DEVICE_STEP
    cols = max(1, min(max(fit, DEVICE_MIN_COLS), DEVICE_MAX_COLS, v))
    rows = n
    if n * cols * per > budget:
        rows = max(int(budget // (cols * per)) // DEVICE_STEP * DEVICE_STEP, DEVICE_MIN_ROWS)
    rows = max(1, min(rows, n))
    return DevicePlan(cols, rows, rows * cols * per)


class _DeviceBuffers:
    """The device path's plan and reused buffers: the logits of a chunk in fp32 (float64 for
    float64 inputs) and, for 16-bit inputs, its copy in the input dtype (the product's output
    where torch cannot write fp32, and the rounded dz the gradient products read)."""

    def __init__(self, request: ForwardRequest, options: KernelOptions):
        hidden, weight = request.hidden, request.weight
        self.plan = plan_device(hidden.shape[0], weight.shape[0], hidden.shape[1], weight.dtype, options)
        self.options = options
        size = self.plan.rows * self.plan.cols
        acc = _acc_dtype(weight.dtype)
        self.z = torch.empty(size, device=weight.device, dtype=acc)
        self.half = weight.dtype != acc
        self.zin = torch.empty(size, device=weight.device, dtype=weight.dtype) if self.half else None

    def blocks(self, n: int, v: int):
        """(columns, rows) of every chunk, columns outermost."""
        for c0 in range(0, v, self.plan.cols):
            for r0 in range(0, n, self.plan.rows):
                yield slice(c0, min(c0 + self.plan.cols, v)), slice(r0, min(r0 + self.plan.rows, n))

    def logits(self, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """z = softcap((h W^T + b) / T) of these rows and columns, in the fp32 buffer."""
        shape = (h.shape[0], weight.shape[0])
        z = self.z[: shape[0] * shape[1]].view(shape)
        if not (self.half and products.mm_into_fp32(z, h, weight.t())):
            out = self.rounded(shape) if self.half else z
            if bias is None:
                torch.mm(h, weight.t(), out=out)
            else:
                torch.addmm(bias, h, weight.t(), out=out)
            if self.half:
                z.copy_(out)
        elif bias is not None:
            z.add_(bias)
        if self.options.temperature != 1.0:
            z.mul_(1.0 / self.options.temperature)
        if self.options.softcap is not None:
            z.div_(self.options.softcap).tanh_().mul_(self.options.softcap)
        return z

    def rounded(self, shape) -> Tensor:
        return self.zin[: shape[0] * shape[1]].view(shape)


def _chunk_targets(targets: Tensor, cols: slice):
    """(column [C, 1] within the chunk ``cols``, whether the chunk holds the target [C, 1]); a
    target of -1 (another rank's shard) is in no chunk."""
    local = (targets - cols.start)[:, None]
    own = (local >= 0) & (local < cols.stop - cols.start)
    return local.clamp(0, cols.stop - cols.start - 1), own


def _device_partials(request: ForwardRequest, options: KernelOptions, buffers: _DeviceBuffers) -> RowPartials:
    """Per-row partial statistics ``[S, N]``, one set per vocabulary chunk, of every row (rows
    that are not valid read zeros: ``rows_from_partials`` zeroes their statistics)."""
    hidden, weight, bias, targets, valid = request
    n, v = hidden.shape[0], weight.shape[0]
    hidden = torch.where(valid[:, None], hidden, 0.0)
    sets = -(-v // buffers.plan.cols)
    part = RowPartials(
        *torch.zeros(5 if options.with_entropy else 3, sets, n, device=hidden.device, dtype=buffers.z.dtype)
    )
    for cols, rows in buffers.blocks(n, v):
        z = buffers.logits(hidden[rows], weight[cols], None if bias is None else bias[cols])
        local, own = _chunk_targets(targets[rows], cols)
        m = z.amax(dim=1)
        z_t = torch.where(own, z.gather(1, local), 0.0).squeeze(1)
        zm = z.sub_(m[:, None])  # z - m, in place
        e = torch.exp(zm) if options.with_entropy else zm.exp_()
        values = [m, None, z_t]
        if options.with_entropy:  # sum exp(z - m) and sum exp(z - m) (z - m), the product in z's buffer
            values += [e.sum(dim=1), zm.mul_(e).sum(dim=1)]
        e.scatter_(1, local, torch.where(own, 0.0, e.gather(1, local)))  # the target column excluded
        values[1] = e.sum(dim=1)
        for into, x in zip(part, values):
            into[cols.start // buffers.plan.cols, rows] = x
    return part


class _DeviceGradients:
    """The device path's gradient buffers: dlm_head rows written per vocabulary chunk (through an
    fp32 chunk accumulator only when the rows come in several blocks), dhidden added per chunk
    (into fp32 for 16-bit inputs), dbias in fp32."""

    def __init__(self, request: ForwardRequest, need: Needs, buffers: _DeviceBuffers):
        hidden, weight, bias = request.hidden, request.weight, request.bias
        acc, self.buffers = buffers.z.dtype, buffers
        self.weight, self.bias, self.dtype = weight, bias, hidden.dtype
        self.n = hidden.shape[0]
        self.blocked = buffers.plan.rows < self.n
        self.dh = torch.zeros(hidden.shape, device=hidden.device, dtype=acc) if need.dhidden else None
        self.dw = torch.empty_like(weight) if need.dweight else None
        chunk = (buffers.plan.cols, weight.shape[1])
        self.dw_acc = torch.empty(chunk, device=weight.device, dtype=acc) if need.dweight and self.blocked else None
        self.db = torch.zeros(weight.shape[0], device=weight.device, dtype=acc) if need.dbias else None

    def add(self, dz: Tensor, h: Tensor, cols: slice, rows: slice) -> None:
        """The products of one chunk's ``dz`` (w.r.t. h W^T + b, fp32) with the rows ``h``."""
        if self.db is not None:
            self.db[cols] += dz.sum(dim=0)
        if self.buffers.half:
            dz = self.buffers.rounded(dz.shape).copy_(dz)
        if self.dw is not None:
            if not self.blocked:
                torch.mm(dz.t(), h, out=self.dw[cols])  # fp32 accumulation inside, one rounding
            else:
                if rows.start == 0:
                    self.dw_acc.zero_()
                acc = self.dw_acc[: dz.shape[1]]
                _addmm(acc, dz.t(), h, self.buffers.half)
                if rows.stop == self.n:  # the chunk's last row block: its dlm_head rows, rounded once
                    self.dw[cols].copy_(acc)
        if self.dh is not None:
            _addmm(self.dh[rows], dz, self.weight[cols], self.buffers.half)

    def result(self) -> Grads:
        dh = None if self.dh is None else self.dh.to(self.dtype)
        db = None if self.db is None else self.db.to(self.bias.dtype)
        return Grads(dh, self.dw, db)


def _addmm(acc: Tensor, a: Tensor, b: Tensor, half: bool) -> None:
    """acc += a @ b, acc in fp32 (float64 for float64 inputs); 16-bit operands stay 16-bit on CUDA."""
    if half:
        products.addmm_fp32(acc, a, b)
    else:
        acc.addmm_(a, b)


def _device_backward(request: BackwardRequest, options: KernelOptions, buffers: _DeviceBuffers) -> Grads:
    """``TorchEngine.backward`` on the device path: every row, vocabulary chunks, no host sync."""
    (hidden, weight, bias, targets, _), rows, g, g_entropy, need = request
    n, v = hidden.shape[0], weight.shape[0]
    active = g != 0 if g_entropy is None else (g != 0) | (g_entropy != 0)
    hidden = torch.where(active[:, None], hidden, 0.0)  # what rows that are not active hold is never read
    grads = _DeviceGradients(request.inputs._replace(hidden=hidden), need, buffers)
    stats = [x[:, None] for x in (rows.m, rows.log_s, rows.q, rows.entropy)]
    g, g_entropy = g[:, None], None if g_entropy is None else g_entropy[:, None]
    for cols, block in buffers.blocks(n, v):
        h = hidden[block]
        z = buffers.logits(h, weight[cols], None if bias is None else bias[cols])
        cap_grad = None  # 1 - (z / c)^2, the one buffer the plan counts for it
        if options.softcap is not None:
            cap_grad = torch.div(z, options.softcap).square_().neg_().add_(1.0)
        g_h = None if g_entropy is None else g_entropy[block]
        dz = _recomputed_dz(z, [x[block] for x in stats], g[block], g_h, _chunk_targets(targets[block], cols))
        if cap_grad is not None:
            dz.mul_(cap_grad)
        if options.temperature != 1.0:
            dz.mul_(1.0 / options.temperature)  # dL/d(h W^T + b)
        grads.add(dz, h, cols, block)
    return grads.result()


def _device_loss_and_grads(request: ForwardRequest, options: KernelOptions, head, need: Needs):
    """``TorchEngine.loss_and_grads`` on the device path: a forward sweep over the vocabulary
    chunks, the head on every row at once, then the backward sweep (4 products; the logits are
    recomputed, never kept). Returns (loss, RowStats, Grads)."""
    valid = request.valid
    buffers = _DeviceBuffers(request, options)
    row = _row_stats(merge_partials(_device_partials(request, options, buffers)))
    every = torch.arange(valid.shape[0], device=valid.device)
    g, g_h, loss = _head_grads(*head, row, every, options.with_entropy)
    grads = _device_backward(BackwardRequest(request, row, g, g_h, need), options, buffers)
    zero = torch.zeros_like(row.logp)
    stats = RowStats(*(torch.where(valid, x, zero) for x in row[:5]), row.target_is_max & valid)
    return loss, stats, grads


ENGINE = register_engine(TorchEngine())
