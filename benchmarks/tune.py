"""Time the Triton kernels' candidate tiles on the GPU, to choose the defaults from measurements.

    python -m benchmarks.tune [--out DIR] [--model gemma-2-2b] [--tokens 8192] [--budget-s 60]

Each forward candidate (``FWD_CANDIDATES`` in ``gft_kernels/triton_ops/launch.py``) is timed on
the forward kernel alone, each backward candidate on the backward alone (its plan at this
shape), both at one benchmark shape in bf16, and the backward's program grouping
(``BWD_GROUP_M``) and the forward's grid size (``FWD_PROGRAMS_PER_SM``) at a few values. Every candidate's outputs are
compared with the default tiles' outputs, so a fast tile that computes something else shows up
as a mismatch, not as a winner. Rows go to ``DIR/tune_<date>T<time>_<device>.csv`` and a table. The
tiles were checked to compile and fit sm_90 beforehand (``python -m benchmarks.kernel_resources --sweep``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gft_kernels.triton_ops import launch

from .run import RowFile, environment, make_inputs, result_stem, time_ms
from .shapes import MODELS, Shape

FIELDS = ["date", "device", "torch", "triton", "gft", "shape", "n", "h", "v", "kernel", "tiles", "group_m", "programs_per_sm",
          "scratch_fraction", "default", "status", "products", "ms", "tflops", "err_vs_default"]


def _tiles(c: launch.Config) -> str:
    return f"{c.block_m}x{c.block_v}x{c.block_k}/h{c.block_h} w{c.num_warps} s{c.num_stages}"


def _rel(x, ref) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


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
    default_fwd, default_bwd = launch.tiles(device, dtype)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tune_{result_stem(env)}.csv"
    csv_rows = RowFile(path, FIELDS)

    def row(kernel, cfg, **kw):
        csv_rows.write(dict(env, shape=shape.name, n=shape.n, h=shape.h, v=shape.v, kernel=kernel, tiles=_tiles(cfg),
                             default=cfg == (default_fwd if kernel == "forward" else default_bwd)
                             and kw["group_m"] == launch.BWD_GROUP_M
                             and kw["programs_per_sm"] == launch.FWD_PROGRAMS_PER_SM
                             and kw["scratch_fraction"] == launch.SCRATCH_FRACTION, **kw))

    def fwd():
        return launch.forward(hidden, weight, None, targets, valid, 1.0, None, False)

    ref_logp, m, log_s, q, _ = fwd()

    def bwd(scratch_fraction=None):
        return launch.backward(hidden, weight, None, targets, m, log_s, q, g, 1.0, None, True, True, False,
                               scratch_fraction=scratch_fraction)

    ref_dh, ref_dw, _ = bwd()
    # What to time, most telling first (a budget cuts the tail): the defaults; the backward's
    # program order (row blocks per group; 1: programs running together share rows, 1 << 20:
    # they share columns, the plain row-major order); the fused backward plan forced (4 products
    # instead of 5 where the default budget splits it; its fp32 dH accumulator breaks the memory
    # target, so this prices that target); the forward's grid size; the other tiles.
    gm0, pps0 = launch.BWD_GROUP_M, launch.FWD_PROGRAMS_PER_SM
    base = dict(group_m=gm0, programs_per_sm=pps0, scratch_fraction=launch.SCRATCH_FRACTION)
    trials = [("forward", default_fwd, base), ("backward", default_bwd, base)]
    trials += [("backward", default_bwd, dict(base, group_m=gm)) for gm in (1, 32, 1 << 20) if gm != gm0]
    trials += [("backward", default_bwd, dict(base, scratch_fraction=1.0))]
    trials += [("forward", default_fwd, dict(base, programs_per_sm=pps)) for pps in (4, 64) if pps != pps0]
    trials += [("forward", c, base) for c in launch.FWD_CANDIDATES if c != default_fwd]
    trials += [("backward", c, base) for c in launch.BWD_CANDIDATES if c != default_bwd]
    for kernel, cfg, knobs in trials:
        if args.budget_s and time.time() - started > args.budget_s:
            row(kernel, cfg, status="skipped: time budget", **knobs)
            continue
        fwd_cfg, bwd_cfg = (cfg, default_bwd) if kernel == "forward" else (default_fwd, cfg)
        try:
            with launch.cuda_configs(fwd_cfg, bwd_cfg, knobs["group_m"], knobs["programs_per_sm"]):
                if kernel == "forward":
                    err = _rel(fwd()[0], ref_logp)
                    ms = time_ms(fwd, device, quick=args.smoke)
                    products = 1
                else:
                    fraction = knobs["scratch_fraction"]
                    dh, dw, _ = bwd(fraction)
                    err = max(_rel(dh, ref_dh), _rel(dw, ref_dw))
                    ms = time_ms(lambda: bwd(fraction), device, quick=args.smoke)
                    plan = launch.plan_backward(shape.n, shape.v, shape.h, dtype, True, True, bwd_cfg, fraction)
                    products = 3 if plan.fused else 4
        except Exception as e:  # a tile the device rejects (e.g. out of resources) is a result
            row(kernel, cfg, status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:150]}", **knobs)
            continue
        status = "ok" if err < 1e-2 else "mismatch"
        tflops = products * flop / ms / 1e9
        row(kernel, cfg, status=status, products=products, **knobs, ms=round(ms, 3), tflops=round(tflops, 1),
            err_vs_default=float(f"{err:.3g}"))
        print(f"{kernel:<8} {_tiles(cfg):<28} group {knobs['group_m']:<8} per-SM {knobs['programs_per_sm']:<3} "
              f"scratch {knobs['scratch_fraction']:<5} {status:<8} {ms:8.2f} ms  {tflops:6.1f} TFLOP/s  err {err:.2g}")

    csv_rows.close()
    print(f"rows: {path}  ({time.time() - started:.0f} s)")
    return path


if __name__ == "__main__":
    main()
