"""The chunked engine's device path (what runs on a GPU: no host sync, vocabulary chunks over
every row, 16-bit products with fp32 accumulation), run here on CPU tensors.

``torch_backend.SYNC_FREE = True`` routes CPU tensors through it. A dispatch mode records the
ops that make a host sync on CUDA; with ``products.on_cuda`` routed too, the CUDA-only
``out_dtype`` products are emulated in fp32 and every product's operand dtypes are recorded.
The last tests need a GPU: the same path with CUDA's own sync check.
"""

from __future__ import annotations

import pytest
import torch
from helpers import EPS, errors, make_case, run
from torch.utils._python_dispatch import TorchDispatchMode

import gft_kernels
from gft_kernels import products, torch_backend
from gft_kernels.engine import BackwardRequest, ForwardRequest, KernelOptions, Needs, forward

CPU = torch.device("cpu")
FP32_TOL = 1e-5  # tests/kernels/test_backends_match_reference.py's rule

# ops that wait for the device on CUDA: a value read on the host, or an output whose size
# depends on the data
SYNCING = {
    "aten::_local_scalar_dense",  # .item(), int(t), float(t), bool(t)
    "aten::is_nonzero",
    "aten::nonzero",  # also torch.where(cond) and argwhere
    "aten::masked_select",
    "aten::unique",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::bincount",
    "aten::equal",
    "aten::repeat_interleave",
}
PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}


class Recorder(TorchDispatchMode):
    """Records syncing ops (boolean-mask indexing included) and the operand dtypes of every
    matrix product; computes the ``out_dtype`` products, CUDA-only in torch, in fp32 here."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.products: list[tuple[str, torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("gft_kernels::"):
            # the engines' custom ops: their insides recorded too (the mode is off in its own
            # handler; the op is redispatched below the Python key, with the mode on again)
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        if name in SYNCING:
            self.syncs.append(str(func))
        if name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        ):
            self.syncs.append(f"{func} with a boolean mask")
        if name in PRODUCTS:
            a, b = (args[1], args[2]) if name.startswith(("aten::addmm", "aten::baddbmm")) else (args[0], args[1])
            self.products.append((str(func), a.dtype, b.dtype))
            if func._overloadname in ("dtype", "dtype_out"):
                return _fp32_product(name, args, kwargs)
        return func(*args, **kwargs)


def _fp32_product(name, args, kwargs):
    """``mm`` / ``addmm`` with ``out_dtype=torch.float32``, as cuBLAS computes it (16-bit
    operands, fp32 accumulation and output)."""
    if name == "aten::mm":
        result = args[0].float() @ args[1].float()
    else:
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        result = beta * args[0].float() + alpha * (args[1].float() @ args[2].float())
    out = kwargs.get("out")
    return result if out is None else out.copy_(result)


# the device path's chunking at these tiny shapes: the plan's constants scaled down
PLANS = {
    "one-chunk": dict(DEVICE_SCRATCH_FRACTION=100.0),
    "column-chunks": dict(DEVICE_SCRATCH_FRACTION=100.0, DEVICE_MAX_COLS=48),
    "row-blocks": dict(DEVICE_SCRATCH_FRACTION=1e-9),
}


@pytest.fixture
def device_path(monkeypatch):
    """The device path on CPU tensors, with a plan's constants."""

    def take(plan="row-blocks"):
        # raising=False: on a torch_backend without the device path the CPU path runs, and the
        # tests below fail on what it does (its row selection syncs)
        monkeypatch.setattr(torch_backend, "SYNC_FREE", True, raising=False)
        for name, value in dict(DEVICE_MIN_COLS=16, DEVICE_STEP=16, DEVICE_MIN_ROWS=8, **PLANS[plan]).items():
            monkeypatch.setattr(torch_backend, name, value, raising=False)

    return take


def _case(**kw):
    args = dict(lead=(3, 17), vocab=130, hidden_dim=24, bias=True, ignore_frac=0.2, zero_adv_frac=0.3, seed=3)
    return make_case(**{**args, **kw}, device=CPU)


def _loss_and_backward(case, dtype, **options):
    leaves = [x.to(dtype).requires_grad_() for x in (case.hidden, case.weight, case.bias)]
    h, w, b = leaves
    loss = gft_kernels.gft_loss(h, w, case.targets, case.adv.to(dtype), 0.7, bias=b, check_values=False, **options)
    loss = loss[0] if isinstance(loss, tuple) else loss  # (loss, stats) with return_stats
    (loss if loss.dim() == 0 else loss.sum()).backward()
    return loss, leaves


