"""How fast fp32 tile atomics reach global memory, the cost the atomic backward design pays.

    python -m benchmarks.atomics [--out DIR]        # on a GPU: GB/s of adds, each memory order
    python -m benchmarks.atomics --ptx              # anywhere: which instruction each order compiles to

Each program adds a ``[BLOCK, BLOCK]`` fp32 tile into a region of a scratch buffer, as the
atomic backward adds its partial dH and dW tiles (``tl.atomic_add``). ``sem="relaxed"`` with
the result unused can compile to the fire-and-forget ``red``; the default ``acq_rel`` gives
``atom``, which returns the old value. Plain stores of the same tiles are the ceiling.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
import triton
import triton.language as tl

BLOCK = 128


@triton.jit
def _add_tiles(src_ptr, dst_ptr, n_regions, REPEAT: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tile = tl.load(src_ptr + offs)
    for r in range(REPEAT):  # programs spread over the regions, as tiles over dW rows
        region = (pid * REPEAT + r) % n_regions
        dst = dst_ptr + region.to(tl.int64) * BLOCK * BLOCK + offs
        if MODE == "store":
            tl.store(dst, tile)
        elif MODE == "relaxed":
            tl.atomic_add(dst, tile, sem="relaxed")
        else:
            tl.atomic_add(dst, tile)


MODES = ("store", "relaxed", "acq_rel")


def ptx_instructions(arch: int = 90) -> dict:
    """The global-memory instruction each mode compiles to on sm_<arch> (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = {}
    for mode in MODES:
        sig = {
            "src_ptr": "*fp32",
            "dst_ptr": "*fp32",
            "n_regions": "i32",
            "REPEAT": "constexpr",
            "MODE": "constexpr",
            "BLOCK": "constexpr",
        }
        src = ASTSource(
            _add_tiles,
            sig,
            dict(REPEAT=4, MODE=mode, BLOCK=BLOCK),
            {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]},
        )
        ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=8)).asm["ptx"]
        ops = sorted(set(re.findall(r"\b(red\.global[\w.]*|atom\.global[\w.]*|st\.global[\w.]*)", ptx)))
        out[mode] = ops
    return out


def measure(mb_scratch: int = 512, programs: int = 132 * 16, repeat: int = 16) -> list[dict]:
    from triton.testing import do_bench

    src = torch.randn(BLOCK * BLOCK, device="cuda")
    n_regions = mb_scratch * 2**20 // (4 * BLOCK * BLOCK)
    dst = torch.zeros(n_regions * BLOCK * BLOCK, device="cuda")
    rows = []
    for mode in MODES:
        ms = do_bench(
            lambda mode=mode: _add_tiles[(programs,)](
                src, dst, n_regions, REPEAT=repeat, MODE=mode, BLOCK=BLOCK, num_warps=8
            ),
            warmup=10,
            rep=50,
            return_mode="median",
        )
        gbytes = programs * repeat * BLOCK * BLOCK * 4 / 1e9
        rows.append(dict(mode=mode, ms=round(ms, 4), gb_added_per_s=round(gbytes / (ms * 1e-3), 1)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ptx", action="store_true", help="only the compiled instructions (no GPU needed)")
    ap.add_argument("--out", default=None, help="folder for atomics.csv")
    args = ap.parse_args(argv)
    for mode, ops in ptx_instructions().items():
        print(f"{mode:<8} sm_90: {' '.join(ops)}")
    if args.ptx:
        return
    rows = measure()
    for r in rows:
        print(f"{r['mode']:<8} {r['ms']:8.3f} ms  {r['gb_added_per_s']:8.1f} GB/s of fp32 tiles added")
    if args.out:
        import csv

        path = Path(args.out) / "atomics.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["device", "mode", "ms", "gb_added_per_s"])
            w.writeheader()
            for r in rows:
                w.writerow(dict(device=torch.cuda.get_device_name(), **r))


if __name__ == "__main__":
    main()
