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

FIELDS = ["date", "device", "torch", "triton", "gft", "shape", "n", "h", "v", "kernel", "design", "tiles", "group_m",
          "programs_per_sm", "scratch_fraction", "split_cols", "zero_adv_frac", "stores_only", "default", "status",
          "products", "ms", "tflops", "err_vs_default"]


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


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--model", default="gemma-2-2b", choices=list(MODELS))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--budget-s", type=float, default=0.0, help="stop starting candidates after this many seconds")
    ap.add_argument("--smoke", action="store_true",
                    help="without a GPU: a tiny shape through Triton's interpreter (tests the script, not the tiles)")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        shape = Shape(args.model, args.tokens, *MODELS[args.model])
    elif args.smoke:
        device = torch.device("cpu")
        shape = Shape("smoke", 32, 16, 64)
    else:
        raise SystemExit("benchmarks.tune times CUDA kernels; there is no GPU here (--smoke tests the script)")
    env = environment(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter's bf16 dot is wrong
    hidden, weight, targets, adv = make_inputs(shape, dtype, device)
    valid = targets != -100
    g = torch.where(valid, -adv / valid.sum(), 0.0).float()  # a GFT-like dL/dlogp (C = 1)
    flop = 2 * shape.n * shape.h * shape.v  # one matrix product
    default_fwd, default_bwd = launch.tiles(device, dtype, plain=True)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tune_{result_stem(env)}.csv"
    csv_rows = RowFile(path, FIELDS)

    def row(kernel, cfg, **kw):
        csv_rows.write(dict(env, shape=shape.name, n=shape.n, h=shape.h, v=shape.v, kernel=kernel, tiles=_tiles(cfg),
                            default=cfg == (default_fwd if kernel == "forward" else default_bwd)
                            and all(kw.get(k) == v for k, v in base.items()), **kw))

    inputs = ForwardRequest(hidden, weight, None, targets, valid)

    def fwd(options=None):
        return forward(launch.ENGINE, inputs, KernelOptions(launch=options))

    rows = fwd()
    ref_logp = rows.logp

    def upstream(zero_adv_frac):
        """dL/dlogp of a GFT-like loss (C = 1) with this fraction of zero-advantage sequences."""
        if not zero_adv_frac:
            return g
        _, _, t, a = make_inputs(shape, dtype, device, zero_adv_frac)
        ok = t != -100
        return torch.where(ok, -a / ok.sum(), 0.0).float()

    def options_of(knobs, tiles=None):
        return launch.LaunchOptions(
            backward_design=knobs["design"], scratch_fraction=knobs["scratch_fraction"], split_cols=knobs["split_cols"],
            bwd_group_m=knobs["group_m"], fwd_programs_per_sm=knobs["programs_per_sm"], stores_only=knobs["stores_only"],
            cuda_tiles=tiles)

    def bwd(options, g_=None):
        request = BackwardRequest(inputs, rows, g if g_ is None else g_, None, Needs(True, True, False))
        return launch.ENGINE.backward(request, KernelOptions(launch=options))

    d = launch.DEFAULT_OPTIONS
    gm0, pps0 = d.bwd_group_m, d.fwd_programs_per_sm
    base = dict(design=d.backward_design, group_m=gm0, programs_per_sm=pps0,
                scratch_fraction=d.scratch_fraction, split_cols=None, zero_adv_frac=0.0, stores_only=False)
    ref_dh, ref_dw, _ = bwd(options_of(base))
    # What to time, most telling first (a budget cuts the tail): the matmul rate at this shape;
    # the defaults; the two backward designs head to head; the split design's chunk width; the
    # atomic design with its atomics replaced by plain stores (prices the atomics); both designs
    # at 90% zero-advantage sequences; the atomic design's program order and fused plan; the
    # forward's grid size; the other tiles.
    split, atomic = dict(base, design="split"), dict(base, design="atomic")
    trials = [("matmul", default_fwd, base), ("forward", default_fwd, base)]
    trials += [("backward", default_bwd, split), ("backward", default_bwd, atomic)]
    trials += [("backward", default_bwd, dict(split, split_cols=c)) for c in (2048, 2560, 5120)]
    trials += [("backward", default_bwd, dict(atomic, stores_only=True))]
    trials += [("backward", default_bwd, dict(d, zero_adv_frac=0.9)) for d in (split, atomic)]
    trials += [("backward", default_bwd, dict(atomic, group_m=gm)) for gm in (1, 32, 1 << 20) if gm != gm0]
    trials += [("backward", default_bwd, dict(atomic, scratch_fraction=1.0))]
    trials += [("forward", default_fwd, dict(base, programs_per_sm=pps)) for pps in (4, 64) if pps != pps0]
    trials += [("forward", c, base) for c in launch.FWD_CANDIDATES if c != default_fwd]
    trials += [("backward", c, atomic) for c in launch.BWD_CANDIDATES if c != default_bwd]
    for kernel, cfg, knobs in trials:
        if args.budget_s and time.time() - started > args.budget_s:
            row(kernel, cfg, status="skipped: time budget", **knobs)
            continue
        fwd_cfg, bwd_cfg = (cfg, default_bwd) if kernel != "backward" else (default_fwd, cfg)
        err = 0.0
        try:
            options = options_of(knobs, (fwd_cfg, bwd_cfg) if device.type == "cuda" else None)
            if kernel == "matmul":  # one [N, H] x [H, V] product, the floor's unit, at this shape
                wt = weight.t()
                ms = time_ms(lambda: hidden @ wt, device, quick=args.smoke)
                products = 1
            elif kernel == "forward":
                err = _rel(fwd(options)[0], ref_logp)
                ms = time_ms(lambda: fwd(options), device, quick=args.smoke)
                products = 1
            else:
                g_ = upstream(knobs["zero_adv_frac"])
                dh, dw, _ = bwd(options, g_)
                if not knobs["stores_only"] and not knobs["zero_adv_frac"]:
                    err = max(_rel(dh, ref_dh), _rel(dw, ref_dw))
                del dh, dw
                ms = time_ms(lambda: bwd(options, g_), device, quick=args.smoke)
                products = _backward_products(shape, dtype, bwd_cfg, options, int((g_ != 0).sum()))
        except Exception as e:  # a tile the device rejects (e.g. out of resources) is a result
            row(kernel, cfg, status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:150]}", **knobs)
            continue
        status = "ok" if err < 1e-2 else "mismatch"
        tflops = products * flop / ms / 1e9
        row(kernel, cfg, status=status, products=products, **knobs, ms=round(ms, 3), tflops=round(tflops, 1),
            err_vs_default=float(f"{err:.3g}"))
        what = f"{knobs['design']} cols {knobs['split_cols']}" if kernel == "backward" else ""
        print(f"{kernel:<8} {_tiles(cfg):<28} {what:<18} group {knobs['group_m']:<8} per-SM {knobs['programs_per_sm']:<3} "
              f"0adv {knobs['zero_adv_frac']:<3} stores {knobs['stores_only']:<1} {status:<8} {ms:8.2f} ms "
              f"{tflops:6.1f} TFLOP/s  err {err:.2g}")

    csv_rows.close()
    print(f"rows: {path}  ({time.time() - started:.0f} s)")
    return path


if __name__ == "__main__":
    main()
