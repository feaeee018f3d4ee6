"""The Triton engine's plans: data and decisions, no launches. The tiles (``Config``) by device,
dtype and features; ``LaunchOptions`` (designs, budgets, tiles); the forward's vocabulary splits;
the chunking of each backward design within its scratch budget (``plan_backward``: the atomic
design, ``plan_split``: the split and cublas designs; ``plan_logits_cols``: the cublas forward).
``runners.py`` launches what these decide; ``launch.py`` is the engine that picks between them."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import triton

from ..engine import parse_value
from ..products import MM_INTO_FP32


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

    # What the plans may hold beyond the gradients. "fast": the fastest exact plan whose peak is
    # within about 1.15x of the gradients' own bytes (the split and cublas designs' scratch
    # within split_scratch_fraction, widened to split_widened_fraction where that saves a
    # product: see plan_split). "min": every design's scratch within scratch_fraction, a peak
    # within 1.05x (users at the edge of memory).
    memory: str = "fast"
    # The backward design (backward.py): "split" (dz chunks + cuBLAS products, 4 products, no
    # atomics) where its scratch fits its budget (``memory``; plan_split), else "atomic";
    # "atomic" forces the atomic design (bounded scratch at any size).
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
    # memory="fast": the split and cublas designs' budget where dH's whole fp32 accumulator and a
    # dz chunk fit it but not split_scratch_fraction (N x H x 4 bytes is most of it at H 3584-4096,
    # 8k tokens); the rest of the op's peak (forward partials, rounding pieces) stays under 1%.
    # Planned (benchmarks/cpu_memory.py), not yet timed on a GPU.
    split_widened_fraction: float = 0.14
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
    "memory": ("fast", "min"),
}
DEFAULT_OPTIONS = LaunchOptions()
_CONFIG_FIELDS = tuple(f.name for f in fields(Config))
_LAUNCH_FIELDS = tuple(f.name for f in fields(LaunchOptions) if f.name != "cuda_tiles")


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


def _sm_count(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def num_splits(n_blocks_m: int, n_blocks_v: int, device: torch.device, programs_per_sm: int) -> int:
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
    """The split design's chunking, or None when its scratch exceeds every budget it may take.

    The budget, a fraction of the gradients' bytes, follows ``options.memory``. "min":
    ``scratch_fraction``. "fast": the fastest plan within the larger budget, judged without a GPU
    by fewer products first, then wider chunks: ``split_scratch_fraction``, or, where that gives
    two sweeps (5 products) or none and ``split_widened_fraction`` gives one sweep (4: dH's whole
    fp32 accumulator beside a dz chunk, at H 3584-4096 and 8k tokens), the widened budget. Where
    the 9% budget already gives one sweep it stays (its chunk width was timed on an H100); where
    even the widened one cannot hold one sweep, two sweeps within 9%. The GPU check
    (``benchmarks/tune.py``) times both budgets and ``memory="min"`` at the target shapes.

    Scratch: dz ``[rows, Vc]`` in the input dtype; the fp32 dH accumulator (``[n_active, H]``
    when one sweep does both products, else ``[rows_per_chunk, H]`` in a second sweep over
    row chunks that recomputes the logits); the gathered active rows of h ``[n_active, H]`` for
    dW when some rows are skipped, unless dH is needed: then they are gathered into dH's own
    storage, unused until the end. ``options.split_cols`` fixes Vc (tuning).

    The cublas design adds, per dz element, ``logits_bytes / logits_pieces`` of logits (fp32
    logits: 4 bytes, computed in pieces; 0 when dz is written over them), and its row sweep
    gathers each row chunk of h for its product.
    """
    shape = (n, n_active, v, h_dim, dtype, need_dh, need_dw, options, logits_bytes)
    if options.memory == "min":
        return _plan_split_within(options.scratch_fraction, *shape)
    plan = _plan_split_within(options.split_scratch_fraction, *shape)
    if plan is None or not plan.fused:
        widened = _plan_split_within(options.split_widened_fraction, *shape)
        if widened is not None and widened.fused:
            return widened
    return plan


def _plan_split_within(
    frac, n, n_active, v, h_dim, dtype, need_dh, need_dw, options: LaunchOptions, logits_bytes
) -> SplitPlan | None:
    """The split design's chunking within ``frac`` of the gradients' bytes (``plan_split``)."""
    cols = options.split_cols
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


def logits_dtype(weight: torch.Tensor, options: LaunchOptions) -> torch.dtype:
    """The dtype of the cuBLAS plans' logits chunks for this weight (``LaunchOptions.logits_dtype``):
    the input dtype on CUDA where this torch cannot write a 16-bit product in fp32."""
    fp32_possible = weight.device.type != "cuda" or MM_INTO_FP32
    return torch.float32 if options.logits_dtype == "fp32" and fp32_possible else weight.dtype


def plan_logits_cols(n, v, h_dim, weight, options: LaunchOptions) -> int | None:
    """Vc of the cublas forward's ``[N, Vc]`` logits chunk within ``split_scratch_fraction`` of
    the gradients' bytes (as the split backward's scratch; ``scratch_fraction`` with
    ``memory="min"``), or None where it does not fit."""
    if options.split_cols is not None:
        return min(options.split_cols, v)
    elem = torch.finfo(weight.dtype).bits // 8
    frac = options.scratch_fraction if options.memory == "min" else options.split_scratch_fraction
    budget = frac * elem * h_dim * (n + v)
    z_bytes = torch.finfo(logits_dtype(weight, options)).bits // 8
    fit = int(budget // (max(n, 1) * z_bytes)) // options.split_step * options.split_step
    return min(fit, options.split_max_cols, v) if fit >= min(options.split_min_cols, v) else None
