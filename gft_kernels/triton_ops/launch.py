"""The fused Triton engine: its launchers (the engine contract is in ``gft_kernels/engine.py``).

The backward has two designs (``backward.py``). The default, "split", writes the logits'
gradient dz one vocabulary chunk at a time and hands the two products to cuBLAS; its scratch
(dz chunk, fp32 dH accumulator, gathered active rows) is planned against
``LaunchOptions.split_scratch_fraction`` of the gradients' bytes, and where it does not fit (many tokens, a
small vocabulary) the "atomic" design runs. It makes one host sync, for the count of active
rows. The atomic design, described next, makes none.

Memory: beyond the inputs and the gradients, the forward needs O(splits x N) floats and the
atomic backward a bounded fp32 scratch:

* fp32 inputs: the kernel adds straight into the fp32 gradients; no scratch at all.
* bf16/fp16 inputs: partial products are added in fp32 (adding them in bf16 would round
  thousands of times per element and fail the precision rule), into scratch buffers of at most
  ``LaunchOptions.scratch_fraction`` of the gradients' own size. dW is built vocabulary chunk by chunk
  (``[Vc, H]`` fp32, rounded once into dW), dH token chunk by token chunk (``[Nc, H]`` fp32).
  When the whole dH accumulator fits the budget, one launch per vocabulary chunk does both
  products from the same recomputed tile ("fused": 4 matrix products in all); otherwise dW and
  dH are separate passes that each recompute the logits (5 products).

No host sync in the forward and the atomic backward: which rows are active (valid in the
forward, ``g != 0`` in the backward) is decided on the device; programs read the active count
and return early past it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
import triton

from ..engine import (
    BackwardRequest,
    Capabilities,
    ForwardRequest,
    Grads,
    KernelOptions,
    RowPartials,
    parse_value,
    register_engine,
)
from ..products import MM_INTO_FP32, mm_into_fp32
from ..products import addmm_fp32 as _addmm_fp32  # shared with the chunked engine on a GPU
from .backward import gft_backward_kernel, gft_dlogits_kernel
from .forward import gft_forward_kernel


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
# Plain forward and dz tiles (no entropy, bias or softcap) are 256 rows high: measured faster on
# an H100 (forward 18.1 ms against 20.9 at Gemma-2-2B 8k, 2026-11-27); with those features this
# tile spills hundreds of bytes per thread, so they keep CUDA_FWD.
CUDA_FWD_PLAIN = Config(block_m=256, block_v=128, block_k=64, block_h=0, num_warps=8, num_stages=3)
CUDA_BWD = Config(block_m=128, block_v=128, block_k=64, block_h=64, num_warps=8, num_stages=3)
# fp32 (ieee) products run on the FMA units with their operands in registers: the 16-bit tiles
# would spill kilobytes per thread, these do not
CUDA_FWD32 = Config(block_m=64, block_v=128, block_k=32, block_h=0, num_warps=8, num_stages=2)
CUDA_BWD32 = Config(block_m=64, block_v=128, block_k=32, block_h=32, num_warps=8, num_stages=2)
# The cuBLAS plans' epilogues (the kernels reading a logits chunk): a memory-bound pass, on a
# tile that holds no product; 64 x 128 on 8 warps keeps every variant in registers on sm_90.
CUDA_EPILOGUE = Config(block_m=64, block_v=128, block_k=16, block_h=0, num_warps=8, num_stages=2)
INTERP_FWD = Config(block_m=16, block_v=32, block_k=16, block_h=0, num_warps=1, num_stages=1)
INTERP_BWD = Config(block_m=16, block_v=32, block_k=16, block_h=16, num_warps=1, num_stages=1)
FWD_CANDIDATES = (
    CUDA_FWD,
    CUDA_FWD_PLAIN,
    Config(block_m=128, block_v=128, block_k=64, block_h=0, num_warps=8, num_stages=4),
    Config(block_m=128, block_v=128, block_k=32, block_h=0, num_warps=4, num_stages=4),
    Config(block_m=64, block_v=128, block_k=64, block_h=0, num_warps=4, num_stages=3),
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


@dataclass(frozen=True)
class LaunchOptions:
    """How the Triton engine plans and launches (``gft_loss(..., launch_options=...)``; tuning
    and tests hand in others). The defaults are the measured choices (README, "Measured")."""

    # The backward design (backward.py): "split" (dz chunks + cuBLAS products, 4 products, no
    # atomics) where its scratch fits split_scratch_fraction of the gradients' bytes, else
    # "atomic"; "atomic" forces the atomic design (bounded scratch at any size: users at the
    # edge of memory).
    backward_design: str = "split"
    # "cublas": the split design with each dz chunk formed from logits that cuBLAS computed
    # (h_active @ W[chunk]^T into scratch, read by the dz kernel): all four products by cuBLAS,
    # at the cost of the logits chunk's memory traffic. Falls back as "split" does.
    # The forward design: "fused" (the products in the Triton kernel, the logits only on chip)
    # or "cublas" (each vocabulary chunk's logits by one cuBLAS product into scratch, the
    # statistics by the same kernel reading them; "fused" where the chunk does not fit).
    forward_design: str = "fused"
    # The cuBLAS plans' logits chunks: "fp32" (accumulated and written in fp32: the fused
    # kernels' precision) or "input" (written in the input dtype, rounded as naive PyTorch rounds
    # its logits: half the traffic, and dz overwrites them in place).
    logits_dtype: str = "fp32"
    # The cublas backward's fp32 logits of a dz chunk come in this many column pieces: their
    # scratch is then 4 / logits_pieces bytes per dz element (more pieces: thinner products).
    logits_pieces: int = 2
    # Largest fp32 scratch of the atomic design, as a fraction of the gradients' bytes.
    scratch_fraction: float = 0.04
    split_scratch_fraction: float = 0.09
    # Vocabulary columns per split chunk: as many as the budget allows, within these bounds
    # (fewer columns make the products too thin to run at the matmul rate), a multiple of
    # split_step; split_cols fixes it (tuning).
    split_min_cols: int = 1024
    split_max_cols: int = 8192
    split_min_rows: int = 512  # of the dH sweep's row chunks, when dH has its own sweep
    split_step: int = 256
    split_cols: int | None = None
    # Row blocks per group in the atomic backward's program order (see backward.py).
    bwd_group_m: int = 8
    # Forward programs per SM the vocabulary splits aim at. The 16-bit forward tile holds one
    # program per SM, so the grid runs in waves of #SMs programs of equal work; many waves make
    # the last, partly idle one a small fraction. The merge costs O(splits x N) floats.
    fwd_programs_per_sm: int = 16
    # CUDA tiles (forward-like, atomic backward) instead of the defaults by dtype and features.
    cuda_tiles: tuple[Config, Config] | None = None
    # Timing only (benchmarks/tune.py): the atomic kernel stores its partial products instead
    # of adding them, which prices the atomics. The gradients are then wrong.
    stores_only: bool = False

    def key(self) -> str:
        """Every field, as text (``KernelOptions.key``)."""
        tiles = (
            ""
            if self.cuda_tiles is None
            else ";".join(",".join(str(getattr(c, f)) for f in _CONFIG_FIELDS) for c in self.cuda_tiles)
        )
        return ",".join(str(getattr(self, f)) for f in _LAUNCH_FIELDS) + f",{tiles}"

    @classmethod
    def from_key(cls, key: str) -> LaunchOptions:
        *values, tiles = key.split(",", len(_LAUNCH_FIELDS))
        cuda_tiles = None
        if tiles:
            cuda_tiles = tuple(Config(*map(int, c.split(","))) for c in tiles.split(";"))
        return cls(**dict(zip(_LAUNCH_FIELDS, map(parse_value, values))), cuda_tiles=cuda_tiles)

    def __post_init__(self):
        if not (isinstance(self.logits_pieces, int) and self.logits_pieces >= 1):
            raise ValueError(f"logits_pieces must be an int >= 1, got {self.logits_pieces!r}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")


_CHOICES = {
    "backward_design": ("split", "atomic", "cublas"),
    "forward_design": ("fused", "cublas"),
    "logits_dtype": ("fp32", "input"),
}
DEFAULT_OPTIONS = LaunchOptions()
_CONFIG_FIELDS = tuple(f.name for f in fields(Config))
_LAUNCH_FIELDS = tuple(f.name for f in fields(LaunchOptions) if f.name != "cuda_tiles")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tiles(
    device: torch.device, dtype: torch.dtype, plain: bool = False, options: LaunchOptions = DEFAULT_OPTIONS
) -> tuple[Config, Config]:
    """(forward, backward) tiles of a launch on this device with inputs of this dtype; ``plain``:
    the forward-like kernel has no entropy, bias or softcap."""
    if device.type != "cuda":
        return INTERP_FWD, INTERP_BWD
    if options.cuda_tiles is not None:
        return options.cuda_tiles
    if dtype == torch.float32:
        return CUDA_FWD32, CUDA_BWD32
    return (CUDA_FWD_PLAIN if plain else CUDA_FWD), CUDA_BWD


def epilogue_tile(device: torch.device) -> Config:
    """The tile of the kernels that read a logits chunk cuBLAS computed (the cublas designs)."""
    return CUDA_EPILOGUE if device.type == "cuda" else INTERP_FWD


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


def _num_splits(n_blocks_m: int, n_blocks_v: int, device: torch.device, programs_per_sm: int) -> int:
    """Vocabulary splits so the forward grid fills the device (flash-decoding style)."""
    sms = _sm_count(device)
    if sms is None:
        return min(3, n_blocks_v)  # the interpreter: enough to test the merge
    return max(1, min(n_blocks_v // 8, triton.cdiv(programs_per_sm * sms, max(n_blocks_m, 1))))


@dataclass(frozen=True)
class BackwardPlan:
    fused: bool  # one pass computes dH and dW from the same tile
    rows_per_chunk: int  # Nc: rows of the fp32 dH scratch (dH pass)
    cols_per_chunk: int  # Vc: rows of the fp32 dW scratch


def plan_backward(n, v, h_dim, dtype, need_dh, need_dw, cfg: Config, scratch_fraction=None) -> BackwardPlan:
    """The atomic design's chunking within ``scratch_fraction`` of the gradients' bytes."""
    if dtype == torch.float32:
        return BackwardPlan(fused=True, rows_per_chunk=n, cols_per_chunk=v)
    frac = DEFAULT_OPTIONS.scratch_fraction if scratch_fraction is None else scratch_fraction
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
        dst.index_copy_(0, index[r0 : r0 + step], src32[r0 : r0 + step].to(dst.dtype))


@dataclass(frozen=True)
class SplitPlan:
    fused: bool  # one vocabulary sweep gives dW and dH (4 products); else dH has its own (5)
    cols_per_chunk: int  # Vc of the vocabulary sweep (dW, and dH when fused)
    rows_per_chunk: int  # rows of the dH sweep's fp32 accumulator when not fused
    cols_dh: int  # Vc of the dH sweep when not fused
    gather: bool  # some rows are skipped: the active rows of h are gathered for dW
    scratch_bytes: int

    @property
    def products(self) -> int:
        """Matrix products of forward + backward (2 N H V FLOPs each, at full activity)."""
        return 4 if self.fused else 5


def plan_split(
    n, n_active, v, h_dim, dtype, need_dh, need_dw, options: LaunchOptions = DEFAULT_OPTIONS, logits_bytes: int = 0
) -> SplitPlan | None:
    """The split design's chunking, or None when its scratch exceeds the budget.

    Scratch: dz ``[rows, Vc]`` in the input dtype; the fp32 dH accumulator (``[n_active, H]``
    when one sweep does both products, else ``[rows_per_chunk, H]`` in a second sweep over
    row chunks that recomputes the logits); the gathered active rows of h ``[n_active, H]`` for
    dW when some rows are skipped, unless dH is needed: then they are gathered into dH's own
    storage, unused until the end. ``options.split_cols`` fixes Vc (tuning).

    The cublas design adds, per dz element, ``logits_bytes / logits_pieces`` of logits (fp32
    logits: 4 bytes, computed in pieces; 0 when dz is written over them), and its row sweep
    gathers each row chunk of h for its product.
    """
    frac, cols = options.split_scratch_fraction, options.split_cols
    elem = torch.finfo(dtype).bits // 8
    budget = frac * elem * h_dim * ((n if need_dh else 0) + (v if need_dw else 0))
    gather = need_dw and n_active < n
    gather_bytes = n_active * h_dim * elem * (gather and not need_dh)
    n_rows = max(n_active, 1)
    per_elem = elem + logits_bytes / options.logits_pieces

    def fit_cols(rows, fixed):
        if cols is not None:
            return min(cols, v)
        fit = int((budget - fixed) // (rows * per_elem)) // options.split_step * options.split_step
        return min(fit, options.split_max_cols, v) if fit >= min(options.split_min_cols, v) else None

    acc_all = n_rows * h_dim * 4 if need_dh else 0
    one = fit_cols(n_rows, acc_all + gather_bytes)
    if one is not None or not need_dh:
        if one is None:
            return None
        return SplitPlan(True, one, n_rows, one, gather, int(gather_bytes + acc_all + n_rows * one * per_elem))
    # dH in row chunks: [rows, H] fp32 + [rows, Vc] dz per chunk (+ the rows of h, cublas)
    cols_a = fit_cols(n_rows, gather_bytes) if need_dw else 0
    cols_b = min(cols or options.split_max_cols // 2, v)
    row_bytes = h_dim * 4 + cols_b * per_elem + (h_dim * elem if options.backward_design == "cublas" else 0)
    rows_b = int(budget // row_bytes) // 16 * 16
    if cols_a is None or rows_b < min(options.split_min_rows, n_rows):
        return None
    scratch = max(gather_bytes + n_rows * cols_a * per_elem, rows_b * row_bytes)
    return SplitPlan(False, cols_a, min(rows_b, n_rows), cols_b, gather, int(scratch))


def _mm_into(out, a, b):
    """out = a @ b (cuBLAS: fp32 accumulation inside, one rounding into out's dtype)."""
    torch.mm(a, b, out=out)


def logits_dtype(weight: torch.Tensor, options: LaunchOptions) -> torch.dtype:
    """The dtype of the cuBLAS plans' logits chunks for this weight (``LaunchOptions.logits_dtype``):
    the input dtype on CUDA where this torch cannot write a 16-bit product in fp32."""
    fp32_possible = weight.device.type != "cuda" or MM_INTO_FP32
    return torch.float32 if options.logits_dtype == "fp32" and fp32_possible else weight.dtype


def _logits_into(out, a, w):
    """out = a @ w^T by cuBLAS: fp32 accumulation inside, one rounding into out's dtype."""
    if out.dtype == a.dtype:
        torch.mm(a, w.t(), out=out)
    elif not mm_into_fp32(out, a, w.t()):  # the CPU (tests): fp32 products of the exact operands
        torch.mm(a.float(), w.float().t(), out=out)


class _Backward:
    """One backward launch plan's shared state: the request, the kernels' tile and flags, the
    gradient buffers (dW in the input dtype, db summed in fp32)."""

    def __init__(self, request: BackwardRequest, options: KernelOptions, cfg: Config, order, n_active):
        (self.hidden, self.weight, self.bias, self.targets, _), self.rows, self.g, self.g_entropy, need = request
        self.need_dh, self.need_dw, self.need_db = need
        self.launch = options.launch or DEFAULT_OPTIONS
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


class _SplitBackward(_Backward):
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


class _AtomicBackward(_Backward):
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


def plan_logits_cols(n, v, h_dim, weight, options: LaunchOptions) -> int | None:
    """Vc of the cublas forward's ``[N, Vc]`` logits chunk within ``split_scratch_fraction`` of
    the gradients' bytes (as the split backward's scratch), or None where it does not fit."""
    if options.split_cols is not None:
        return min(options.split_cols, v)
    elem = torch.finfo(weight.dtype).bits // 8
    budget = options.split_scratch_fraction * elem * h_dim * (n + v)
    z_bytes = torch.finfo(logits_dtype(weight, options)).bits // 8
    fit = int(budget // (max(n, 1) * z_bytes)) // options.split_step * options.split_step
    return min(fit, options.split_max_cols, v) if fit >= min(options.split_min_cols, v) else None


class _Forward:
    """One forward launch plan: the request, the valid rows' order, the tile, the partials."""

    def __init__(self, request: ForwardRequest, options: KernelOptions, cfg: Config):
        self.request, self.options, self.cfg = request, options, cfg
        self.launch = options.launch or DEFAULT_OPTIONS
        self.n, self.h_dim = request.hidden.shape
        self.v = request.weight.shape[0]
        self.order, self.n_active = _active_order(request.valid)
        self.n_blocks_m = triton.cdiv(self.n, self.cfg.block_m)

    def splits_of(self, cols: int) -> int:
        """Columns per split, so that the grid over ``cols`` columns fills the device."""
        n_blocks_v = triton.cdiv(cols, self.cfg.block_v)
        splits = _num_splits(self.n_blocks_m, n_blocks_v, self.request.hidden.device, self.launch.fwd_programs_per_sm)
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


# What the Triton engine is built and checked for: NVIDIA GPUs of compute capability 8.0 or
# later whose blocks can opt into the shared memory of its largest default tile (144 KiB: the
# A100, H100, H200 and later data-centre parts; not the 99-KiB consumer cards), and the Triton
# the package requires (pyproject.toml: triton>=3.2; tests/kernels/test_validation.py keeps them equal).
MIN_CAPABILITY = (8, 0)
MIN_SHARED_BYTES = 144 * 1024
MIN_VERSION = (3, 2)


class TritonEngine:
    """The fused Triton engine (the contract: ``gft_kernels/engine.py``)."""

    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    launch_options = LaunchOptions
    capabilities = Capabilities(auto_rank=20, auto_devices=("cuda",), description="the fused Triton engine")

    def supports(self, hidden, options: KernelOptions) -> str | None:
        if not hidden.is_cuda and not interpreting():
            return (
                f"backend='triton' needs CUDA tensors (got device {hidden.device}); on a CPU it runs only "
                "under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)"
            )
        return None

    def suitable(self, hidden, options: KernelOptions) -> str | None:
        """The hardware ``backend="auto"`` takes this engine on (the Engine protocol's member)."""
        return self.unsuitable_hardware(hidden.device)

    def unsuitable_hardware(self, device) -> str | None:
        """Why ``backend="auto"`` does not take this engine on this CUDA device, or None."""
        if getattr(torch.version, "hip", None):
            return "ROCm GPUs are not a target the Triton engine is checked on"
        version = tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit())
        if version < MIN_VERSION:
            return f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_VERSION))}"
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return (
                f"compute capability {capability[0]}.{capability[1]} is below {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
            )
        shared = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
        if shared is None:  # an unknown amount is not a pass: the kernels would fail at launch
            return "this torch does not report the shared memory a block can use (shared_memory_per_block_optin)"
        if shared < MIN_SHARED_BYTES:
            return f"blocks can use {shared // 1024} KiB of shared memory, the kernels' tiles need {MIN_SHARED_BYTES // 1024}"
        return None

    def partials(self, request: ForwardRequest, options: KernelOptions) -> RowPartials:
        """Per-row partial statistics ``[splits, N]`` of the forward's vocabulary splits, in row
        order, zeros at rows that are not valid. Targets of -1 (``outside``) match no column:
        the kernels compare columns with the target id."""
        launch, (n, h_dim), v = options.launch or DEFAULT_OPTIONS, request.hidden.shape, request.weight.shape[0]
        if launch.forward_design == "cublas":
            cols = plan_logits_cols(n, v, h_dim, request.weight, launch)
            if cols is not None:
                return _Forward(request, options, epilogue_tile(request.hidden.device)).run_cublas(cols)
        plain = not options.with_entropy and request.bias is None and options.softcap is None
        cfg, _ = tiles(request.hidden.device, request.weight.dtype, plain, launch)
        return _Forward(request, options, cfg).run_fused()

    def backward(self, request: BackwardRequest, options: KernelOptions) -> Grads:
        launch = options.launch or DEFAULT_OPTIONS
        hidden, weight = request.inputs.hidden, request.inputs.weight
        n, h_dim = hidden.shape
        g, g_entropy, need = request.g, request.g_entropy, request.need
        order, n_active = _active_order(g != 0 if g_entropy is None else (g != 0) | (g_entropy != 0))
        if launch.backward_design != "atomic" and (need.dhidden or need.dweight):
            # One host sync: the products are sized to the active rows, so ignored and
            # zero-advantage tokens cost nothing.
            n_act = int(n_active)
            z_bytes = 0
            if launch.backward_design == "cublas" and logits_dtype(weight, launch) != weight.dtype:
                z_bytes = 4
            split = plan_split(
                n, n_act, weight.shape[0], h_dim, weight.dtype, need.dhidden, need.dweight, launch, z_bytes
            )
            if split is not None:
                cfg, _ = tiles(
                    hidden.device, weight.dtype, request.inputs.bias is None and options.softcap is None, launch
                )  # a forward-like tile: one product, then a store
                if launch.backward_design == "cublas":
                    cfg = epilogue_tile(hidden.device)
                return _SplitBackward(request, options, cfg, order, n_act).run(split)
        _, cfg = tiles(hidden.device, weight.dtype, options=launch)
        return _AtomicBackward(request, options, cfg, order, n_active).run()


ENGINE = register_engine(TritonEngine())