CALLS = {
    "one-pass": dict(),  # a scalar loss under autograd: torch_backend's loss_and_grads
    "forward-then-backward": dict(reduction="none"),  # the custom ops: partials, then backward
    "entropy-softcap-temperature": dict(entropy_coef=0.1, softcap=5.0, temperature=0.8, return_stats=True),
    "entropy-recomputed": dict(entropy_coef=0.1, softcap=5.0, reduction="none"),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("plan", PLANS)
def test_the_device_path_makes_no_host_sync(device_path, plan, call, monkeypatch):
    """No op of the loss, forward and backward, waits for the device (check_values=False: the
    value checks are the op's one documented sync), whatever the chunking; the products keep
    16-bit operands (none is an fp32 copy), their results fp32 where they accumulate."""
    device_path(plan)
    monkeypatch.setattr(products, "on_cuda", lambda t: True)  # the CUDA products, emulated
    planned = []
    monkeypatch.setattr(torch_backend, "plan_device", _spy(torch_backend, "plan_device", planned), raising=False)
    case = _case()
    with Recorder() as seen:
        loss, leaves = _loss_and_backward(case, torch.bfloat16, **CALLS[call])
    assert seen.syncs == [], seen.syncs
    assert planned, "the device path did not run"
    assert seen.products and all(a == b == torch.bfloat16 for _, a, b in seen.products), seen.products
    assert all(torch.isfinite(x.grad).all() for x in leaves)


def _spy(module, name, calls):
    real = getattr(module, name, None)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    return spy


def test_the_engine_alone_makes_no_host_sync_with_another_ranks_targets(device_path):
    """The engine's forward and backward as the vocabulary-parallel op calls them: targets of -1
    lie in another rank's shard."""
    device_path("column-chunks")
    case = _case()
    n = case.targets.numel()
    targets = torch.where(case.targets.reshape(-1) % 3 == 0, -1, case.targets.reshape(-1).clamp_min(0))
    request = ForwardRequest(
        case.hidden.reshape(n, -1).float(), case.weight.float(), None, targets, torch.ones(n, dtype=torch.bool)
    )
    options = KernelOptions(with_entropy=True, entropy_grad=True, outside=True)
    with Recorder() as seen:
        rows = forward(torch_backend.ENGINE, request, options)
        g = torch.randn(n)
        grads = torch_backend.ENGINE.backward(
            BackwardRequest(request, rows, g, g * 0.1, Needs(True, True, False)), options
        )
    assert seen.syncs == [], seen.syncs
    assert torch.isfinite(grads.dhidden).all() and torch.isfinite(grads.dweight).all()


OPTIONS = {
    "plain": dict(),
    "bias-softcap-temperature-entropy": dict(softcap=5.0, temperature=0.8, entropy_coef=0.1),
    "per-token": dict(reduction="none", entropy_coef=0.05),
    "per-sequence": dict(reduction="seq-mean-token-mean", softcap=3.0),
}


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("plan", PLANS)
def test_the_device_path_matches_float64(device_path, plan, dtype, options):
    """Against the float64 reference of the same rounded inputs, with ignored targets and zero
    advantages (rows the device path computes and zeroes): fp32 within the precision rule, bf16
    within naive bf16 PyTorch's error, float64 exact."""
    device_path(plan)
    opts = OPTIONS[options]
    case = _case(logit_scale=4.0)
    truth = run(case.cast(dtype), torch.float64, "reference", **opts)
    errs = errors(run(case, dtype, "torch", **opts), truth)
    if dtype == torch.float64:
        assert max(errs.values()) < 1e-12, errs
    elif dtype == torch.float32:
        assert max(errs.values()) < FP32_TOL, errs
    else:
        naive = errors(run(case, dtype, "reference", **opts), truth)
        assert all(errs[k] <= 1.5 * naive[k] + EPS[dtype] for k in errs), (errs, naive)


def test_the_device_path_gives_the_cpu_paths_float64_results(device_path, monkeypatch):
    """The two paths of the engine, float64, policy terms included: the same numbers up to rounding."""
    case = _case()
    opts = dict(
        old_logp=-torch.rand(case.targets.shape, dtype=torch.float64),
        ref_logp=-torch.rand(case.targets.shape, dtype=torch.float64),
        beta=0.1,
        dual_clip=3.0,
        entropy_coef=0.02,
        temperature=1.3,
    )
    monkeypatch.setattr(torch_backend, "SYNC_FREE", False)
    cpu = run(case, torch.float64, "torch", **opts)
    device_path("row-blocks")
    device = run(case, torch.float64, "torch", **opts)
    torch.testing.assert_close(device.loss, cpu.loss, rtol=1e-12, atol=1e-14)
    for name in cpu.grads:
        torch.testing.assert_close(device.grads[name], cpu.grads[name], rtol=1e-12, atol=1e-14)
    for a, b in zip(device.stats.__dict__.values(), cpu.stats.__dict__.values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("plan", PLANS)
def test_rows_that_are_not_active_are_never_read(device_path, plan):
    """Every row is computed on the device path, but a row with g = 0 (backward) or an ignored
    target (forward) is zeroed first: NaN hidden states there reach no gradient and no stat."""
    device_path(plan)
    case = _case(ignore_frac=0.0)
    n = case.targets.numel()
    hidden = case.hidden.reshape(n, -1).clone()
    targets = case.targets.reshape(-1)
    skipped = torch.zeros(n, dtype=torch.bool)
    skipped[::3] = True
    skipped[10:20] = True
    hidden[skipped] = float("nan")
    request = ForwardRequest(hidden, case.weight, case.bias, targets, ~skipped)
    rows = forward(torch_backend.ENGINE, request, KernelOptions())
    assert torch.isfinite(rows.logp).all() and (rows.logp[skipped] == 0).all()
    g = torch.where(skipped, 0.0, torch.randn(n, dtype=torch.float64))
    dh, dw, db = torch_backend.ENGINE.backward(
        BackwardRequest(request, rows, g, None, Needs(True, True, True)), KernelOptions()
    )
    assert torch.isfinite(dw).all() and torch.isfinite(db).all() and torch.isfinite(dh).all()
    assert (dh[skipped] == 0).all()
    # the one-pass path: ignored targets where the hidden states are NaN
    h = hidden.clone().requires_grad_()
    loss = gft_kernels.gft_loss(h, case.weight, torch.where(skipped, -100, targets), case.adv.reshape(-1), 0.7)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all() and (h.grad[skipped] == 0).all()


# (N, V, H) of the benchmark's three shapes, and a long sequence with a small vocabulary
SHAPES = {
    "gemma-2-2b-8k": (8192, 256000, 2304),
    "llama-3-8b-8k": (8192, 128256, 4096),
    "qwen2.5-7b-8k": (8192, 152064, 3584),
    "128k-tokens-32k-vocab": (131072, 32000, 4096),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "options", [KernelOptions(), KernelOptions(softcap=30.0, with_entropy=True)], ids=["plain", "softcap-entropy"]
)
def test_the_device_plan_keeps_wide_products_within_its_budget(shape, options):
    """From the shapes alone: chunks at least DEVICE_MIN_COLS wide and DEVICE_MIN_ROWS high (the
    products run at the matmul rate), their buffers within the budget of the gradients' bytes."""
    n, v, h = shape = SHAPES[shape]
    plan = torch_backend.plan_device(n, v, h, torch.bfloat16, options)
    budget = torch_backend.DEVICE_SCRATCH_FRACTION * 2 * h * (n + v)
    assert plan.cols >= torch_backend.DEVICE_MIN_COLS and plan.rows >= torch_backend.DEVICE_MIN_ROWS, plan
    assert plan.cols % torch_backend.DEVICE_STEP == 0 and plan.buffer_bytes <= budget, (plan, budget)
    if n <= 8192:
        assert plan.rows == n  # one row block: dlm_head's rows written by one product each
    else:
        assert plan.rows < n and plan.cols == torch_backend.DEVICE_MIN_COLS


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_problem(n=3000, v=50000, h=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (2.0 / h**0.5)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.1] = -100
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    adv[torch.rand(n, generator=g) < 0.3] = 0.0
    return [x.cuda() for x in (hidden, weight, targets, adv)]


@needs_cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_on_cuda_the_engine_makes_no_host_sync(reduction):
    """CUDA's own check: a syncing op raises under sync debug mode "error"."""
    hidden, weight, targets, adv = _cuda_problem()
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    gft_kernels.gft_loss(h, w, targets, adv.bfloat16(), 0.7, backend="torch", check_values=False)  # warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = gft_kernels.gft_loss(
            h, w, targets, adv.bfloat16(), 0.7, backend="torch", check_values=False, reduction=reduction
        )
        (loss if loss.dim() == 0 else loss.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


@needs_cuda
def test_on_cuda_bf16_is_within_naive_error():
    """Against float64 of the same rounded inputs: no worse than naive bf16 PyTorch."""
    hidden, weight, targets, adv = _cuda_problem()
    hidden, weight, adv = (x.bfloat16().double() for x in (hidden, weight, adv))
    results = {}
    for name, dtype, backend in [
        ("truth", torch.float64, "reference"),
        ("naive", torch.bfloat16, "reference"),
        ("torch", torch.bfloat16, "torch"),
    ]:
        h = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        loss = gft_kernels.gft_loss(h, w, targets, adv.to(dtype), 0.7, backend=backend)
        loss.backward()
        results[name] = [x.double() for x in (loss.detach(), h.grad, w.grad)]
    truth = results.pop("truth")
    err = {k: [((a - b).norm() / b.norm()).item() for a, b in zip(r, truth)] for k, r in results.items()}
    assert all(e <= 1.5 * n + EPS[torch.bfloat16] for e, n in zip(err["torch"], err["naive"])), err
