"""Memory of the GFT loss on the CPU: what a CPU user pays, and what the GPU launcher plans.

    python -m benchmarks.cpu_memory [--provider torch|reference] [--n 4096 --v 32000 --h 256]
    python -m benchmarks.cpu_memory --op logprobs   # gft_kernels.logprobs (log-probs and entropies)
    python -m benchmarks.cpu_memory --launcher      # the Triton launcher's plan at the GPU shapes
    python -m benchmarks.cpu_memory --vocab-parallel   # per rank, the lm_head split over 2 and 4 ranks
    python -m benchmarks.cpu_memory --torch-device     # the chunked engine's device path, planned

Peak RSS (``ru_maxrss``) is what a CPU user pays, allocator slack included. The "extra" memory
is the peak minus the resident size after the inputs exist, minus the gradients themselves;
it is reported in units of one ``N x V`` fp32 logits buffer. Each measurement runs in its own
subprocess, since the peak of a process never goes down.

``launcher_peak`` answers, without a GPU, whether the fused engine meets the memory target
(peak within 1.05x of the gradients): it runs the Triton launcher on CPU tensors at the real
shapes with the two kernels replaced by no-ops (they allocate nothing; every buffer around
them is the launcher's) and the CUDA tiles, and follows every tensor storage the op creates
from birth to death. That is the op's ``max_memory_allocated`` on a GPU, up to the caching
allocator's 512-byte rounding. ``tests/kernels/test_gpu.py`` measures the real one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gft_kernels


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _scalar(op: str, provider: str, hidden, weight, targets, adv):
    """The op's scalar to differentiate: the GFT loss, or the per-token log-probs and entropies
    under upstream gradients (an RL trainer's old-policy / reference log-probs with their backward)."""
    if op == "gft_loss":
        return gft_kernels.gft_loss(hidden, weight, targets, adv, tau=0.7, backend=provider)
    out = gft_kernels.logprobs(hidden, weight, targets, return_entropy=True, backend=provider)
    return (adv * out.logp).sum() + 0.01 * out.entropy.sum()


def _measure_here(provider: str, n: int, v: int, h: int, calls: int = 1, op: str = "gft_loss") -> dict:
    torch.manual_seed(0)
    hidden = torch.randn(n, h).requires_grad_()
    weight = (torch.randn(v, h) * h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,))
    targets[::7] = -100
    adv = torch.randn(n)
    base = _rss_bytes()
    start = time.perf_counter()
    for _ in range(calls):  # more than one: the resident size must not creep from call to call
        hidden.grad = weight.grad = None
        _scalar(op, provider, hidden, weight, targets, adv).backward()
    seconds = (time.perf_counter() - start) / calls
    grad_bytes = 4 * (n * h + v * h)
    extra = _rss_bytes() - base - grad_bytes
    logits_bytes = 4 * n * v
    return dict(
        provider=provider,
        op=op,
        n=n,
        v=v,
        h=h,
        threads=torch.get_num_threads(),
        calls=calls,
        seconds=round(seconds, 3),
        extra_mib=round(extra / 2**20, 1),
        logits_buffer_mib=round(logits_bytes / 2**20, 1),
        extra_over_logits=round(extra / logits_bytes, 3),
    )


class _StorageTracker(TorchDispatchMode):
    """Live bytes of the storages created inside the mode (views and inputs not counted)."""

    def __init__(self, *existing):
        super().__init__()
        self.sizes = {t.untyped_storage().data_ptr(): 0 for t in existing}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name.startswith("gft_kernels::"):
            # the op's own custom ops: the mode is off inside its handler, so without this the
            # launchers' scratch inside them would go unseen (only their outputs counted)
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.sizes and storage.nbytes():
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key):
        self.live -= self.sizes.pop(key)


H100_SMS = 132


class _NoKernel:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _no_product(*args):
    pass


class _FakeGroup:
    """Stands for a process group of ``ranks`` in the probe: this process is rank 0, holding the
    first (largest, as ``torch.tensor_split`` gives) of the vocabulary shards."""

    def __init__(self, v: int, ranks: int):
        self.ranks = ranks
        self.sizes = [len(x) for x in torch.tensor_split(torch.arange(v), ranks)]


def _fake_collectives(group: _FakeGroup) -> dict:
    """torch.distributed functions the vocabulary-parallel op calls, as single-process stand-ins:
    the all-reduces run in place and allocate nothing here (on a GPU, NCCL's own buffers are
    outside PyTorch's allocator); the shard-layout all-gather reports every rank's shard."""
    import torch.distributed as dist

    starts = [sum(group.sizes[:r]) for r in range(group.ranks)]

    def all_gather(out, tensor, group=None):
        for o, s0, n in zip(out, starts, group.sizes):
            o.copy_(torch.tensor([s0 if tensor[0] >= 0 else -1, n]))

    return dict(
        all_reduce=lambda tensor, op=None, group=None: None,
        all_gather=all_gather,
        get_backend=lambda group=None: "fake",
        get_world_size=lambda group=None: group.ranks,
        get_rank=lambda group=None: 0,
    ), dist


