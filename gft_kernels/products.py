"""Matrix products with fp32 results from 16-bit operands, shared by the engines that hand their
products to cuBLAS (the Triton engine's split backward, the chunked engine on a GPU).

How torch gives an fp32 result of a 16-bit product is decided once, from the operators'
schemas: never switched by an exception, which could be an out-of-memory error that says
nothing about what the torch build supports. ``out_dtype`` keeps the operands in their dtype
(the tensor cores accumulate in fp32) and writes fp32; without it (an older torch) the
operands are copied to fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def addmm_path() -> str:
    """How 16-bit products are added into fp32 accumulators (benchmarks report it)."""
    if "dtype_out" in torch.ops.aten.addmm.overloads():
        return "addmm_out_dtype"
    if "dtype" in torch.ops.aten.mm.overloads():
        return "mm_then_add"
    return "fp32_copies"  # a torch too old for out_dtype: fp32 copies of the operands


ADDMM_PATH = addmm_path()
# ``torch.mm(a, b, out_dtype=torch.float32, out=...)``: an fp32 product into a given buffer
MM_INTO_FP32 = "dtype_out" in torch.ops.aten.mm.overloads()


def on_cuda(t: Tensor) -> bool:
    """Whether products into ``t`` take the CUDA paths below (a test routes CPU tensors through
    them, with the CUDA-only ``out_dtype`` products emulated)."""
    return t.device.type == "cuda"


def addmm_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with fp32 accumulation and output, for 16-bit a and b, without an fp32 copy
    of either operand (on CUDA, where the torch build has ``out_dtype``)."""
    if a.dtype == torch.float32 or not on_cuda(acc):
        acc.addmm_(a.float(), b.float())  # fp32, or the CPU (tests): exact either way
        return
    addmm_fp32_cuda(acc, a, b)


def addmm_fp32_cuda(acc: Tensor, a: Tensor, b: Tensor, path: str | None = None) -> None:
    path = path or ADDMM_PATH
    if path == "addmm_out_dtype":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif path == "mm_then_add":
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.addmm_(a.float(), b.float())


def mm_into_fp32(out: Tensor, a: Tensor, b: Tensor) -> bool:
    """out = a @ b in fp32 from 16-bit a and b, where one product can write it (CUDA, a torch with
    ``mm(..., out_dtype=)``); False where it cannot (the caller rounds a product in the inputs'
    dtype instead)."""
    if not on_cuda(out) or not MM_INTO_FP32:
        return False
    torch.mm(a, b, out_dtype=torch.float32, out=out)
    return True
