"""Launchers of the fused Triton engine (the engine contract is in ``gft_kernels/fused.py``).

Memory: beyond the inputs and the gradients, the forward needs O(splits x N) floats and the
backward a bounded fp32 scratch:

* fp32 inputs: the kernel adds straight into the fp32 gradients; no scratch at all.
* bf16/fp16 inputs: partial products are added in fp32 (adding them in bf16 would round
  thousands of times per element and fail the precision rule), into scratch buffers of at most
  ``SCRATCH_FRACTION`` of the gradients' own size. dW is built vocabulary chunk by chunk
  (``[Vc, H]`` fp32, rounded once into dW), dH token chunk by token chunk (``[Nc, H]`` fp32).
  When the whole dH accumulator fits the budget, one launch per vocabulary chunk does both
  products from the same recomputed tile ("fused": 4 matrix products in all); otherwise dW and
  dH are separate passes that each recompute the logits (5 products).

No host sync: which rows are active (valid in the forward, ``g != 0`` in the backward) is
decided on the device; programs read the active count and return early past it.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton

from ..fused import finish_logprob
from .backward import gft_backward_kernel
from .forward import gft_forward_kernel

# Largest fp32 scratch of the backward, as a fraction of the gradients' bytes.
SCRATCH_FRACTION = 0.04


@dataclass(frozen=True)
class Config:
    block_m: int
    block_v: int
    block_k: int
    block_h: int
    num_warps: int
    num_stages: int


# A fixed default for CUDA, and small tiles for the CPU interpreter so tests exercise many tiles,
# masks and splits. The CUDA tiles fit sm_90 without spilling and pipeline their loops
# (`python -m benchmarks.kernel_resources`); which is fastest is for `benchmarks/tune.py` to
# measure on the GPU, among the candidates below.
CUDA_FWD = Config(block_m=128, block_v=128, block_k=64, block_h=0, num_warps=8, num_stages=3)
CUDA_BWD = Config(block_m=128, block_v=128, block_k=64, block_h=64, num_warps=8, num_stages=3)
# fp32 (ieee) products run on the FMA units with their operands in registers: the 16-bit tiles
# would spill kilobytes per thread, these do not
CUDA_FWD32 = Config(block_m=64, block_v=128, block_k=32, block_h=0, num_warps=8, num_stages=2)
CUDA_BWD32 = Config(block_m=64, block_v=128, block_k=32, block_h=32, num_warps=8, num_stages=2)
INTERP_FWD = Config(block_m=16, block_v=32, block_k=16, block_h=0, num_warps=1, num_stages=1)
INTERP_BWD = Config(block_m=16, block_v=32, block_k=16, block_h=16, num_warps=1, num_stages=1)
FWD_CANDIDATES = (
    CUDA_FWD,
    Config(block_m=128, block_v=128, block_k=64, block_h=0, num_warps=8, num_stages=4),
    Config(block_m=128, block_v=128, block_k=32, block_h=0, num_warps=4, num_stages=4),
    Config(block_m=64, block_v=128, block_k=64, block_h=0, num_warps=4, num_stages=3),
    Config(block_m=256, block_v=128, block_k=64, block_h=0, num_warps=8, num_stages=3),
)
# The backward's fp32 atomics scale with 1/BLOCK_V (dH) and 1/BLOCK_M (dW): bigger tiles add
# less, at the cost of registers.
BWD_CANDIDATES = (
    CUDA_BWD,
    Config(block_m=128, block_v=128, block_k=64, block_h=128, num_warps=8, num_stages=3),
    Config(block_m=128, block_v=128, block_k=64, block_h=64, num_warps=8, num_stages=2),
    Config(block_m=64, block_v=128, block_k=64, block_h=64, num_warps=4, num_stages=3),
    Config(block_m=256, block_v=128, block_k=64, block_h=32, num_warps=16, num_stages=2),
    Config(block_m=128, block_v=256, block_k=64, block_h=32, num_warps=16, num_stages=2),
)
_cuda_override: tuple[Config, Config] | None = None
# row blocks per group in the backward's program order (see backward.py)
BWD_GROUP_M = 8
# Forward programs per SM the vocabulary splits aim at. The 16-bit forward tile holds one
# program per SM (255 registers x 256 threads), so the grid runs in waves of #SMs programs of
# equal work; many waves make the last, partly idle one a small fraction. The merge costs
# O(splits x N) floats.
FWD_PROGRAMS_PER_SM = 16


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def cuda_configs(fwd: Config, bwd: Config, bwd_group_m: int | None = None, fwd_programs_per_sm: int | None = None):
    """Launch with these CUDA tiles (and backward grouping, forward grid size) inside the
    block, for tuning; not thread-safe."""
    global _cuda_override, BWD_GROUP_M, FWD_PROGRAMS_PER_SM
    saved = _cuda_override, BWD_GROUP_M, FWD_PROGRAMS_PER_SM
    _cuda_override = (fwd, bwd)
    BWD_GROUP_M = bwd_group_m or BWD_GROUP_M
    FWD_PROGRAMS_PER_SM = fwd_programs_per_sm or FWD_PROGRAMS_PER_SM
    try:
        yield
    finally:
        _cuda_override, BWD_GROUP_M, FWD_PROGRAMS_PER_SM = saved


def tiles(device: torch.device, dtype: torch.dtype) -> tuple[Config, Config]:
    """(forward, backward) tiles of a launch on this device with inputs of this dtype."""
    if device.type != "cuda":
        return INTERP_FWD, INTERP_BWD
    if _cuda_override is not None:
        return _cuda_override
    return (CUDA_FWD32, CUDA_BWD32) if dtype == torch.float32 else (CUDA_FWD, CUDA_BWD)


def _kernel_flags(weight: torch.Tensor) -> dict:
    upcast = weight.dtype == torch.bfloat16 and weight.device.type != "cuda"
    if weight.dtype == torch.float32 and weight.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"  # the user opted into TF32 for fp32 matmuls in PyTorch
    else:
        precision = "ieee"
    return dict(UPCAST=upcast, INPUT_PRECISION=precision)


def _active_order(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, n_active): active rows first, in order; the count stays on the device."""
    order = torch.argsort((~active).to(torch.int8), stable=True)
    n_active = active.sum(dtype=torch.int32).reshape(1)
    return order, n_active


