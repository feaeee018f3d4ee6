"""Time the Triton engine's plans and candidate tiles on the GPU, to choose the defaults from measurements.

    python -m benchmarks.tune [--out DIR] [--models gemma-2-2b,...] [--tokens 8192] [--budget-s 60]

First, at each shape (default: the three GPU target shapes), the plans head to head, forward and
backward apart, each with its peak memory: the fused forward against the cuBLAS forward (fp32
and input-dtype logits chunks), the split, cublas and atomic backwards, the chunk widths, and
90% zero-advantage sequences; one cuBLAS product of the shape is the unit. Then, at the first
shape, the tiles and knobs below.

Each forward candidate (``FWD_CANDIDATES`` in ``gft_kernels/triton_ops/launch.py``) is timed on
the forward kernel alone, each backward candidate on the backward alone (its plan at this
shape), both at one benchmark shape in bf16, and the backward's program grouping
(``LaunchOptions.bwd_group_m``) and the forward's grid size (``fwd_programs_per_sm``) at a few values. Every candidate's outputs are
compared with the default tiles' outputs, so a fast tile that computes something else shows up
as a mismatch, not as a winner. Rows go to ``DIR/tune_<date>T<time>_<device>.csv`` and a table. The
tiles were checked to compile and fit sm_90 beforehand (``python -m benchmarks.kernel_resources --sweep``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gft_kernels.engine import BackwardRequest, ForwardRequest, KernelOptions, Needs, forward
from gft_kernels.triton_ops import launch

from .run import RowFile, environment, make_inputs, make_targets, result_stem, time_ms
from .shapes import MODELS, Shape

FIELDS = [
    "date",
    "device",
    "torch",
    "triton",
    "gft",
    "shape",
    "n",
    "h",
    "v",
    "kernel",
    "forward_design",
    "design",
    "logits_dtype",
    "logits_pieces",
    "split_fraction",
    "widened_fraction",
    "memory",
    "plan",
    "tiles",
    "group_m",
    "programs_per_sm",
    "scratch_fraction",
    "split_cols",
    "zero_adv_frac",
    "stores_only",
    "default",
    "status",
    "products",
    "ms",
    "peak_mib",
    "tflops",
    "err_vs_default",
]


def _tiles(c: launch.Config) -> str:
    return f"{c.block_m}x{c.block_v}x{c.block_k}/h{c.block_h} w{c.num_warps} s{c.num_stages}"


def _rel(x, ref) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def plan_of(kernel, shape, dtype, cfg, options, n_active) -> tuple[float, str]:
    """(matrix products the kernel computes, in units of 2 N H V (the active rows' share); the
    plan that ran, as the launcher chose it: a design whose scratch does not fit falls back)."""
    frac = n_active / shape.n
    if kernel == "forward":
        if options.forward_design == "cublas":
            weight = torch.empty(0, dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu")
            cols = launch.plan_logits_cols(shape.n, shape.v, shape.h, weight, options)
            if cols is not None:
                return 1, f"cublas Vc={cols}"
        return 1, "fused"
    if options.backward_design != "atomic":
        weight = torch.empty(0, dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu")
        z_bytes = 4 if options.backward_design == "cublas" and launch.logits_dtype(weight, options) != dtype else 0
        plan = launch.plan_split(shape.n, n_active, shape.v, shape.h, dtype, True, True, options, z_bytes)
        if plan is not None:
            sweeps = "one sweep" if plan.fused else f"two sweeps (dH rows {plan.rows_per_chunk})"
            return round((plan.products - 1) * frac, 3), f"{options.backward_design} Vc={plan.cols_per_chunk} {sweeps}"
    plan = launch.plan_backward(shape.n, shape.v, shape.h, dtype, True, True, cfg, options.scratch_fraction)
    return round((3 if plan.fused else 4) * frac, 3), f"atomic {'fused' if plan.fused else 'two passes'}"


def knobs_of(
    design: str,
    group_m: int,
    programs_per_sm: int,
    scratch_fraction: float,
    split_cols=None,
    zero_adv_frac: float = 0.0,
    stores_only: bool = False,
    forward_design: str = "fused",
    logits_dtype: str = "fp32",
    logits_pieces: int = launch.DEFAULT_OPTIONS.logits_pieces,
    split_fraction: float = launch.DEFAULT_OPTIONS.split_scratch_fraction,
    widened_fraction: float = launch.DEFAULT_OPTIONS.split_widened_fraction,
    memory: str = launch.DEFAULT_OPTIONS.memory,
) -> dict:
    """One trial's launch knobs, as the CSV names them (``design``: the backward's)."""
    return dict(
        forward_design=forward_design,
        logits_dtype=logits_dtype,
        logits_pieces=logits_pieces,
        split_fraction=split_fraction,
        widened_fraction=widened_fraction,
        memory=memory,
        design=design,
        group_m=group_m,
        programs_per_sm=programs_per_sm,
        scratch_fraction=scratch_fraction,
        split_cols=split_cols,
        zero_adv_frac=zero_adv_frac,
        stores_only=stores_only,
    )


def options_of(knobs: dict, tiles=None) -> launch.LaunchOptions:
    return launch.LaunchOptions(
        forward_design=knobs["forward_design"],
        logits_dtype=knobs["logits_dtype"],
        logits_pieces=knobs["logits_pieces"],
        split_scratch_fraction=knobs["split_fraction"],
        split_widened_fraction=knobs["widened_fraction"],
        memory=knobs["memory"],
        backward_design=knobs["design"],
        scratch_fraction=knobs["scratch_fraction"],
        split_cols=knobs["split_cols"],
        bwd_group_m=knobs["group_m"],
        fwd_programs_per_sm=knobs["programs_per_sm"],
        stores_only=knobs["stores_only"],
        cuda_tiles=tiles,
    )


def plan_trials(default_fwd, default_bwd, base: dict) -> list[tuple[str, launch.Config, dict]]:
    """The plans head to head at one shape, most telling first (a budget cuts the tail): the
    product at this shape; the forward designs; the backward designs; their chunk widths; 90%
    zero-advantage sequences."""
    split, atomic = dict(base, design="split"), dict(base, design="atomic")
    cublas, cublas_in = dict(base, design="cublas"), dict(base, design="cublas", logits_dtype="input")
    fwd_cublas = dict(base, forward_design="cublas")
    out = [("matmul", default_fwd, base), ("forward", default_fwd, base)]
    out += [("forward", default_fwd, fwd_cublas), ("forward", default_fwd, dict(fwd_cublas, logits_dtype="input"))]
    out += [("backward", default_bwd, d) for d in (split, cublas, cublas_in, atomic)]
    # memory="min" (every plan within 4%: a 1.05x peak) beside the default
    out += [("backward", default_bwd, dict(d, memory="min")) for d in (split, cublas_in)]
    out += [("backward", default_bwd, dict(cublas, logits_pieces=k)) for k in (1, 4)]
    # the default widens the budget where dH's fp32 accumulator needs it (H 3584-4096: 4 products,
    # not 5); priced against the 9% plan's two sweeps, and a 15% budget's wider chunks everywhere
    no_widening = dict(widened_fraction=base["split_fraction"])
    out += [("backward", default_bwd, dict(d, **no_widening)) for d in (split, cublas_in)]
    out += [("backward", default_bwd, dict(d, split_fraction=0.15)) for d in (split, cublas_in)]
    out += [("backward", default_bwd, dict(d, split_cols=c)) for d in (split, cublas) for c in (2048, 4096, 8192)]
    out += [("forward", default_fwd, dict(fwd_cublas, split_cols=c)) for c in (2048, 8192)]
    out += [("backward", default_bwd, dict(d, zero_adv_frac=0.9)) for d in (split, cublas, atomic)]
    return out


def tile_trials(default_fwd, default_bwd, base: dict) -> list[tuple[str, launch.Config, dict]]:
    """The tiles and knobs, at one shape: the atomic design with its atomics replaced by plain
    stores (prices the atomics); the atomic design's program order and fused plan; the
    forward's grid size; the other tiles."""
    atomic = dict(base, design="atomic")
    gm0, pps0 = base["group_m"], base["programs_per_sm"]
    out = [("backward", default_bwd, dict(atomic, stores_only=True))]
    out += [("backward", default_bwd, dict(atomic, group_m=gm)) for gm in (1, 32, 1 << 20) if gm != gm0]
    out += [("backward", default_bwd, dict(atomic, scratch_fraction=1.0))]
    out += [("forward", default_fwd, dict(base, programs_per_sm=pps)) for pps in (4, 64) if pps != pps0]
    out += [("forward", c, base) for c in launch.FWD_CANDIDATES if c != default_fwd]
    out += [("backward", c, atomic) for c in launch.BWD_CANDIDATES if c != default_bwd]
    return out


