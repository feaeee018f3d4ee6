"""Time the Triton kernels' candidate tiles on the GPU, to choose the defaults from measurements.

    python -m benchmarks.tune [--out DIR] [--model gemma-2-2b] [--tokens 8192] [--budget-s 60]

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

from .run import RowFile, environment, make_inputs, result_stem, time_ms
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
    "design",
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
    "tflops",
    "err_vs_default",
]


def _tiles(c: launch.Config) -> str:
    return f"{c.block_m}x{c.block_v}x{c.block_k}/h{c.block_h} w{c.num_warps} s{c.num_stages}"


def _rel(x, ref) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _backward_products(shape, dtype, cfg, options, n_active) -> float:
    """Matrix products the backward computes, in units of 2 N H V (the active rows' share)."""
    frac = n_active / shape.n
    if options.backward_design == "split":
        plan = launch.plan_split(shape.n, n_active, shape.v, shape.h, dtype, True, True, options)
        if plan is not None:
            return round((plan.products - 1) * frac, 3)
    plan = launch.plan_backward(shape.n, shape.v, shape.h, dtype, True, True, cfg, options.scratch_fraction)
    return round((3 if plan.fused else 4) * frac, 3)


def knobs_of(
    design: str,
    group_m: int,
    programs_per_sm: int,
    scratch_fraction: float,
    split_cols=None,
    zero_adv_frac: float = 0.0,
    stores_only: bool = False,
) -> dict:
    """One trial's launch knobs, as the CSV names them."""
    return dict(
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
        backward_design=knobs["design"],
        scratch_fraction=knobs["scratch_fraction"],
        split_cols=knobs["split_cols"],
        bwd_group_m=knobs["group_m"],
        fwd_programs_per_sm=knobs["programs_per_sm"],
        stores_only=knobs["stores_only"],
        cuda_tiles=tiles,
    )


def trials(default_fwd, default_bwd, base: dict) -> list[tuple[str, launch.Config, dict]]:
    """What to time, most telling first (a budget cuts the tail): the matmul rate at this shape;
    the defaults; the two backward designs head to head; the split design's chunk width; the
    atomic design with its atomics replaced by plain stores (prices the atomics); both designs
    at 90% zero-advantage sequences; the atomic design's program order and fused plan; the
    forward's grid size; the other tiles."""
    split, atomic = dict(base, design="split"), dict(base, design="atomic")
    gm0, pps0 = base["group_m"], base["programs_per_sm"]
    out = [("matmul", default_fwd, base), ("forward", default_fwd, base)]
    out += [("backward", default_bwd, split), ("backward", default_bwd, atomic)]
    out += [("backward", default_bwd, dict(split, split_cols=c)) for c in (2048, 2560, 5120)]
    out += [("backward", default_bwd, dict(atomic, stores_only=True))]
    out += [("backward", default_bwd, dict(d, zero_adv_frac=0.9)) for d in (split, atomic)]
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
        _, _, t, a = make_inputs(self.shape, self.dtype, self.device, zero_adv_frac)
        return self._upstream(t, a)

    def fwd(self, options=None):
        return forward(launch.ENGINE, self.inputs, KernelOptions(launch=options))

    def bwd(self, options, g=None):
        request = BackwardRequest(self.inputs, self.rows, self.g if g is None else g, None, Needs(True, True, False))
        return launch.ENGINE.backward(request, KernelOptions(launch=options))

    def is_default(self, kernel: str, cfg, knobs: dict) -> bool:
        tiles = self.default_fwd if kernel == "forward" else self.default_bwd
        return cfg == tiles and all(knobs.get(k) == v for k, v in self.base.items())

    def time(self, kernel: str, cfg, knobs: dict) -> tuple[float, float, float]:
        """(ms, matrix products in units of 2 N H V, relative error against the default tiles)."""
        fwd_cfg, bwd_cfg = (cfg, self.default_bwd) if kernel != "backward" else (self.default_fwd, cfg)
        options = options_of(knobs, (fwd_cfg, bwd_cfg) if self.device.type == "cuda" else None)
        if kernel == "matmul":  # one [N, H] x [H, V] product, the floor's unit, at this shape
            wt = self.weight.t()
            return time_ms(lambda: self.hidden @ wt, self.device, quick=self.smoke), 1, 0.0
        if kernel == "forward":
            err = _rel(self.fwd(options)[0], self.rows.logp)
            return time_ms(lambda: self.fwd(options), self.device, quick=self.smoke), 1, err
        g = self.upstream(knobs["zero_adv_frac"])
        dh, dw, _ = self.bwd(options, g)
        err = 0.0
        if not knobs["stores_only"] and not knobs["zero_adv_frac"]:
            err = max(_rel(dh, self.ref_dh), _rel(dw, self.ref_dw))
        del dh, dw
        ms = time_ms(lambda: self.bwd(options, g), self.device, quick=self.smoke)
        return ms, _backward_products(self.shape, self.dtype, bwd_cfg, options, int((g != 0).sum())), err


def _shape_and_device(args) -> tuple[Shape, torch.device]:
    if torch.cuda.is_available():
        return Shape(args.model, args.tokens, *MODELS[args.model]), torch.device("cuda")
    if args.smoke:
        return Shape("smoke", 32, 16, 64), torch.device("cpu")
    raise SystemExit("benchmarks.tune times CUDA kernels; there is no GPU here (--smoke tests the script)")


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--model", default="gemma-2-2b", choices=list(MODELS))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--budget-s", type=float, default=0.0, help="stop starting candidates after this many seconds")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="without a GPU: a tiny shape through Triton's interpreter (tests the script, not the tiles)",
    )
    args = ap.parse_args(argv)
    shape, device = _shape_and_device(args)
    env = environment(device)
    tuner = Tuner(shape, device, args.smoke)
    flop = 2 * shape.n * shape.h * shape.v  # one matrix product
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tune_{result_stem(env)}.csv"
    csv_rows = RowFile(path, FIELDS)

    def row(kernel, cfg, knobs, **kw):
        csv_rows.write(
            dict(
                env,
                shape=shape.name,
                n=shape.n,
                h=shape.h,
                v=shape.v,
                kernel=kernel,
                tiles=_tiles(cfg),
                default=tuner.is_default(kernel, cfg, knobs),
                **knobs,
                **kw,
            )
        )

    for kernel, cfg, knobs in trials(tuner.default_fwd, tuner.default_bwd, tuner.base):
        if args.budget_s and time.time() - started > args.budget_s:
            row(kernel, cfg, knobs, status="skipped: time budget")
            continue
        try:
            ms, products, err = tuner.time(kernel, cfg, knobs)
        except Exception as e:  # a tile the device rejects (e.g. out of resources) is a result
            row(kernel, cfg, knobs, status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
            continue
        status = "ok" if err < 1e-2 else "mismatch"
        tflops = products * flop / ms / 1e9
        row(
            kernel,
            cfg,
            knobs,
            status=status,
            products=products,
            ms=round(ms, 3),
            tflops=round(tflops, 1),
            err_vs_default=float(f"{err:.3g}"),
        )
        what = f"{knobs['design']} cols {knobs['split_cols']}" if kernel == "backward" else ""
        print(
            f"{kernel:<8} {_tiles(cfg):<28} {what:<18} group {knobs['group_m']:<8} per-SM {knobs['programs_per_sm']:<3} "
            f"0adv {knobs['zero_adv_frac']:<3} stores {knobs['stores_only']:<1} {status:<8} {ms:8.2f} ms "
            f"{tflops:6.1f} TFLOP/s  err {err:.2g}"
        )

    csv_rows.close()
    print(f"rows: {path}  ({time.time() - started:.0f} s)")
    return path


if __name__ == "__main__":
    main()
