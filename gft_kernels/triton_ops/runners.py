"""The Triton engine's runners: allocate the buffers a plan (``plans.py``) sized and launch the
kernels (``forward.py``, ``backward.py``) and the cuBLAS products over its chunks. The launch
options arrive resolved (``launch.py`` applies the defaults)."""

from __future__ import annotations

import torch
import triton

from ..engine import BackwardRequest, ForwardRequest, Grads, KernelOptions, RowPartials
from ..products import addmm_fp32 as _addmm_fp32  # shared with the chunked engine on a GPU
from ..products import mm_into_fp32
from .backward import gft_backward_kernel, gft_dlogits_kernel
from .forward import gft_forward_kernel
from .plans import BackwardPlan, Config, LaunchOptions, SplitPlan, logits_dtype, num_splits, plan_backward


def _kernel_flags(weight: torch.Tensor) -> dict:
    upcast = weight.dtype == torch.bfloat16 and weight.device.type != "cuda"
    if weight.dtype == torch.float32 and weight.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"  # the user opted into TF32 for fp32 matmuls in PyTorch
    else:
        precision = "ieee"
    return dict(UPCAST=upcast, INPUT_PRECISION=precision)


def active_order(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, n_active): active rows first, in order; the count stays on the device."""
    order = torch.argsort((~active).to(torch.int8), stable=True)
    n_active = active.sum(dtype=torch.int32).reshape(1)
    return order, n_active


def _copy_rows(dst, index, src32, pieces=8):
    """dst[index] = src32 in dst's dtype, in pieces: the rounded copy of the whole fp32 scratch
    would be a temporary of half its size, beyond the memory budget."""
    step = max(1, -(-src32.shape[0] // pieces))
    for r0 in range(0, src32.shape[0], step):
        dst.index_copy_(0, index[r0 : r0 + step], src32[r0 : r0 + step].to(dst.dtype))


def _mm_into(out, a, b):
    """out = a @ b (cuBLAS: fp32 accumulation inside, one rounding into out's dtype)."""
    torch.mm(a, b, out=out)


def _logits_into(out, a, w):
    """out = a @ w^T by cuBLAS: fp32 accumulation inside, one rounding into out's dtype."""
    if out.dtype == a.dtype:
        torch.mm(a, w.t(), out=out)
    elif not mm_into_fp32(out, a, w.t()):  # the CPU (tests): fp32 products of the exact operands
        torch.mm(a.float(), w.float().t(), out=out)


class BackwardRunner:
    """One backward launch plan's shared state: the request, the kernels' tile and flags, the
    gradient buffers (dW in the input dtype, db summed in fp32)."""

    def __init__(
        self, request: BackwardRequest, options: KernelOptions, launch: LaunchOptions, cfg: Config, order, n_active
    ):
        (self.hidden, self.weight, self.bias, self.targets, _), self.rows, self.g, self.g_entropy, need = request
        self.need_dh, self.need_dw, self.need_db = need
        self.launch = launch
        self.options, self.cfg, self.order, self.n_active = options, cfg, order, n_active
        self.n, self.h_dim = self.hidden.shape
        self.v = self.weight.shape[0]
        self.dh = torch.zeros_like(self.hidden) if self.need_dh else None
        self.dw = torch.zeros_like(self.weight) if self.need_dw else None
        self.db32 = torch.zeros(self.v, device=self.weight.device, dtype=torch.float32) if self.need_db else None

    def common_args(self):
        """The kernels' leading pointer arguments (dummies where a feature is off)."""
        q = self.rows.q
        return (
            self.hidden,
            self.weight,
            self.bias if self.bias is not None else self.hidden,
            self.targets,
            self.rows.m,
            self.rows.log_s,
            q,
            self.g,
            self.g_entropy if self.g_entropy is not None else q,
            self.rows.entropy if self.g_entropy is not None else q,
        )

    def scalars(self):
        softcap = self.options.softcap
        return 1.0 / self.options.temperature, float(softcap) if softcap is not None else 1.0

    def flags(self):
        return dict(
            HAS_BIAS=self.bias is not None,
            HAS_SOFTCAP=self.options.softcap is not None,
            HAS_ENT_GRAD=self.g_entropy is not None,
            BLOCK_M=self.cfg.block_m,
            BLOCK_V=self.cfg.block_v,
            BLOCK_K=self.cfg.block_k,
            num_warps=self.cfg.num_warps,
            num_stages=self.cfg.num_stages,
            **_kernel_flags(self.weight),
        )

    def result(self) -> Grads:
        return Grads(self.dh, self.dw, None if self.db32 is None else self.db32.to(self.bias.dtype))


class SplitBackwardRunner(BackwardRunner):
    """The split design: dz chunks by the dz kernel, the products by cuBLAS (backward.py); in
    the cublas design the dz kernel reads logits that cuBLAS computed, chunk by chunk."""

    def dlogits(self, dz, rows, c0, do_db, h_rows):
        """dz = the logits' gradient of positions ``rows`` (a slice of ``order``), columns c0:;
        ``h_rows``: those rows of h (the cublas design's product)."""
        n_rows, nc = dz.shape
        # db: one row of column sums per row block, added up here in a fixed order (deterministic,
        # unlike atomics); [row blocks, Vc] fp32 is 4 / (BLOCK_M x elem) of the dz chunk's bytes
        # (1/64 on the 128-row tiles, 1/32 on the epilogues'), beyond the planned scratch
        db_rows = self.rows.q
        if do_db:
            db_rows = torch.empty(triton.cdiv(n_rows, self.cfg.block_m), nc, device=dz.device, dtype=torch.float32)
        if self.launch.backward_design != "cublas":
            self.dz_kernel(dz, None, rows, c0, db_rows)
        elif logits_dtype(self.weight, self.launch) == dz.dtype:  # dz written over the logits
            _logits_into(dz, h_rows, self.weight[c0 : c0 + nc])
            self.dz_kernel(dz, dz, rows, c0, db_rows)
        else:  # fp32 logits, in logits_pieces column pieces (their scratch is a fraction of dz's)
            width = min(nc, -(-nc // self.launch.logits_pieces // 16) * 16)
            z_buf = torch.empty(n_rows * width, device=dz.device, dtype=torch.float32)
            for s0 in range(0, nc, width):
                w = min(width, nc - s0)
                z = z_buf[: n_rows * w].view(n_rows, w)
                _logits_into(z, h_rows, self.weight[c0 + s0 : c0 + s0 + w])
                self.dz_kernel(dz[:, s0 : s0 + w], z, rows, c0 + s0, db_rows[:, s0 : s0 + w] if do_db else db_rows)
        if do_db:
            self.db32[c0 : c0 + nc] += db_rows.sum(dim=0)

    def dz_kernel(self, dz, z, rows, col_begin, db_rows):
        """The dz kernel over ``dz`` (columns ``col_begin:`` of the vocabulary, a view with its
        own row stride); ``z``: the raw logits of those columns, or None (computed in the kernel)."""
        n_rows, n_cols = dz.shape
        grid = (triton.cdiv(n_rows, self.cfg.block_m), triton.cdiv(n_cols, self.cfg.block_v))
        do_db = db_rows is not self.rows.q
        gft_dlogits_kernel[grid](
            *self.common_args(),
            rows,
            dz,
            db_rows,
            z if z is not None else dz,
            self.v,
            self.h_dim,
            self.hidden.stride(0),
            self.weight.stride(0),
            dz.stride(0),
            z.stride(0) if z is not None else 0,
            db_rows.stride(0) if do_db else 0,
            n_rows,
            col_begin,
            n_cols,
            *self.scalars(),
            COMPUTE_DB=do_db,
            LOGITS_GIVEN=z is not None,
            **self.flags(),
        )

    def vocab_sweep(self, plan: SplitPlan, with_dh: bool):
        """dW (and db; and dH too when fused), vocabulary chunk by vocabulary chunk. A method, so
        that its scratch is freed on return, before the next sweep allocates its own."""
        n_active, h_dim, hidden = self.n_active, self.h_dim, self.hidden
        active = self.order[:n_active]
        direct_dh = with_dh and hidden.dtype == torch.float32 and n_active == self.n
        # With every row active the stable order is the identity: h needs no gathering.
        # Otherwise the active rows of h are gathered into dH's storage (unwritten until the end).
        h_act = hidden
        # the cublas design's products read the active rows of h too, whatever is needed
        gather = plan.gather or (self.launch.backward_design == "cublas" and n_active < self.n)
        if gather:
            into = (
                self.dh[:n_active]
                if self.need_dh
                else torch.empty(n_active, h_dim, device=hidden.device, dtype=hidden.dtype)
            )
            h_act = torch.index_select(hidden, 0, active, out=into)
        dh_acc = None
        if with_dh:
            dh_acc = self.dh if direct_dh else torch.zeros(n_active, h_dim, device=hidden.device, dtype=torch.float32)
        dz_buf = torch.empty(n_active * plan.cols_per_chunk, device=hidden.device, dtype=self.weight.dtype)
        for c0 in range(0, self.v, plan.cols_per_chunk):
            nc = min(plan.cols_per_chunk, self.v - c0)
            dz = dz_buf[: n_active * nc].view(n_active, nc)
            self.dlogits(dz, active, c0, self.need_db, h_act)
            if self.need_dw:  # one product over every active row: fp32 inside the tensor cores, rounded once
                _mm_into(self.dw[c0 : c0 + nc], dz.t(), h_act)
            if with_dh:
                _addmm_fp32(dh_acc, dz, self.weight[c0 : c0 + nc])
        del dz_buf, h_act
        if gather and self.need_dh:
            self.dh.zero_()  # held the gathered rows of h
        if with_dh and not direct_dh:
            _copy_rows(self.dh, active, dh_acc)

    def row_sweep(self, plan: SplitPlan, do_db: bool):
        """dH, chunk of active rows by chunk of active rows (recomputing the logits)."""
        active = self.order[: self.n_active]
        acc = torch.empty(plan.rows_per_chunk, self.h_dim, device=self.hidden.device, dtype=torch.float32)
        dz_buf = torch.empty(plan.rows_per_chunk * plan.cols_dh, device=self.hidden.device, dtype=self.weight.dtype)
        for r0 in range(0, self.n_active, plan.rows_per_chunk):
            nr = min(plan.rows_per_chunk, self.n_active - r0)
            dh_acc = acc[:nr].zero_()
            h_rows = None
            if self.launch.backward_design == "cublas":
                h_rows = self.hidden.index_select(0, active[r0 : r0 + nr])
            for c0 in range(0, self.v, plan.cols_dh):
                nc = min(plan.cols_dh, self.v - c0)
                dz = dz_buf[: nr * nc].view(nr, nc)
                self.dlogits(dz, active[r0 : r0 + nr], c0, do_db, h_rows)
                _addmm_fp32(dh_acc, dz, self.weight[c0 : c0 + nc])
            _copy_rows(self.dh, active[r0 : r0 + nr], dh_acc)

    def run(self, plan: SplitPlan) -> Grads:
        if self.n_active == 0:
            return self.result()
        if self.need_dw or plan.fused:
            self.vocab_sweep(plan, with_dh=self.need_dh and plan.fused)
        if self.need_dh and not plan.fused:
            self.row_sweep(plan, do_db=self.need_db and not self.need_dw)
        return self.result()


class AtomicBackwardRunner(BackwardRunner):
    """The atomic design: the tile's products added with fp32 atomics (backward.py)."""

    def kernel(self, dh_acc, dh_by_row, dw_acc, do_db, positions: tuple[int, int], columns: tuple[int, int]):
        (pos_begin, n_pos), (col_begin, n_cols) = positions, columns
        grid = (triton.cdiv(n_pos, self.cfg.block_m) * triton.cdiv(n_cols, self.cfg.block_v),)
        dummy = self.rows.q
        gft_backward_kernel[grid](
            *self.common_args(),
            self.order,
            self.n_active,
            dh_acc if dh_acc is not None else dummy,
            dw_acc if dw_acc is not None else dummy,
            self.db32 if do_db else dummy,
            self.v,
            self.h_dim,
            self.hidden.stride(0),
            self.weight.stride(0),
            pos_begin,
            n_pos,
            col_begin,
            n_cols,
            *self.scalars(),
            COMPUTE_DH=dh_acc is not None,
            DH_BY_ROW=dh_by_row,
            COMPUTE_DW=dw_acc is not None,
            COMPUTE_DB=do_db,
            BLOCK_H=self.cfg.block_h,
            GROUP_M=self.launch.bwd_group_m,
            STORES_ONLY=self.launch.stores_only,
            **self.flags(),
        )

    def vocab_pass(self, plan: BackwardPlan, dh_fused, direct: bool):
        """dW (and db; and dH too when fused), vocabulary chunk by vocabulary chunk. A method, so
        that its scratch (and every view of it) is freed on return: the passes' scratch never
        coexist in the peak."""
        scratch_w = None
        if self.need_dw and not direct:
            scratch_w = torch.empty(plan.cols_per_chunk, self.h_dim, device=self.weight.device, dtype=torch.float32)
        for c0 in range(0, self.v, plan.cols_per_chunk):
            nc = min(plan.cols_per_chunk, self.v - c0)
            acc_w = None
            if self.need_dw:
                acc_w = self.dw[c0 : c0 + nc] if direct else scratch_w[:nc].zero_()
            self.kernel(dh_fused, direct, acc_w, self.need_db, (0, self.n), (c0, nc))
            if self.need_dw and not direct:
                self.dw[c0 : c0 + nc].copy_(acc_w)

    def token_pass(self, plan: BackwardPlan, do_db: bool, direct: bool):
        """dH, token chunk by token chunk (one launch when fp32 adds straight into dH)."""
        if direct:
            self.kernel(self.dh, True, None, do_db, (0, self.n), (0, self.v))
            return
        scratch_h = torch.empty(plan.rows_per_chunk, self.h_dim, device=self.hidden.device, dtype=torch.float32)
        for r0 in range(0, self.n, plan.rows_per_chunk):
            nr = min(plan.rows_per_chunk, self.n - r0)
            acc_h = scratch_h[:nr].zero_()
            self.kernel(acc_h, False, None, do_db, (r0, nr), (0, self.v))
            _copy_rows(self.dh, self.order[r0 : r0 + nr], acc_h)

    def run(self) -> Grads:
        plan = plan_backward(
            self.n,
            self.v,
            self.h_dim,
            self.weight.dtype,
            self.need_dh,
            self.need_dw,
            self.cfg,
            self.launch.scratch_fraction,
        )
        direct = self.weight.dtype == torch.float32  # accumulate straight into the fp32 gradients
        fused = plan.fused and self.need_dh and self.need_dw
        if self.need_dw or self.need_db and not self.need_dh:
            if fused and not direct:
                dh_fused = torch.zeros(self.n, self.h_dim, device=self.hidden.device, dtype=torch.float32)
                self.vocab_pass(plan, dh_fused, direct)
                _copy_rows(self.dh, self.order, dh_fused)
                del dh_fused
            else:
                self.vocab_pass(plan, self.dh if fused else None, direct)
        if self.need_dh and not fused:
            self.token_pass(plan, do_db=self.need_db and not self.need_dw, direct=direct)
        return self.result()


class ForwardRunner:
    """One forward launch plan: the request, the valid rows' order, the tile, the partials."""

    def __init__(self, request: ForwardRequest, options: KernelOptions, launch: LaunchOptions, cfg: Config):
        self.request, self.options, self.cfg = request, options, cfg
        self.launch = launch
        self.n, self.h_dim = request.hidden.shape
        self.v = request.weight.shape[0]
        self.order, self.n_active = active_order(request.valid)
        self.n_blocks_m = triton.cdiv(self.n, self.cfg.block_m)

    def splits_of(self, cols: int) -> int:
        """Columns per split, so that the grid over ``cols`` columns fills the device."""
        n_blocks_v = triton.cdiv(cols, self.cfg.block_v)
        splits = num_splits(self.n_blocks_m, n_blocks_v, self.request.hidden.device, self.launch.fwd_programs_per_sm)
        return triton.cdiv(n_blocks_v, splits) * self.cfg.block_v

    def new_partials(self, splits: int) -> RowPartials:
        """m, s_excl, z_t (and s_all, t for entropy) of each split; the kernel writes the valid rows only."""
        count = 5 if self.options.with_entropy else 3
        return RowPartials(*torch.zeros(count, splits, self.n, device=self.request.hidden.device, dtype=torch.float32))

    def run_fused(self) -> RowPartials:
        cols_per_split = self.splits_of(self.v)
        splits = triton.cdiv(self.v, cols_per_split)  # every split has at least one column
        part = self.new_partials(splits)
        self.kernel(part, splits, None, (0, self.v, cols_per_split, 0))
        return part

    def run_cublas(self, cols: int) -> RowPartials:
        """Vocabulary chunk by chunk: the chunk's logits by cuBLAS (every row, no host sync),
        then the kernel reads them, its splits stored after the previous chunks' splits."""
        hidden, weight = self.request.hidden, self.request.weight
        cols_per_split = self.splits_of(cols)
        chunks = [(c0, min(cols, self.v - c0)) for c0 in range(0, self.v, cols)]
        splits = [triton.cdiv(nc, cols_per_split) for _, nc in chunks]
        part = self.new_partials(sum(splits))
        z_buf = torch.empty(self.n * cols, device=hidden.device, dtype=logits_dtype(weight, self.launch))
        base = 0
        for (c0, nc), chunk_splits in zip(chunks, splits):
            z = z_buf[: self.n * nc].view(self.n, nc)
            _logits_into(z, hidden, weight[c0 : c0 + nc])
            self.kernel(part, chunk_splits, z, (c0, c0 + nc, cols_per_split, base))
            base += chunk_splits
        return part

    def kernel(self, part: RowPartials, splits: int, z, span: tuple[int, int, int, int]):
        """Launch over columns ``[col_begin, col_end)`` in splits of ``cols_per_split``, stored
        from split ``split_base`` on (``span``); ``z``: the chunk's logits, or None (fused)."""
        (hidden, weight, bias, targets, _), options, cfg = self.request, self.options, self.cfg
        col_begin, col_end, cols_per_split, split_base = span
        with_entropy = options.with_entropy
        gft_forward_kernel[(self.n_blocks_m, splits)](
            hidden,
            weight,
            bias if bias is not None else hidden,
            targets,
            self.order,
            self.n_active,
            part.m,
            part.s_excl,
            part.z_t,
            *((part.s_all, part.t) if with_entropy else (part.m, part.m)),
            z if z is not None else hidden,
            self.n,
            self.h_dim,
            hidden.stride(0),
            weight.stride(0),
            z.stride(0) if z is not None else 0,
            col_begin,
            col_end,
            cols_per_split,
            split_base,
            1.0 / options.temperature,
            float(options.softcap) if options.softcap is not None else 1.0,
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=options.softcap is not None,
            WITH_ENTROPY=with_entropy,
            LOGITS_GIVEN=z is not None,
            BLOCK_M=cfg.block_m,
            BLOCK_V=cfg.block_v,
            BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **_kernel_flags(weight),
        )
