"""The benchmark: time, memory and precision of every provider, side by side, in one run.

    python -m benchmarks [--quick] [--out DIR] [--providers a,b] [--models m1,m2] [--tokens 4096,8192]

For each shape and provider: forward alone and forward+backward time (CUDA: triton's do_bench,
median after warm-up; CPU: median of repeated runs), peak memory of the loss op beyond its
inputs (CUDA only), that peak over the lower bound (the gradients themselves, in the inputs'
dtype), and the time as a multiple of the FLOP floor (2 N H V per matrix product: 1 forward,
4 forward+backward) at the square matmul rate measured in the same run, and as a multiple of
four ``[N, H] x [H, V]`` products of that very shape timed in the same run
(``fwd_bwd_over_products``: the exact recomputing op's floor, the GPU target's measure).

The target shapes (GPU: Gemma-2-2B, Llama-3-8B and Qwen2.5-7B at 8192 tokens) come first:
every provider at each; then this project's providers at 90% zero-advantage sequences (on a
CPU also 50%); then every provider's error against the float64 reference of the loss it
computes (on a GPU at 2048 tokens of the same H and V). Rows go to
``DIR/<date>T<time>_<device>.csv``, a plot per shape next to it, and a table on stdout.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import importlib.metadata as md
import platform
import re
import statistics
import time
from pathlib import Path

import torch

import gft_kernels

from .providers import BY_NAME, LOSS_SPECS, PROVIDERS
from .shapes import CPU_FOCUS, CPU_SHAPES, GPU_TARGETS, MODELS, PRECISION_TOKENS, Shape

SEQ_LEN = 512  # tokens per sequence: one response, one advantage
PROMPT_FRAC = 0.1  # leading tokens of each sequence that are ignored (the prompt)
FIELDS = [
    "date",
    "device",
    "torch",
    "triton",
    "gft",
    "liger_kernel",
    "cut_cross_entropy",
    "shape",
    "n",
    "h",
    "v",
    "dtype",
    "provider",
    "loss",
    "zero_adv_frac",
    "status",
    "fwd_ms",
    "fwd_bwd_ms",
    "bwd_ms",
    "peak_mib",
    "lower_bound_mib",
    "peak_over_bound",
    "floor_fwd_bwd_ms",
    "fwd_bwd_over_floor",
    "product_ms",
    "fwd_bwd_over_products",
    "err_loss",
    "err_dhidden",
    "err_dweight",
    "note",
]


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return ""


def environment(device: torch.device) -> dict:
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})"
    )
    return dict(
        date=dt.date.today().isoformat(),
        device=name,
        torch=torch.__version__,
        triton=_version("triton"),
        gft=gft_kernels.__version__,
        liger_kernel=_version("liger-kernel"),
        cut_cross_entropy=_version("cut-cross-entropy"),
    )


def result_stem(env: dict) -> str:
    """File name stem of a run's results: UTC date and time, then the device's name
    ('NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'); two runs on one day do not collide."""
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:40]
    return f"{env['date']}T{dt.datetime.now(dt.timezone.utc):%H%M}_{slug}"


class RowFile:
    """A CSV written row by row, each row on disk as soon as it is measured: a run cut by a
    timeout keeps its rows."""

    def __init__(self, path: Path, fields: list[str]):
        self._file = path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=fields, extrasaction="ignore")
        self._writer.writeheader()

    def write(self, row: dict) -> None:
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def make_inputs(shape: Shape, dtype, device, zero_adv_frac=0.0, seed=0):
    """Hidden states, lm_head, targets (prompt tokens ignored) and per-sequence advantages. The
    large tensors are drawn on the device (on a GPU host's CPU a 256k x 2304 weight took seconds,
    and the benchmark draws inputs dozens of times per shape)."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(shape.n, shape.h, generator=g, device=device).to(dtype)
    weight = (torch.randn(shape.v, shape.h, generator=g, device=device) * (2.0 / shape.h**0.5)).to(dtype)
    return (hidden, weight, *make_targets(shape, device, zero_adv_frac, seed))


