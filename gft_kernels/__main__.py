"""``python -m gft_kernels``: check every available backend against the float64 reference on a
random problem, and print the errors and times. A quick self-test for a new machine."""

from __future__ import annotations

import argparse
import time

import torch

from . import IGNORE_INDEX, gft_loss


def _run(hidden, weight, targets, adv, backend, dtype):
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    start = time.perf_counter()
    loss, stats = gft_loss(h, w, targets, adv, tau=0.7, backend=backend, return_stats=True)
    loss.backward()
    if h.is_cuda:
        torch.cuda.synchronize()
    return loss.double(), h.grad.double(), w.grad.double(), stats, time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024, help="tokens")
    ap.add_argument("--v", type=int, default=8000, help="vocabulary")
    ap.add_argument("--h", type=int, default=128, help="hidden size")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    hidden = torch.randn(args.n, args.h, device=device, dtype=torch.float64)
    weight = torch.randn(args.v, args.h, device=device, dtype=torch.float64) * args.h**-0.5
    targets = torch.randint(0, args.v, (args.n,), device=device)
    targets[::5] = IGNORE_INDEX
    adv = torch.randn(args.n, device=device, dtype=torch.float64)
    truth = _run(hidden, weight, targets, adv, "reference", torch.float64)
    print(
        f"device {device}, N={args.n} V={args.v} H={args.h}, tau=0.7; relative errors vs the float64 "
        "reference of the unrounded inputs (bf16 rows include rounding the inputs to bf16)"
    )
    print(f"{'backend':<10}{'dtype':<10}{'loss':>10}{'dhidden':>10}{'dlm_head':>10}{'time s':>9}")
    backends = ["torch", "triton"] if device == "cuda" else ["torch"]
    for backend in ["reference"] + backends:
        for dtype in (torch.float32, torch.bfloat16):
            out = _run(hidden, weight, targets, adv, backend, dtype)
            errs = [((a - b).norm() / b.norm()).item() for a, b in zip(out[:3], truth[:3])]
            print(f"{backend:<10}{str(dtype)[6:]:<10}" + "".join(f"{e:>10.1e}" for e in errs) + f"{out[4]:>9.3f}")
    stats = truth[3]
    print(f"rectified fraction {stats.rectified_frac.item():.3f}, mean target p {stats.mean_prob.item():.4f}")


if __name__ == "__main__":
    main()