def _sm_count(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def _num_splits(n_blocks_m: int, n_blocks_v: int, device: torch.device) -> int:
    """Vocabulary splits so the forward grid fills the device (flash-decoding style)."""
    sms = _sm_count(device)
    if sms is None:
        return min(3, n_blocks_v)  # the interpreter: enough to test the merge
    return max(1, min(n_blocks_v // 8, triton.cdiv(FWD_PROGRAMS_PER_SM * sms, max(n_blocks_m, 1))))


def forward(hidden, weight, bias, targets, valid, temperature, softcap, with_entropy):
    n, h_dim = hidden.shape
    v = weight.shape[0]
    cfg, _ = tiles(hidden.device, weight.dtype)
    order, n_active = _active_order(valid)
    n_blocks_m = triton.cdiv(n, cfg.block_m)
    n_blocks_v = triton.cdiv(v, cfg.block_v)
    splits = _num_splits(n_blocks_m, n_blocks_v, hidden.device)
    cols_per_split = triton.cdiv(n_blocks_v, splits) * cfg.block_v
    splits = triton.cdiv(v, cols_per_split)  # every split has at least one column
    # partial statistics of each split: m, s_excl, z_t (and s_all, t for entropy)
    part = torch.empty(5 if with_entropy else 3, splits, n, device=hidden.device, dtype=torch.float32)
    gft_forward_kernel[(n_blocks_m, splits)](
        hidden, weight, bias if bias is not None else hidden, targets, order, n_active,
        part[0], part[1], part[2], *((part[3], part[4]) if with_entropy else (part[0], part[0])),
        n, v, h_dim, hidden.stride(0), weight.stride(0), cols_per_split,
        1.0 / temperature, float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WITH_ENTROPY=with_entropy,
        BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_kernel_flags(weight),
    )
    # Merge the splits onto the common max m. Positions past n_active were never written
    # (garbage); they are masked out before scattering back to the original rows.
    m = part[0].amax(dim=0)
    scale = torch.exp(part[0] - m)
    s_excl = (part[1] * scale).sum(dim=0)
    z_t = part[2].sum(dim=0)  # only the split holding the target adds a nonzero value
    s_all = t = None
    if with_entropy:
        s_all = (part[3] * scale).sum(dim=0)
        t = (scale * (part[4] + (part[0] - m) * part[3])).sum(dim=0)
    logp, log_s, q, entropy = finish_logprob(m, s_excl, z_t, s_all, t)
    live = torch.arange(n, device=hidden.device) < n_active
    out = []
    for x in (logp, m, log_s, q, entropy):
        row_x = torch.zeros_like(m)
        if x is not None:
            row_x[order] = torch.where(live, x, torch.zeros_like(x))
        out.append(row_x)
    return tuple(out)  # logp, m, log_s, q, entropy


@dataclass(frozen=True)
class BackwardPlan:
    fused: bool          # one pass computes dH and dW from the same tile
    rows_per_chunk: int  # Nc: rows of the fp32 dH scratch (dH pass)
    cols_per_chunk: int  # Vc: rows of the fp32 dW scratch


def plan_backward(n, v, h_dim, dtype, need_dh, need_dw, cfg: Config, scratch_fraction=None) -> BackwardPlan:
    if dtype == torch.float32:
        return BackwardPlan(fused=True, rows_per_chunk=n, cols_per_chunk=v)
    frac = SCRATCH_FRACTION if scratch_fraction is None else scratch_fraction
    elem = torch.finfo(dtype).bits // 8
    grad_bytes = elem * h_dim * ((n if need_dh else 0) + (v if need_dw else 0))
    budget = frac * grad_bytes
    row_bytes = 4 * h_dim
    dh_bytes = n * row_bytes
    fused = need_dh and need_dw and dh_bytes + cfg.block_v * row_bytes <= budget
    w_budget = budget - dh_bytes if fused else budget
    cols = max(cfg.block_v, int(w_budget // row_bytes) // cfg.block_v * cfg.block_v)
    rows = max(cfg.block_m, int(budget // row_bytes) // cfg.block_m * cfg.block_m)
    return BackwardPlan(fused=fused, rows_per_chunk=min(rows, n), cols_per_chunk=min(cols, v))


def _copy_rows(dst, index, src32, pieces=8):
    """dst[index] = src32 in dst's dtype, in pieces: the rounded copy of the whole fp32 scratch
    would be a temporary of half its size, beyond the memory budget."""
    step = max(1, -(-src32.shape[0] // pieces))
    for r0 in range(0, src32.shape[0], step):
        dst.index_copy_(0, index[r0:r0 + step], src32[r0:r0 + step].to(dst.dtype))


def backward(hidden, weight, bias, targets, m, log_s, q, g, temperature, softcap, need_dh, need_dw, need_db,
             scratch_fraction=None):
    n, h_dim = hidden.shape
    v = weight.shape[0]
    _, cfg = tiles(hidden.device, weight.dtype)
    order, n_active = _active_order(g != 0)
    plan = plan_backward(n, v, h_dim, weight.dtype, need_dh, need_dw, cfg, scratch_fraction)
    direct = weight.dtype == torch.float32  # accumulate straight into the fp32 gradients

    dh = torch.zeros_like(hidden) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    db32 = torch.zeros(v, device=weight.device, dtype=torch.float32) if need_db else None

    def launch(dh_acc, dh_by_row, dw_acc, do_db, pos_begin, n_pos, col_begin, n_cols):
        grid = (triton.cdiv(n_pos, cfg.block_m) * triton.cdiv(n_cols, cfg.block_v),)
        dummy = q
        gft_backward_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, targets, m, log_s, q, g, order, n_active,
            dh_acc if dh_acc is not None else dummy, dw_acc if dw_acc is not None else dummy,
            db32 if do_db else dummy,
            v, h_dim, hidden.stride(0), weight.stride(0),
            pos_begin, n_pos, col_begin, n_cols,
            1.0 / temperature, float(softcap) if softcap is not None else 1.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            COMPUTE_DH=dh_acc is not None, DH_BY_ROW=dh_by_row, COMPUTE_DW=dw_acc is not None,
            COMPUTE_DB=do_db,
            BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, BLOCK_H=cfg.block_h,
            GROUP_M=BWD_GROUP_M, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_kernel_flags(weight),
        )

    # Each pass is a function so that its scratch (and every view of it) is freed on return,
    # before the next pass allocates its own: the two never coexist in the peak.
    def vocab_pass(dh_fused):
        """dW (and db; and dH too when fused), vocabulary chunk by vocabulary chunk."""
        scratch_w = None
        if need_dw and not direct:
            scratch_w = torch.empty(plan.cols_per_chunk, h_dim, device=weight.device, dtype=torch.float32)
        for c0 in range(0, v, plan.cols_per_chunk):
            nc = min(plan.cols_per_chunk, v - c0)
            acc_w = None
            if need_dw:
                acc_w = dw[c0:c0 + nc] if direct else scratch_w[:nc].zero_()
            launch(dh_fused, direct, acc_w, need_db, 0, n, c0, nc)
            if need_dw and not direct:
                dw[c0:c0 + nc].copy_(acc_w)

    def token_pass(do_db):
        """dH, token chunk by token chunk (one launch when fp32 adds straight into dH)."""
        if direct:
            launch(dh, True, None, do_db, 0, n, 0, v)
            return
        scratch_h = torch.empty(plan.rows_per_chunk, h_dim, device=hidden.device, dtype=torch.float32)
        for r0 in range(0, n, plan.rows_per_chunk):
            nr = min(plan.rows_per_chunk, n - r0)
            acc_h = scratch_h[:nr].zero_()
            launch(acc_h, False, None, do_db, r0, nr, 0, v)
            _copy_rows(dh, order[r0:r0 + nr], acc_h)

    fused = plan.fused and need_dh and need_dw
    if need_dw or need_db and not need_dh:
        if fused and not direct:
            dh_fused = torch.zeros(n, h_dim, device=hidden.device, dtype=torch.float32)
            vocab_pass(dh_fused)
            _copy_rows(dh, order, dh_fused)
            del dh_fused
        else:
            vocab_pass(dh if fused else None)
    if need_dh and not fused:
        token_pass(do_db=need_db and not need_dw)

    db = None if db32 is None else db32.to(bias.dtype)
    return dh, dw, db
