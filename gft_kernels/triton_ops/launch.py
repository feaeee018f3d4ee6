"""The fused Triton engine (the engine contract is in ``gft_kernels/engine.py``): it picks a
design and its tile, sized by ``plans.py``, and runs it with ``runners.py``.

The backward has two designs (``backward.py``). The default, "split", writes the logits'
gradient dz one vocabulary chunk at a time and hands the two products to cuBLAS; its scratch
(dz chunk, fp32 dH accumulator, gathered active rows) is planned against a budget of the
gradients' bytes that ``LaunchOptions.memory`` sets (``plans.plan_split``: 9%, widened where
that saves a product; 4% with ``memory="min"``), and where it does not fit (many tokens, a
small vocabulary) the "atomic" design runs. It makes one host sync, for the count of active
rows. The atomic design, described next, makes none.

Memory: beyond the inputs and the gradients, the forward needs O(splits x N) floats and the
atomic backward a bounded fp32 scratch:

* fp32 inputs: the kernel adds straight into the fp32 gradients; no scratch at all.
* bf16/fp16 inputs: partial products are added in fp32 (adding them in bf16 would round
  thousands of times per element and fail the precision rule), into scratch buffers of at most
  ``LaunchOptions.scratch_fraction`` of the gradients' own size. dW is built vocabulary chunk by chunk
  (``[Vc, H]`` fp32, rounded once into dW), dH token chunk by token chunk (``[Nc, H]`` fp32).
  When the whole dH accumulator fits the budget, one launch per vocabulary chunk does both
  products from the same recomputed tile ("fused": 4 matrix products in all); otherwise dW and
  dH are separate passes that each recompute the logits (5 products).

No host sync in the forward and the atomic backward: which rows are active (valid in the
forward, ``g != 0`` in the backward) is decided on the device; programs read the active count
and return early past it.
"""

from __future__ import annotations

import os

import torch
import triton

from ..engine import BackwardRequest, Capabilities, ForwardRequest, Grads, KernelOptions, RowPartials, register_engine
from .plans import (
    BWD_CANDIDATES,
    CUDA_BWD,
    CUDA_BWD32,
    CUDA_EPILOGUE,
    CUDA_FWD,
    CUDA_FWD32,
    CUDA_FWD_PLAIN,
    DEFAULT_OPTIONS,
    FWD_CANDIDATES,
    INTERP_BWD,
    INTERP_FWD,
    BackwardPlan,
    Config,
    LaunchOptions,
    SplitPlan,
    epilogue_tile,
    logits_dtype,
    plan_backward,
    plan_logits_cols,
    plan_split,
    tiles,
)
from .runners import AtomicBackwardRunner, ForwardRunner, SplitBackwardRunner, active_order

# the plans' names, importable from here as before the split (benchmarks, tests)
__all__ = [
    "BWD_CANDIDATES",
    "CUDA_BWD",
    "CUDA_BWD32",
    "CUDA_EPILOGUE",
    "CUDA_FWD",
    "CUDA_FWD32",
    "CUDA_FWD_PLAIN",
    "DEFAULT_OPTIONS",
    "ENGINE",
    "FWD_CANDIDATES",
    "INTERP_BWD",
    "INTERP_FWD",
    "MIN_VERSION",
    "BackwardPlan",
    "Config",
    "LaunchOptions",
    "SplitPlan",
    "TritonEngine",
    "epilogue_tile",
    "interpreting",
    "logits_dtype",
    "plan_backward",
    "plan_logits_cols",
    "plan_split",
    "tiles",
]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# What the Triton engine is built and checked for: NVIDIA GPUs of compute capability 8.0 or
# later whose blocks can opt into the shared memory of its largest default tile (144 KiB: the
# A100, H100, H200 and later data-centre parts; not the 99-KiB consumer cards), and the Triton
# the package requires (pyproject.toml: triton>=3.2; tests/kernels/test_validation.py keeps them equal).
MIN_CAPABILITY = (8, 0)
MIN_SHARED_BYTES = 144 * 1024
MIN_VERSION = (3, 2)


