"""The chunked CPU engine against naive PyTorch, side by side: the ratio of their times.

    python -m benchmarks.cpu_ratio [--threads 1,2] [--rounds 7] [--out DIR]

On a shared machine absolute times move with the other work on it, so each round times naive
PyTorch and the ``torch`` engine back to back (forward + backward, the benchmark's providers and
inputs: fp32, advantages per sequence, prompt tokens ignored), alternating which goes first, and
the figure is the ratio within a round. Rows (every round, both times) go to
``DIR/<date>T<time>_cpu-ratio.csv``; the table printed gives, per thread count and shape, the
median of the rounds' ratios with their min-max, and the median times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import gft_kernels

from .providers import BY_NAME
from .run import RowFile, make_inputs
from .shapes import CPU_SHAPES

PROVIDERS = ("naive_eager", "gft_torch")
FIELDS = [
    "date",
    "time_utc",
    "cpu",
    "nproc",
    "torch",
    "gft",
    "threads",
    "shape",
    "n",
    "h",
    "v",
    "dtype",
    "round",
    "first",
    "naive_eager_ms",
    "gft_torch_ms",
    "ratio",
]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fwd_bwd_ms(loss_fn, hidden, weight, targets, adv) -> float:
    hidden.grad = weight.grad = None
    start = time.perf_counter()
    loss_fn(hidden, weight, targets, adv).backward()
    return (time.perf_counter() - start) * 1e3


def rounds(shape, threads: int, n_rounds: int):
    """Yield (round, first provider, {provider: ms}) for ``n_rounds`` rounds at ``threads``."""
    torch.set_num_threads(threads)
    hidden, weight, targets, adv = make_inputs(shape, torch.float32, torch.device("cpu"))
    hidden.requires_grad_()
    weight.requires_grad_()
    fns = {name: BY_NAME[name].build() for name in PROVIDERS}
    for fn in fns.values():  # warm-up
        _fwd_bwd_ms(fn, hidden, weight, targets, adv)
    for r in range(n_rounds):
        order = PROVIDERS if r % 2 == 0 else PROVIDERS[::-1]  # drift hits both in turn
        ms = {}
        for name in order:
            gc.collect()
            ms[name] = _fwd_bwd_ms(fns[name], hidden, weight, targets, adv)
        yield r, order[0], ms


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_ratio", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--shapes",
        default=",".join(s.name for s in CPU_SHAPES),
        help="comma-separated subset of: " + ",".join(s.name for s in CPU_SHAPES),
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    shapes = [s for s in CPU_SHAPES if s.name in args.shapes.split(",")]
    now = dt.datetime.now(dt.timezone.utc)
    env = dict(
        date=now.date().isoformat(),
        cpu=cpu_model(),
        nproc=os.cpu_count(),
        torch=torch.__version__,
        gft=gft_kernels.__version__,
        dtype="float32",
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{now:%Y-%m-%dT%H%M}_cpu-ratio.csv"
    rows = RowFile(path, FIELDS)
    summary = []
    for threads in [int(t) for t in args.threads.split(",") if t]:
        for shape in shapes:
            ratios, times = [], {p: [] for p in PROVIDERS}
            for r, first, ms in rounds(shape, threads, args.rounds):
                ratio = ms["gft_torch"] / ms["naive_eager"]
                ratios.append(ratio)
                for p in PROVIDERS:
                    times[p].append(ms[p])
                rows.write(
                    dict(
                        env,
                        time_utc=f"{dt.datetime.now(dt.timezone.utc):%H:%M:%S}",
                        threads=threads,
                        shape=shape.name,
                        n=shape.n,
                        h=shape.h,
                        v=shape.v,
                        round=r,
                        first=first,
                        naive_eager_ms=round(ms["naive_eager"], 1),
                        gft_torch_ms=round(ms["gft_torch"], 1),
                        ratio=round(ratio, 4),
                    )
                )
            summary.append(
                (
                    threads,
                    shape,
                    statistics.median(ratios),
                    min(ratios),
                    max(ratios),
                    statistics.median(times["gft_torch"]),
                    statistics.median(times["naive_eager"]),
                )
            )
    rows.close()
    print(f"{env['cpu']}, nproc {env['nproc']}, torch {env['torch']}, {env['date']}, {args.rounds} rounds")
    print("| threads | shape | torch engine / naive (median, min-max over rounds) | torch engine ms | naive ms |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for threads, shape, med, lo, hi, t_gft, t_naive in summary:
        print(
            f"| {threads} | N = {shape.n}, V = {shape.v}, H = {shape.h} | {med:.2f} ({lo:.2f}-{hi:.2f}) "
            f"| {t_gft:.0f} | {t_naive:.0f} |"
        )
    print(f"rows: {path}")
    return path


if __name__ == "__main__":
    main()
