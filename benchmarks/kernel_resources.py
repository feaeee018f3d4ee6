"""Compile the fused kernels for a GPU that is not here, and report what the compiler made of them.

    python -m benchmarks.kernel_resources [--arch 90] [--sweep]

Triton compiles ahead of time without a GPU (its wheel carries ptxas and cuobjdump), so every
CUDA variant the launcher can build is checked on any machine, CI included: does it compile
for sm_90, how many registers, how much stack (spills), how much shared memory, and is the
inner loop software-pipelined (``cp.async`` or TMA in the PTX). Speed still needs the GPU
(``benchmarks/gpu_check.sh``); this catches what would waste a GPU session: a compile error on
the real backend, a tile that does not fit, a loop the pipeliner gave up on.

Must run with ``TRITON_INTERPRET`` unset (the interpreter replaces the jit functions).
``--sweep`` compiles the candidate tiles that ``benchmarks/tune.py`` times on the GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gft_kernels.triton_ops.backward import gft_backward_kernel, gft_dlogits_kernel
from gft_kernels.triton_ops.forward import gft_forward_kernel
from gft_kernels.triton_ops.launch import BWD_CANDIDATES, CUDA_EPILOGUE, DEFAULT_OPTIONS, FWD_CANDIDATES, Config, tiles

_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# H100/H200: the most shared memory one block may opt into
MAX_SHARED = 227 * 1024
_INT_ARGS = {
    "N",
    "V",
    "H",
    "stride_hn",
    "stride_wv",
    "stride_dz",
    "stride_db",
    "stride_z",
    "col_end",
    "split_base",
    "cols_per_split",
    "pos_begin",
    "n_pos",
    "col_begin",
    "n_cols",
}
_FLOAT_ARGS = {"inv_temp", "softcap"}
# integers Triton specializes as multiples of 16 at a typical launch (unless do_not_specialize)
_ALIGNED_ARGS = {"stride_hn", "stride_wv", "stride_dz", "stride_z", "H", "V", "N"}
_KERNELS = {"forward": gft_forward_kernel, "backward": gft_backward_kernel, "dlogits": gft_dlogits_kernel}


@dataclass(frozen=True)
class Variant:
    kernel: str  # "forward" | "backward" (atomic design) | "dlogits" (split design)
    dtype: str  # Triton's name of the input dtype: bf16 | fp16 | fp32
    cfg: Config
    flags: tuple  # constexpr feature flags, as (name, value) pairs
    logits: str = "fp32"  # the dtype of a given logits chunk (LOGITS_GIVEN): fp32, or the input dtype

    @property
    def name(self) -> str:
        on = [k.lower() for k, v in self.flags if v is True]
        c = self.cfg
        tile = f"{c.block_m}x{c.block_v}x{c.block_k}" + (f"/h{c.block_h}" if self.kernel == "backward" else "")
        z = f" z:{self.logits}" if dict(self.flags).get("LOGITS_GIVEN") else ""
        return f"{self.kernel} {self.dtype} {tile} w{c.num_warps}s{c.num_stages} {'+'.join(on) or '-'}{z}"


def _flags(**constexprs) -> tuple:
    """A kernel's compile-time flags, in the order given, as a Variant holds them."""
    return tuple(constexprs.items())


def _epilogue_variants(dt: str) -> list[Variant]:
    """The cuBLAS plans' kernels: the forward and dz kernels reading logits chunks (fp32, and the
    input dtype), on their tile."""
    out = []
    for entropy, extras in ((False, False), (True, True)):
        for z in dict.fromkeys(("fp32", dt)):  # once for fp32 inputs
            flags = _flags(WITH_ENTROPY=entropy, HAS_BIAS=extras, HAS_SOFTCAP=extras, LOGITS_GIVEN=True)
            out.append(Variant("forward", dt, CUDA_EPILOGUE, flags, z))
            flags = _flags(
                COMPUTE_DB=extras, HAS_BIAS=extras, HAS_SOFTCAP=extras, HAS_ENT_GRAD=entropy, LOGITS_GIVEN=True
            )
            out.append(Variant("dlogits", dt, CUDA_EPILOGUE, flags, z))
    return out