class TritonEngine:
    """The fused Triton engine (the contract: ``gft_kernels/engine.py``)."""

    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    launch_options = LaunchOptions
    capabilities = Capabilities(auto_rank=20, auto_devices=("cuda",), description="the fused Triton engine")

    def supports(self, hidden, options: KernelOptions) -> str | None:
        if not hidden.is_cuda and not interpreting():
            return (
                f"backend='triton' needs CUDA tensors (got device {hidden.device}); on a CPU it runs only "
                "under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)"
            )
        return None

    def suitable(self, hidden, options: KernelOptions) -> str | None:
        """The hardware ``backend="auto"`` takes this engine on (the Engine protocol's member)."""
        return self.unsuitable_hardware(hidden.device)

    def unsuitable_hardware(self, device) -> str | None:
        """Why ``backend="auto"`` does not take this engine on this CUDA device, or None."""
        if getattr(torch.version, "hip", None):
            return "ROCm GPUs are not a target the Triton engine is checked on"
        version = tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit())
        if version < MIN_VERSION:
            return f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_VERSION))}"
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return (
                f"compute capability {capability[0]}.{capability[1]} is below {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
            )
        shared = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
        if shared is None:  # an unknown amount is not a pass: the kernels would fail at launch
            return "this torch does not report the shared memory a block can use (shared_memory_per_block_optin)"
        if shared < MIN_SHARED_BYTES:
            return f"blocks can use {shared // 1024} KiB of shared memory, the kernels' tiles need {MIN_SHARED_BYTES // 1024}"
        return None

    def partials(self, request: ForwardRequest, options: KernelOptions) -> RowPartials:
        """Per-row partial statistics ``[splits, N]`` of the forward's vocabulary splits, in row
        order, zeros at rows that are not valid. Targets of -1 (``outside``) match no column:
        the kernels compare columns with the target id."""
        launch, (n, h_dim), v = options.launch or DEFAULT_OPTIONS, request.hidden.shape, request.weight.shape[0]
        if launch.forward_design == "cublas":
            cols = plan_logits_cols(n, v, h_dim, request.weight, launch)
            if cols is not None:
                return ForwardRunner(request, options, launch, epilogue_tile(request.hidden.device)).run_cublas(cols)
        plain = not options.with_entropy and request.bias is None and options.softcap is None
        cfg, _ = tiles(request.hidden.device, request.weight.dtype, plain, launch)
        return ForwardRunner(request, options, launch, cfg).run_fused()

    def backward(self, request: BackwardRequest, options: KernelOptions) -> Grads:
        launch = options.launch or DEFAULT_OPTIONS
        hidden, weight = request.inputs.hidden, request.inputs.weight
        n, h_dim = hidden.shape
        g, g_entropy, need = request.g, request.g_entropy, request.need
        order, n_active = active_order(g != 0 if g_entropy is None else (g != 0) | (g_entropy != 0))
        if launch.backward_design != "atomic" and (need.dhidden or need.dweight):
            # One host sync: the products are sized to the active rows, so ignored and
            # zero-advantage tokens cost nothing.
            n_act = int(n_active)
            z_bytes = 0
            if launch.backward_design == "cublas" and logits_dtype(weight, launch) != weight.dtype:
                z_bytes = 4
            split = plan_split(
                n, n_act, weight.shape[0], h_dim, weight.dtype, need.dhidden, need.dweight, launch, z_bytes
            )
            if split is not None:
                cfg, _ = tiles(
                    hidden.device, weight.dtype, request.inputs.bias is None and options.softcap is None, launch
                )  # a forward-like tile: one product, then a store
                if launch.backward_design == "cublas":
                    cfg = epilogue_tile(hidden.device)
                return SplitBackwardRunner(request, options, launch, cfg, order, n_act).run(split)
        _, cfg = tiles(hidden.device, weight.dtype, options=launch)
        return AtomicBackwardRunner(request, options, launch, cfg, order, n_active).run()


ENGINE = register_engine(TritonEngine())