class Tuner:
    """The inputs at one shape, the default tiles' outputs (every candidate is compared with them)
    and how to time one trial."""

    def __init__(self, shape: Shape, device: torch.device, smoke: bool):
        self.shape, self.device, self.smoke = shape, device, smoke
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter's bf16 dot is wrong
        self.hidden, self.weight, targets, adv = make_inputs(shape, self.dtype, device)
        self.g = self._upstream(targets, adv)
        self.inputs = ForwardRequest(self.hidden, self.weight, None, targets, targets != -100)
        self.default_fwd, self.default_bwd = launch.tiles(device, self.dtype, plain=True)
        d = launch.DEFAULT_OPTIONS
        self.base = knobs_of(d.backward_design, d.bwd_group_m, d.fwd_programs_per_sm, d.scratch_fraction)
        self.rows = self.fwd()
        self.ref_dh, self.ref_dw, _ = self.bwd(options_of(self.base))

    @staticmethod
    def _upstream(targets, adv):
        """dL/dlogp of a GFT-like loss (C = 1)."""
        valid = targets != -100
        return torch.where(valid, -adv / valid.sum(), 0.0).float()

    def upstream(self, zero_adv_frac: float):
        """The same with this fraction of zero-advantage sequences."""
        if not zero_adv_frac:
            return self.g
        return self._upstream(*make_targets(self.shape, self.device, zero_adv_frac))

    def fwd(self, options=None):
        return forward(launch.ENGINE, self.inputs, KernelOptions(launch=options))

    def bwd(self, options, g=None):
        request = BackwardRequest(self.inputs, self.rows, self.g if g is None else g, None, Needs(True, True, False))
        return launch.ENGINE.backward(request, KernelOptions(launch=options))

    def is_default(self, kernel: str, cfg, knobs: dict) -> bool:
        tiles = self.default_fwd if kernel == "forward" else self.default_bwd
        return cfg == tiles and all(knobs.get(k) == v for k, v in self.base.items())

    def time(self, kernel: str, cfg, knobs: dict) -> tuple[float, float, float, float | None]:
        """(ms, matrix products in units of 2 N H V, relative error against the default tiles,
        peak MiB beyond the inputs on CUDA)."""
        fwd_cfg, bwd_cfg = (cfg, self.default_bwd) if kernel != "backward" else (self.default_fwd, cfg)
        options = options_of(knobs, (fwd_cfg, bwd_cfg) if self.device.type == "cuda" else None)
        if kernel == "matmul":  # one [N, H] x [H, V] product, the floor's unit, at this shape
            wt = self.weight.t()
            return self._timed(lambda: self.hidden @ wt), (1, "cuBLAS"), 0.0, None
        if kernel == "forward":
            err = _rel(self.fwd(options)[0], self.rows.logp)
            ms, peak = self._timed(lambda: self.fwd(options), with_peak=True)
            return ms, plan_of(kernel, self.shape, self.dtype, fwd_cfg, options, self.shape.n), err, peak
        g = self.upstream(knobs["zero_adv_frac"])
        dh, dw, _ = self.bwd(options, g)
        err = 0.0
        if not knobs["stores_only"] and not knobs["zero_adv_frac"]:
            err = max(_rel(dh, self.ref_dh), _rel(dw, self.ref_dw))
        del dh, dw
        ms, peak = self._timed(lambda: self.bwd(options, g), with_peak=True)
        return ms, plan_of(kernel, self.shape, self.dtype, bwd_cfg, options, int((g != 0).sum())), err, peak

    def _timed(self, fn, with_peak=False):
        """fn's time; with ``with_peak``, also its peak allocation beyond what was held before
        (the outputs included: a backward's gradients are its lower bound), CUDA only."""
        peak = None
        if with_peak and self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            del out
        ms = time_ms(fn, self.device, quick=self.smoke)
        return (ms, peak) if with_peak else ms