def default_variants() -> list[Variant]:
    """Every kernel specialization the launcher builds on CUDA with the default tiles."""
    out = []
    for dt in ("bf16", "fp16", "fp32"):
        fwd_cfg, bwd_cfg = tiles(torch.device("cuda"), _TORCH_DTYPE[dt])
        plain_cfg, _ = tiles(torch.device("cuda"), _TORCH_DTYPE[dt], plain=True)
        for entropy in (False, True):
            out.append(
                Variant(
                    "forward",
                    dt,
                    fwd_cfg if entropy else plain_cfg,
                    _flags(WITH_ENTROPY=entropy, HAS_BIAS=False, HAS_SOFTCAP=False),
                )
            )
        out.append(Variant("forward", dt, fwd_cfg, _flags(WITH_ENTROPY=False, HAS_BIAS=True, HAS_SOFTCAP=True)))
        # backward plans: fused dH+dW, dW (+db) alone, dH alone by chunk, dH by row (fp32 direct)
        plans = [(True, True, dt == "fp32"), (False, True, False), (True, False, dt == "fp32")]
        for dh, dw, by_row in plans:
            out.append(
                Variant(
                    "backward",
                    dt,
                    bwd_cfg,
                    _flags(
                        COMPUTE_DH=dh,
                        COMPUTE_DW=dw,
                        DH_BY_ROW=by_row,
                        COMPUTE_DB=False,
                        HAS_BIAS=False,
                        HAS_SOFTCAP=False,
                    ),
                )
            )
        out.append(
            Variant(
                "backward",
                dt,
                bwd_cfg,
                _flags(
                    COMPUTE_DH=True, COMPUTE_DW=True, DH_BY_ROW=False, COMPUTE_DB=True, HAS_BIAS=True, HAS_SOFTCAP=True
                ),
            )
        )
        # the split design's dz kernel runs on the forward's tile
        for extras in (False, True):
            out.append(
                Variant(
                    "dlogits",
                    dt,
                    fwd_cfg if extras else plain_cfg,
                    _flags(COMPUTE_DB=extras, HAS_BIAS=extras, HAS_SOFTCAP=extras),
                )
            )
        out += _epilogue_variants(dt)
        # an entropy bonus in the loss: its gradient through both designs
        out.append(
            Variant(
                "dlogits", dt, plain_cfg, _flags(COMPUTE_DB=False, HAS_BIAS=False, HAS_SOFTCAP=False, HAS_ENT_GRAD=True)
            )
        )
        out.append(
            Variant(
                "backward",
                dt,
                bwd_cfg,
                _flags(
                    COMPUTE_DH=True,
                    COMPUTE_DW=True,
                    DH_BY_ROW=dt == "fp32",
                    COMPUTE_DB=False,
                    HAS_BIAS=False,
                    HAS_SOFTCAP=False,
                    HAS_ENT_GRAD=True,
                ),
            )
        )
    return out


def sweep_variants(dtype="bf16") -> list[Variant]:
    fwd = [
        Variant("forward", dtype, c, (("WITH_ENTROPY", False), ("HAS_BIAS", False), ("HAS_SOFTCAP", False)))
        for c in FWD_CANDIDATES
    ]
    bwd = [
        Variant(
            "backward",
            dtype,
            c,
            (
                ("COMPUTE_DH", True),
                ("COMPUTE_DW", True),
                ("DH_BY_ROW", False),
                ("COMPUTE_DB", False),
                ("HAS_BIAS", False),
                ("HAS_SOFTCAP", False),
            ),
        )
        for c in BWD_CANDIDATES
    ]
    return fwd + bwd


