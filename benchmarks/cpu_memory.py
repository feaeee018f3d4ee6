"""Peak resident memory of the GFT loss on the CPU, forward + backward, in a fresh process.

    python -m benchmarks.cpu_memory [--provider torch|reference] [--n 4096 --v 32000 --h 256]

Peak RSS (``ru_maxrss``) is what a CPU user pays, allocator slack included. The "extra" memory
is the peak minus the resident size after the inputs exist, minus the gradients themselves;
it is reported in units of one ``N x V`` fp32 logits buffer. Each measurement runs in its own
subprocess, since the peak of a process never goes down.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _measure_here(provider: str, n: int, v: int, h: int) -> dict:
    import torch

    import gft_kernels

    torch.manual_seed(0)
    hidden = torch.randn(n, h).requires_grad_()
    weight = (torch.randn(v, h) * h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,))
    targets[::7] = -100
    adv = torch.randn(n)
    base = _rss_bytes()
    start = time.perf_counter()
    loss = gft_kernels.gft_loss(hidden, weight, targets, adv, tau=0.7, backend=provider)
    loss.backward()
    seconds = time.perf_counter() - start
    grad_bytes = 4 * (n * h + v * h)
    extra = _rss_bytes() - base - grad_bytes
    logits_bytes = 4 * n * v
    return dict(provider=provider, n=n, v=v, h=h, seconds=round(seconds, 3),
                extra_mib=round(extra / 2**20, 1), logits_buffer_mib=round(logits_bytes / 2**20, 1),
                extra_over_logits=round(extra / logits_bytes, 3))


def measure(provider: str = "torch", n: int = 4096, v: int = 32000, h: int = 256) -> dict:
    """Run one measurement in a fresh Python process; returns its row."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.cpu_memory", "--inner", "--provider", provider,
         "--n", str(n), "--v", str(v), "--h", str(h)],
        check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", default=None, help="torch or reference (default: both)")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner:
        print(json.dumps(_measure_here(args.provider, args.n, args.v, args.h)))
        return
    for provider in [args.provider] if args.provider else ["torch", "reference"]:
        print(json.dumps(measure(provider, args.n, args.v, args.h)))


if __name__ == "__main__":
    main()