def launcher_peak(
    n: int,
    v: int,
    h: int,
    dtype=torch.bfloat16,
    zero_adv_frac: float = 0.0,
    design: str | None = None,
    shards: int = 1,
    gathered: bool = False,
    memory: str = "fast",
) -> dict:
    """Peak bytes the Triton engine allocates for forward + backward at this shape (see above),
    with the launcher's default backward design or ``design``, planned for ``memory``
    (``LaunchOptions.memory``: "fast", the default, or "min").

    ``shards > 1``: one rank of an lm_head split by vocabulary over ``shards`` ranks (the largest
    shard, ``ceil(v / shards)`` rows), with ``vocab_parallel_group`` (the collectives are
    single-process stand-ins, ``_fake_collectives``) or, with ``gathered``, the baseline that
    all-gathers the full weight, runs the unsharded op on it and reduce-scatters its full dW into
    the shard's gradient (both buffers counted in the peak). ``resident_mib`` is the inputs the
    rank holds (hidden states and its weight shard); ``rank_total_mib`` adds the op's peak."""
    from gft_kernels.triton_ops import launch, plans, runners

    group = _FakeGroup(v, shards) if shards > 1 else None
    rows = group.sizes[0] if group else v
    hidden = torch.zeros(n, h, dtype=dtype, requires_grad=True)
    weight = torch.zeros(rows, h, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    adv = torch.randn(n)
    adv[: int(zero_adv_frac * n)] = 0.0
    cuda = torch.device("cuda")
    patched = (
        (runners, "gft_forward_kernel"),
        (runners, "gft_backward_kernel"),
        (runners, "gft_dlogits_kernel"),
        (launch, "tiles"),
        (plans, "_sm_count"),
        (runners, "_mm_into"),
        (runners, "_addmm_fp32"),
        (runners, "_logits_into"),
        (launch, "DEFAULT_OPTIONS"),
    )
    saved = {(module, name): getattr(module, name) for module, name in patched}
    runners.gft_forward_kernel = runners.gft_backward_kernel = runners.gft_dlogits_kernel = _NoKernel()
    runners._mm_into = runners._addmm_fp32 = runners._logits_into = _no_product  # the cuBLAS products
    launch.tiles = lambda device, dt, plain=False, options=launch.DEFAULT_OPTIONS: saved[launch, "tiles"](
        cuda, dt, plain, options
    )
    plans._sm_count = lambda device: H100_SMS  # the forward's vocabulary splits as on the GPU
    if design == "cublas":  # the cuBLAS plans, forward and backward (fp32 logits chunks)
        launch.DEFAULT_OPTIONS = launch.LaunchOptions(forward_design="cublas", backward_design="cublas", memory=memory)
    elif design is not None or memory != launch.DEFAULT_OPTIONS.memory:
        design = design or launch.DEFAULT_OPTIONS.backward_design
        launch.DEFAULT_OPTIONS = launch.LaunchOptions(backward_design=design, memory=memory)
    fakes, dist = _fake_collectives(group) if group and not gathered else ({}, None)
    saved_dist = {name: getattr(dist, name) for name in fakes}
    for name, fn in fakes.items():
        setattr(dist, name, fn)
    options = dict(backend="triton", check_values=False, return_stats=True)  # entropy on: the largest partials
    try:
        with _StorageTracker(hidden, weight, targets, adv) as tracker:
            if group and gathered:
                full = torch.empty(v, h, dtype=dtype, requires_grad=True)  # the all-gather's output
                gft_kernels.gft_loss(hidden, full, targets, adv, 0.7, **options)[0].backward()
                weight.grad = torch.empty_like(weight)  # the reduce-scatter's output
                del full
            else:
                extra = dict(vocab_parallel_group=group, vocab_start=0) if group else {}
                gft_kernels.gft_loss(hidden, weight, targets, adv, 0.7, **options, **extra)[0].backward()
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
        for name, value in saved_dist.items():
            setattr(dist, name, value)
    bound = (hidden.numel() + weight.numel()) * hidden.element_size()
    return dict(
        n=n,
        v=v,
        h=h,
        dtype=str(dtype).replace("torch.", ""),
        memory=memory,
        shards=shards,
        mode="gathered" if group and gathered else "vocab-parallel" if group else "unsharded",
        peak_mib=round(tracker.peak / 2**20, 1),
        lower_bound_mib=round(bound / 2**20, 1),
        peak_over_bound=round(tracker.peak / bound, 4),
        resident_mib=round(bound / 2**20, 1),
        rank_total_mib=round((bound + tracker.peak) / 2**20, 1),
    )


class _NoProducts(_StorageTracker):
    """The tracker, with the matrix products that write into a given buffer as no-ops (every
    product of the chunked engine's device path) and the engines' custom ops followed inside."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in ("aten::mm", "aten::addmm") and "out" in kwargs:
            return kwargs["out"]
        return super().__torch_dispatch__(func, types, args, kwargs)


def torch_device_peak(n: int, v: int, h: int, dtype=torch.bfloat16, reduction: str = "mean") -> dict:
    """Peak bytes the chunked engine's device path (the one it takes on a GPU) allocates for
    forward + backward at this shape, as ``launcher_peak`` plans the Triton engine's: on CPU
    tensors, its products as no-ops taking the CUDA route (``out_dtype``), every storage followed.
    ``reduction="mean"``: the one-pass path; ``"none"``: the custom ops' forward and backward."""
    from gft_kernels import products, torch_backend
    from gft_kernels.engine import KernelOptions

    saved = torch_backend.SYNC_FREE, products.on_cuda
    torch_backend.SYNC_FREE, products.on_cuda = True, lambda t: True
    hidden = torch.zeros(n, h, dtype=dtype, requires_grad=True)
    weight = torch.zeros(v, h, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[::10] = -100
    adv = torch.randn(n)
    try:
        with _NoProducts(hidden, weight, targets, adv) as tracker:
            loss = gft_kernels.gft_loss(
                hidden, weight, targets, adv, 0.7, backend="torch", check_values=False, reduction=reduction
            )
            (loss if loss.dim() == 0 else loss.sum()).backward()
    finally:
        torch_backend.SYNC_FREE, products.on_cuda = saved
    bound = (hidden.numel() + weight.numel()) * hidden.element_size()
    plan = torch_backend.plan_device(n, v, h, dtype, KernelOptions())
    return dict(
        n=n,
        v=v,
        h=h,
        dtype=str(dtype).replace("torch.", ""),
        reduction=reduction,
        cols=plan.cols,
        rows=plan.rows,
        peak_mib=round(tracker.peak / 2**20, 1),
        lower_bound_mib=round(bound / 2**20, 1),
        peak_over_bound=round(tracker.peak / bound, 4),
    )


def vocab_parallel_rows(model: str = "llama-3.1-8b", n: int = 8192, ranks=(2, 4)) -> list[dict]:
    """Per-rank peaks at a model's shape: unsharded, and over each rank count vocabulary-parallel
    and the gathered-weight baseline."""
    from .shapes import MODELS

    h, v = MODELS[model]
    rows = [launcher_peak(n, v, h)]
    for k in ranks:
        rows += [launcher_peak(n, v, h, shards=k), launcher_peak(n, v, h, shards=k, gathered=True)]
    return [dict(model=model, **row) for row in rows]


def measure(
    provider: str = "torch",
    n: int = 4096,
    v: int = 32000,
    h: int = 256,
    threads: int | None = None,
    calls: int = 1,
    op: str = "gft_loss",
) -> dict:
    """Run one measurement in a fresh Python process (``threads``: its OMP_NUM_THREADS; None:
    this one's environment); returns its row."""
    env = dict(os.environ, **({} if threads is None else {"OMP_NUM_THREADS": str(threads)}))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.cpu_memory",
            "--inner",
            "--provider",
            provider,
            "--n",
            str(n),
            "--v",
            str(v),
            "--h",
            str(h),
            "--calls",
            str(calls),
            "--op",
            op,
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", default=None, help="torch or reference (default: both)")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--calls", type=int, default=1, help="calls in the measured process (the peak over all)")
    ap.add_argument("--op", choices=["gft_loss", "logprobs"], default=None, help="the op measured (default: both)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--launcher", action="store_true", help="the Triton launcher's planned peak at the GPU shapes")
    ap.add_argument("--design", choices=["split", "atomic", "cublas"], help="with --launcher: this design's plan")
    ap.add_argument(
        "--memory", choices=["fast", "min"], default="fast", help="with --launcher: LaunchOptions.memory of the plan"
    )
    ap.add_argument(
        "--vocab-parallel",
        action="store_true",
        help="per-rank planned peaks at Llama-3.1-8B, N=8192: unsharded, vocab-parallel and gathered-weight "
        "over 2 and 4 ranks",
    )
    ap.add_argument(
        "--torch-device",
        action="store_true",
        help="the chunked engine's planned peak on a GPU (its device path) at the GPU shapes, N = 8192",
    )
    args = ap.parse_args(argv)
    if args.torch_device:
        from .shapes import MODELS

        for model, (h, v) in MODELS.items():
            print(json.dumps(dict(model=model, **torch_device_peak(8192, v, h))))
        return
    if args.launcher or args.vocab_parallel:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors pass the op's check (the kernels are no-ops)
    if args.vocab_parallel:
        for row in vocab_parallel_rows():
            print(json.dumps(row))
        return
    if args.launcher:
        from .shapes import MODELS, TOKENS

        for model, (h, v) in MODELS.items():
            for n in TOKENS:
                row = launcher_peak(n, v, h, design=args.design, memory=args.memory)
                print(json.dumps(dict(model=model, design=args.design, **row)))
        return
    if args.inner:
        print(json.dumps(_measure_here(args.provider, args.n, args.v, args.h, args.calls, args.op)))
        return
    for op in [args.op] if args.op else ["gft_loss", "logprobs"]:
        for provider in [args.provider] if args.provider else ["torch", "reference"]:
            print(json.dumps(measure(provider, args.n, args.v, args.h, calls=args.calls, op=op)))


if __name__ == "__main__":
    main()