def make_targets(shape: Shape, device, zero_adv_frac=0.0, seed=0):
    """The targets (prompt tokens ignored) and per-sequence advantages of ``make_inputs``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    seq = min(SEQ_LEN, shape.n)
    n_seq = -(-shape.n // seq)
    targets = torch.randint(0, shape.v, (shape.n,), generator=g)
    pos = torch.arange(shape.n) % seq
    targets[pos < int(PROMPT_FRAC * seq)] = -100
    adv_seq = torch.randn(n_seq, generator=g)
    adv_seq[torch.randperm(n_seq, generator=g)[: int(round(zero_adv_frac * n_seq))]] = 0.0
    adv = adv_seq.repeat_interleave(seq)[: shape.n]
    return targets.to(device), adv.to(device, torch.float32)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, quick=False) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median")
        )
    fn()  # warm-up
    runs = []
    for _ in range(3 if quick else 5):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs)


def matmul_tflops(device, dtype) -> float:
    """The device's measured dense matmul rate in this dtype (the floor's denominator)."""
    size = 8192 if device.type == "cuda" else 1024
    dtype = dtype if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def product_ms(shape: Shape, dtype, device, quick=False) -> float:
    """One ``[N, H] x [H, V]`` product at this shape (cuBLAS on a GPU): an exact fused op that
    recomputes the logits does four of them, so ``4 x product_ms`` is its floor at this shape."""
    g = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(shape.n, shape.h, generator=g).to(device, dtype)
    w = torch.randn(shape.v, shape.h, generator=g).to(device, dtype)
    return time_ms(lambda: a @ w.t(), device, quick)


def _fmt(x):
    """Four significant digits for floats (errors are 1e-7, times are 1e3)."""
    return "" if x is None else (float(f"{x:.4g}") if isinstance(x, float) else x)


def measure(provider, shape, dtype, device, tflops, zero_adv_frac=0.0, quick=False, products_ms=None) -> dict:
    """One provider's row at one shape; ``products_ms``: one product's time at this shape, measured
    in the same run (``fwd_bwd_over_products`` is the time over four of them)."""
    row = dict(
        shape=shape.name,
        n=shape.n,
        h=shape.h,
        v=shape.v,
        dtype=str(dtype).replace("torch.", ""),
        provider=provider.name,
        loss=provider.loss,
        zero_adv_frac=zero_adv_frac,
        note=provider.note,
    )
    try:
        loss_fn = provider.build()
    except Exception as err:  # not installed, or no such path on this platform
        return dict(row, status=f"unavailable: {type(err).__name__}: {err}"[:200])
    hidden, weight, targets, adv = make_inputs(shape, dtype, device, zero_adv_frac)
    hidden.requires_grad_()
    weight.requires_grad_()

    def fwd():
        return loss_fn(hidden, weight, targets, adv)

    def fwd_bwd():
        hidden.grad = weight.grad = None
        fwd().backward()

    try:
        peak = None
        if device.type == "cuda":
            fwd_bwd()  # compile / autotune outside the measured peak
            hidden.grad = weight.grad = None
            gc.collect()
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fwd_bwd()
            _sync(device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        t_fwd = time_ms(fwd, device, quick)
        t_all = time_ms(fwd_bwd, device, quick)
    except torch.OutOfMemoryError:
        return dict(row, status="OOM")
    finally:
        hidden.grad = weight.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bound = (hidden.numel() + weight.numel()) * hidden.element_size() / 2**20
    floor = 4 * 2 * shape.n * shape.h * shape.v / (tflops * 1e12) * 1e3
    return dict(
        row,
        status="ok",
        fwd_ms=t_fwd,
        fwd_bwd_ms=t_all,
        bwd_ms=t_all - t_fwd,
        peak_mib=peak,
        lower_bound_mib=bound,
        peak_over_bound=None if peak is None else peak / bound,
        floor_fwd_bwd_ms=floor,
        fwd_bwd_over_floor=t_all / floor,
        product_ms=products_ms,
        fwd_bwd_over_products=None if not products_ms else t_all / (4 * products_ms),
    )


def _rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def precision(provider, shape, dtype, device) -> dict:
    """Error of the provider in ``dtype`` against float64 on the same rounded inputs. The truth
    runs on the chunked torch engine in float64 (bounded memory even at 150k+ vocabularies)."""
    try:
        loss_fn = provider.build()
    except Exception:
        return {}
    hidden, weight, targets, adv = make_inputs(shape, dtype, device)
    tau, uses_adv = LOSS_SPECS[provider.loss]
    if provider.loss == "pg":
        seq = min(SEQ_LEN, shape.n)
        adv = adv.reshape(-1, seq).mean(1).repeat_interleave(seq)  # one advantage per sequence
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    truth = gft_kernels.gft_loss(h64, w64, targets, adv.double() if uses_adv else 1.0, tau, backend="torch")
    truth.backward()
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    try:
        loss = loss_fn(h, w, targets, adv)
        loss.backward()
    except torch.OutOfMemoryError:
        return {}
    out = dict(err_dhidden=_rel(h.grad, h64.grad), err_dweight=_rel(w.grad, w64.grad))
    if provider.loss != "pg":  # Liger's GRPO value at ratio 1 is -mean(A), not -mean(A log p)
        out["err_loss"] = _rel(loss.detach(), truth.detach())
    del h64, w64, truth
    gc.collect()
    return out


def plot(rows, path: Path, shape_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["shape"] == shape_name and r["status"] == "ok" and r["zero_adv_frac"] == 0.0]
    if not ok:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = [f"{r['provider']} ({r['loss']})" for r in ok]
    axes[0].barh(names, [r["fwd_bwd_ms"] for r in ok], color="tab:blue", label="forward+backward")
    axes[0].barh(names, [r["fwd_ms"] for r in ok], color="tab:orange", label="forward")
    axes[0].axvline(ok[0]["floor_fwd_bwd_ms"], color="k", ls="--", label="FLOP floor (4 products)")
    axes[0].set_xlabel("ms")
    axes[0].legend(fontsize=7)
    if any(r.get("peak_mib") is not None for r in ok):
        axes[1].barh(names, [r.get("peak_mib") or 0 for r in ok], color="tab:green")
        axes[1].axvline(ok[0]["lower_bound_mib"], color="k", ls="--", label="lower bound (the gradients)")
        axes[1].set_xscale("log")
        axes[1].set_xlabel("peak MiB beyond the inputs")
        axes[1].legend(fontsize=7)
    else:
        axes[1].set_axis_off()
        axes[1].text(0.5, 0.5, "memory: see benchmarks.cpu_memory on CPUs", ha="center")
    for ax in axes:
        ax.tick_params(labelsize=7)
    fig.suptitle(
        f"{shape_name} (N={ok[0]['n']}, H={ok[0]['h']}, V={ok[0]['v']}, {ok[0]['dtype']}), {ok[0]['device']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows) -> None:
    cols = [
        ("shape", 22),
        ("provider", 19),
        ("loss", 4),
        ("zero_adv_frac", 5),
        ("status", 7),
        ("fwd_ms", 9),
        ("fwd_bwd_ms", 10),
        ("peak_over_bound", 7),
        ("fwd_bwd_over_products", 7),
        ("err_dweight", 9),
    ]
    heads = ["shape", "provider", "loss", "0adv", "status", "fwd ms", "fwd+bwd ms", "mem/LB", "t/4prod", "err dW"]
    print(" ".join(h.ljust(w) if i < 5 else h.rjust(w) for i, (h, (_, w)) in enumerate(zip(heads, cols))))
    for r in rows:
        cells = []
        for i, (k, w) in enumerate(cols):
            x = r.get(k)
            if isinstance(x, float):
                x = f"{x:.3g}" if k != "zero_adv_frac" else f"{x:.1f}"
            x = "" if x is None else str(x)[:w]
            cells.append(x.ljust(w) if i < 5 else x.rjust(w))
        print(" ".join(cells))


def _arguments(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, fewer runs (CI)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the CSV and plots")
    ap.add_argument("--providers", default="", help="comma-separated subset of: " + ",".join(BY_NAME))
    ap.add_argument("--models", default="", help="comma-separated subset of: " + ",".join(MODELS))
    ap.add_argument("--tokens", default="", help="comma-separated token counts (default 4096,8192,16384,32768)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument(
        "--budget-s", type=float, default=0.0, help="stop starting measurements after this many seconds (0: none)"
    )
    return ap.parse_args(argv)


def _shapes(args, device) -> tuple[list[Shape], list[Shape]]:
    """(the target shapes: every provider, the zero-advantage sweep, precision; the other shapes:
    every provider)."""
    if device.type == "cuda":
        if not args.tokens and not args.models:
            return list(GPU_TARGETS), []
        tokens = [int(t) for t in args.tokens.split(",") if t] or [8192]
        models = [m for m in args.models.split(",") if m] or list(MODELS)
        return [Shape(m, n, *MODELS[m]) for m in models for n in tokens], []
    if args.quick:
        return [CPU_FOCUS], [Shape("cpu-quick", 512, 64, 4000)]
    return [CPU_FOCUS], list(CPU_SHAPES)


def _head(shape: Shape, provider, status: str) -> dict:
    """The fields of a row that is not a timing: its shape, provider and status."""
    return dict(
        shape=shape.name,
        n=shape.n,
        h=shape.h,
        v=shape.v,
        provider=provider.name,
        loss=provider.loss,
        zero_adv_frac=0.0,
        status=status,
    )


class _Run:
    """One benchmark run: its rows (CSV, written as measured), its time budget, and each shape's
    product time, measured once per shape in this run."""

    def __init__(self, args, device, dtype, providers):
        self.args, self.device, self.dtype, self.providers = args, device, dtype, providers
        self.env = environment(device)
        self.started = time.time()
        self.tflops = matmul_tflops(device, dtype)
        self.rows, self.products = [], {}
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stem = f"{result_stem(self.env)}{'_quick' if args.quick else ''}"
        self.csv_path = self.out / f"{self.stem}.csv"
        self.csv = RowFile(self.csv_path, FIELDS)

    def add(self, row):
        self.rows.append({**self.env, **{k: _fmt(v) for k, v in row.items()}})
        self.csv.write(self.rows[-1])

    def over_budget(self) -> bool:
        return bool(self.args.budget_s) and time.time() - self.started > self.args.budget_s

    def timed(self, shape, provider, frac=0.0):
        if self.over_budget():
            self.add(dict(_head(shape, provider, "skipped: time budget"), zero_adv_frac=frac))
            return
        if shape not in self.products:
            self.products[shape] = product_ms(shape, self.dtype, self.device, self.args.quick)
        quick, prod = self.args.quick, self.products[shape]
        self.add(measure(provider, shape, self.dtype, self.device, self.tflops, frac, quick, products_ms=prod))

    def precise(self, shape, provider):
        if self.device.type == "cuda":  # the same H and V, fewer tokens: the float64 truth is slow
            shape = Shape(shape.model, min(shape.n, PRECISION_TOKENS), shape.h, shape.v)
        if not self.over_budget():
            errs = precision(provider, shape, self.dtype, self.device)
            if errs:
                self.add(dict(_head(shape, provider, "precision"), dtype=str(self.dtype)[6:], **errs))


def main(argv=None) -> Path:
    args = _arguments(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    providers = [BY_NAME[p] for p in args.providers.split(",") if p] or PROVIDERS
    providers = [p for p in providers if device.type in p.devices]
    targets, others = _shapes(args, device)
    run = _Run(args, device, dtype, providers)
    print(f"{run.env['device']}: measured matmul rate {run.tflops:.1f} TFLOP/s ({str(dtype)[6:]})")
    # What the targets read comes first, so a time budget cuts only the tail: every provider at
    # every target shape; then this project's providers at 90% (GPU; CPU also 50%)
    # zero-advantage sequences; then every provider's error against float64.
    sweep = (0.9,) if device.type == "cuda" else (0.5, 0.9)
    for shape in targets:
        for provider in providers:
            run.timed(shape, provider)
    for shape in targets:
        for provider in [p for p in providers if p.name.startswith("gft")]:
            for frac in sweep:
                run.timed(shape, provider, frac)
    for shape in targets:
        for provider in providers:
            run.precise(shape, provider)
    for shape in others:
        for provider in providers:
            run.timed(shape, provider)
    run.csv.close()
    for shape in targets + others:
        plot(run.rows, run.out / f"{run.stem}_{shape.name}.png", shape.name)
    print_table(run.rows)
    print(f"rows: {run.csv_path}  ({time.time() - run.started:.0f} s)")
    return run.csv_path