def _shapes_and_device(args) -> tuple[list[Shape], torch.device]:
    if torch.cuda.is_available():
        return [Shape(m, args.tokens, *MODELS[m]) for m in args.models.split(",") if m], torch.device("cuda")
    if args.smoke:
        return [Shape("smoke", 32, 16, 64), Shape("smoke2", 40, 24, 72)], torch.device("cpu")
    raise SystemExit("benchmarks.tune times CUDA kernels; there is no GPU here (--smoke tests the script)")


def _print(kernel, cfg, plan, status, ms, tflops, err, peak):
    mem = "" if peak is None else f"{peak:8.0f} MiB"
    print(
        f"{kernel:<8} {_tiles(cfg):<26} {plan:<44} {status:<8} {ms:8.2f} ms {tflops:6.1f} TFLOP/s {mem} err {err:.2g}"
    )


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument(
        "--models", default="gemma-2-2b,llama-3.1-8b,qwen2.5-7b", help="comma-separated: " + ",".join(MODELS)
    )
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--budget-s", type=float, default=0.0, help="stop starting candidates after this many seconds")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="without a GPU: tiny shapes through Triton's interpreter (tests the script, not the tiles)",
    )
    args = ap.parse_args(argv)
    shapes, device = _shapes_and_device(args)
    env = environment(device)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tune_{result_stem(env)}.csv"
    csv_rows = RowFile(path, FIELDS)
    # every shape's plans first, then the tiles at the first shape (a budget cuts the tail)
    stages = [(shape, plan_trials) for shape in shapes] + [(shapes[0], tile_trials)]
    for shape, trials_of in stages:
        if args.budget_s and time.time() - started > args.budget_s:
            print(f"skipped at {shape.name}: time budget")  # not even the shape's inputs are drawn
            continue
        tuner = Tuner(shape, device, args.smoke)
        for kernel, cfg, knobs in trials_of(tuner.default_fwd, tuner.default_bwd, tuner.base):
            row = dict(
                env, shape=shape.name, n=shape.n, h=shape.h, v=shape.v, kernel=kernel, tiles=_tiles(cfg), **knobs
            )
            row["default"] = tuner.is_default(kernel, cfg, knobs)
            if args.budget_s and time.time() - started > args.budget_s:
                csv_rows.write(dict(row, status="skipped: time budget"))
                continue
            try:
                ms, (products, plan), err, peak = tuner.time(kernel, cfg, knobs)
            except Exception as e:  # a tile the device rejects (e.g. out of resources) is a result
                csv_rows.write(dict(row, status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:150]}"))
                continue
            status = "ok" if err < 1e-2 else "mismatch"
            tflops = products * 2 * shape.n * shape.h * shape.v / ms / 1e9
            peak_mib = None if peak is None else round(peak, 1)
            csv_rows.write(
                dict(row, status=status, plan=plan, products=products, ms=round(ms, 3), peak_mib=peak_mib)
                | dict(tflops=round(tflops, 1))
            )
            _print(kernel, cfg, plan, status, ms, tflops, err, peak)
        del tuner
    csv_rows.close()
    print(f"rows: {path}  ({time.time() - started:.0f} s)")
    return path


if __name__ == "__main__":
    main()