def compile_variant(v: Variant, arch: int = 90, aligned: bool = True):
    fn = _KERNELS[v.kernel]
    c = v.cfg
    constexprs = dict(
        v.flags, UPCAST=False, INPUT_PRECISION="ieee", BLOCK_M=c.block_m, BLOCK_V=c.block_v, BLOCK_K=c.block_k
    )
    if v.kernel != "forward":
        constexprs.setdefault("HAS_ENT_GRAD", False)
    if v.kernel != "backward":
        constexprs.setdefault("LOGITS_GIVEN", False)  # the cuBLAS plans' epilogues set it
    if v.kernel == "backward":
        constexprs.update(BLOCK_H=c.block_h, GROUP_M=DEFAULT_OPTIONS.bwd_group_m, STORES_ONLY=False)
    inputs = {"h_ptr", "w_ptr", "b_ptr", "dz_ptr"}
    int64 = {"tgt_ptr", "order_ptr"}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _INT_ARGS:
            sig[name] = "i32"
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        elif name == "n_active_ptr":
            sig[name] = "*i32"
        elif name == "z_ptr":
            sig[name] = "*" + v.logits
        else:
            sig[name] = "*" + (v.dtype if name in inputs else "i64" if name in int64 else "fp32")
    dont = set(fn.do_not_specialize)
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if sig[name].startswith("*") or (aligned and name in _ALIGNED_ARGS and name not in dont):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(
        ASTSource(fn, sig, constexprs, attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=c.num_warps, num_stages=c.num_stages),
    )


def resources(kernel) -> dict:
    """Registers, stack, shared memory and pipelining of a compiled kernel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        dump = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    use = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK):(\d+)", dump)}
    ptx = kernel.asm["ptx"]
    return dict(
        regs=use.get("reg", -1),
        stack=use.get("stack", -1),
        shared=kernel.metadata.shared,
        pipelined="cp.async" in ptx,  # TMA copies are cp.async.bulk: also matched
        tensor_cores="wgmma" in ptx or "mma.sync" in ptx,
    )


def report(variants, arch=90, aligned=True) -> list[dict]:
    rows = []
    for v in variants:
        try:
            r = dict(variant=v.name, ok=True, **resources(compile_variant(v, arch, aligned)))
            r["has_matmul"] = not dict(v.flags).get("LOGITS_GIVEN", False)  # an epilogue has no loop to pipeline
        except Exception as e:  # report every failure, not only the first
            r = dict(variant=v.name, ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        rows.append(r)
    return rows


# a few spilled words are noise; hundreds of bytes per thread is a tile that does not fit
MAX_STACK = 256


def problems(rows, aligned=True) -> list[str]:
    """What would make a kernel fail or crawl on the GPU."""
    out = []
    for r in rows:
        if not r["ok"]:
            out.append(f"{r['variant']}: does not compile: {r['error']}")
            continue
        if r["shared"] > MAX_SHARED:
            out.append(f"{r['variant']}: needs {r['shared']} B of shared memory, the device has {MAX_SHARED}")
        if r["stack"] > MAX_STACK:
            out.append(f"{r['variant']}: spills ({r['stack']} B of stack per thread)")
        if aligned and r["has_matmul"] and not r["pipelined"]:
            out.append(f"{r['variant']}: the matmul loop is not pipelined")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    ap.add_argument("--sweep", action="store_true", help="the tuning candidates instead of the defaults")
    ap.add_argument("--unaligned", action="store_true", help="sizes not multiples of 16 (e.g. hidden 1000)")
    ap.add_argument(
        "--check", action="store_true", help="exit 1 on a compile failure, spill, oversized or unpipelined tile"
    )
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    variants = sweep_variants() if args.sweep else default_variants()
    print(f"triton {triton.__version__}, sm_{args.arch}, sizes {'unaligned' if args.unaligned else 'multiples of 16'}")
    rows = report(variants, args.arch, not args.unaligned)
    for r in rows:
        if r["ok"]:
            print(
                f"{r['variant']:<62} regs {r['regs']:>3}  stack {r['stack']:>4} B  shared {r['shared'] // 1024:>3} KiB"
                f"  {'pipelined' if r['pipelined'] else 'NOT pipelined'}"
            )
        else:
            print(f"{r['variant']:<62} FAILED {r['error']}")
    found = problems(rows, not args.unaligned)
    for p in found:
        print("PROBLEM", p)
    if args.check and found:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
