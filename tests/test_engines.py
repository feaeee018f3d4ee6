"""Mechanics of the bounded-memory engines: backward plans, scratch bounds, skipped rows."""
import pytest
import torch

import gft_kernels
from gft_kernels import torch_backend
from gft_kernels.triton_ops import launch
from helpers import DEVICE, EPS, errors, make_case, run

ENGINES = {"torch": torch_backend, "triton": launch}


# launcher settings of each backward plan
PLANS = {
    "atomic-chunked": dict(BACKWARD_DESIGN="atomic", SCRATCH_FRACTION=1e-9),
    "atomic-default": dict(BACKWARD_DESIGN="atomic"),
    "atomic-fused": dict(BACKWARD_DESIGN="atomic", SCRATCH_FRACTION=100.0),
    "split-one-chunk": dict(BACKWARD_DESIGN="split", SPLIT_COLS=1 << 20),
    "split-partial-chunks": dict(BACKWARD_DESIGN="split", SPLIT_COLS=48),
    # dH in its own sweep over row chunks: a budget too small for the whole dH accumulator
    "split-two-sweeps": dict(BACKWARD_DESIGN="split", SPLIT_SCRATCH_FRACTION=0.3, SPLIT_MIN_COLS=16,
                             SPLIT_MAX_COLS=64, SPLIT_MIN_ROWS=16, SPLIT_STEP=16),
}


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_every_backward_plan_gives_the_same_gradients(plan, dtype, monkeypatch):
    for name, value in PLANS[plan].items():
        monkeypatch.setattr(launch, name, value)
    if plan == "split-two-sweeps":
        n_active = 2 * 33
        split = launch.plan_split(2 * 33, n_active, 130, 37, dtype, True, True)
        assert split is not None and not split.fused and split.rows_per_chunk < n_active, split
    case = make_case((2, 33), vocab=130, hidden_dim=37, bias=True, ignore_frac=0.2, zero_adv_frac=0.3, seed=21)
    truth = run(case.cast(dtype), torch.float64, "reference", tau=0.6)
    errs = errors(run(case, dtype, "triton", tau=0.6), truth)
    naive = errors(run(case, dtype, "reference", tau=0.6), truth)
    if dtype == torch.float32:
        assert max(errs.values()) < 1e-5, errs
    else:
        assert all(errs[k] <= 1.5 * naive[k] + EPS[dtype] for k in errs), (errs, naive)


_CUDA_TILES = sorted({*launch.FWD_CANDIDATES, *launch.BWD_CANDIDATES, launch.CUDA_FWD32, launch.CUDA_BWD32},
                     key=lambda c: (c.block_h > 0, c.block_m, c.block_v, c.block_k, c.block_h, c.num_warps, c.num_stages))


@pytest.mark.parametrize("tile", _CUDA_TILES, ids=lambda c: f"{c.block_m}x{c.block_v}x{c.block_k}h{c.block_h}w{c.num_warps}s{c.num_stages}")
@pytest.mark.parametrize("fraction", [0.005, 100.0], ids=["chunked-split", "fused"])
def test_every_cuda_tile_computes_the_same_loss(tile, fraction, monkeypatch):
    """The GPU's tile sizes (defaults and tuning candidates), not just the interpreter's small
    ones: partial row, column and H blocks at every size, through the interpreter on a CPU."""
    monkeypatch.setattr(launch, "SCRATCH_FRACTION", fraction)
    fwd = tile if tile.block_h == 0 else launch.CUDA_FWD
    bwd = tile if tile.block_h > 0 else launch.CUDA_BWD
    if DEVICE.type == "cuda":
        monkeypatch.setattr(launch, "_cuda_override", (fwd, bwd))
    else:
        monkeypatch.setattr(launch, "tiles", lambda device, dtype, plain=False: (fwd, bwd))
    # 300 rows and 520 columns leave partial blocks of every candidate; H = 96 a partial K/H block
    case = make_case((300,), vocab=520, hidden_dim=96, bias=True, ignore_frac=0.2, zero_adv_frac=0.3, seed=5)
    truth = run(case, torch.float64, "reference")
    errs = errors(run(case, torch.float32, "triton"), truth)
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("group_m", [1, 3, 8, 1 << 20])
def test_backward_program_groups_cover_every_tile_once(group_m, monkeypatch):
    """The backward's grouped program order is a bijection onto (row block, column block),
    partial last group included: a tile computed twice or never shows in the gradients."""
    monkeypatch.setattr(launch, "BWD_GROUP_M", group_m)
    monkeypatch.setattr(launch, "SCRATCH_FRACTION", 100.0)  # one launch over every tile
    fwd, bwd = launch.tiles(DEVICE, torch.float32)
    case = make_case((19 * bwd.block_m - 5,), vocab=7 * bwd.block_v + 3, hidden_dim=40, ignore_frac=0.0, seed=8)
    truth = run(case, torch.float64, "reference")
    errs = errors(run(case, torch.float32, "triton"), truth)
    assert max(errs.values()) < 1e-5, errs


def test_split_design_plans_within_its_budget():
    """At the Gemma-2-2B 8k shape one sweep fits the budget with every row active and with 10%
    of them skipped; at 32k tokens dH takes its own sweep; where nothing fits, None (the atomic
    design runs)."""
    for n_active in (8192, 7373):
        plan = launch.plan_split(8192, n_active, 256000, 2304, torch.bfloat16, True, True)
        assert plan is not None and plan.fused and plan.cols_per_chunk >= launch.SPLIT_MIN_COLS
        grads = 2 * 2304 * (8192 + 256000)
        assert plan.scratch_bytes <= launch.SPLIT_SCRATCH_FRACTION * grads
        assert plan.gather == (n_active < 8192)
    # 32k tokens: the whole fp32 dH accumulator is over the budget; dH gets its own sweep
    plan = launch.plan_split(32768, 32768, 128256, 4096, torch.bfloat16, True, True)
    assert plan is not None and not plan.fused and plan.products == 5
    assert plan.scratch_bytes <= launch.SPLIT_SCRATCH_FRACTION * 2 * 4096 * (32768 + 128256)
    # only dW: no dH accumulator
    assert launch.plan_split(32768, 32768, 128256, 4096, torch.bfloat16, False, True).fused
    # a budget nothing fits: the atomic design runs
    assert launch.plan_split(32768, 32768, 128256, 4096, torch.bfloat16, True, True, fraction=1e-4) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, True), (False, False, True)],
                         ids=["all", "dh", "dw+db", "db"])
@pytest.mark.parametrize("active", ["all", "some", "none"])
@pytest.mark.parametrize("sweeps", [1, 2])
def test_split_design_matches_the_atomic_design(dtype, need, active, sweeps, monkeypatch):
    """Both designs from the same forward statistics, every subset of gradients, with every,
    some and no rows active (the split design gathers rows only when some are skipped), dH in
    the vocabulary sweep or in its own."""
    if sweeps == 1:
        monkeypatch.setattr(launch, "SPLIT_COLS", 64)
    else:
        for name, value in PLANS["split-two-sweeps"].items():
            monkeypatch.setattr(launch, name, value)
    n, v, h = 70, 150, 40
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, h, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(DEVICE, dtype)
    bias = torch.randn(v, generator=gen).to(DEVICE, dtype)
    targets = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    valid = torch.ones(n, dtype=torch.bool, device=DEVICE)
    _, m, log_s, q, *_ = launch.forward(hidden, weight, bias, targets, valid, 0.9, 20.0, False)
    g = torch.randn(n, generator=gen).to(DEVICE)
    if active == "some":
        g[::4] = 0.0
    elif active == "none":
        g.zero_()
    args = (hidden, weight, bias, targets, m, log_s, q, g, 0.9, 20.0, *need)
    split = launch.backward(*args, design="split")
    atomic = launch.backward(*args, design="atomic")
    for a, b in zip(split, atomic):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * max(b.float().abs().max().item(), 1e-6))


def test_plan_is_fused_only_when_the_dhidden_accumulator_fits():
    cfg = launch.CUDA_BWD
    small_n = launch.plan_backward(512, 151936, 1536, torch.bfloat16, True, True, cfg)
    assert small_n.fused
    big_n = launch.plan_backward(32768, 128256, 4096, torch.bfloat16, True, True, cfg)
    assert not big_n.fused
    fp32 = launch.plan_backward(32768, 128256, 4096, torch.float32, True, True, cfg)
    assert fp32.fused and fp32.cols_per_chunk == 128256  # accumulates into the fp32 gradients


@pytest.mark.parametrize("n,v,h", [(4096, 151936, 1536), (8192, 256000, 2304), (32768, 128256, 4096), (4096, 128256, 4096)])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["dh+dw", "dh", "dw"])
def test_scratch_stays_within_budget_at_benchmark_shapes(n, v, h, need):
    """The backward's fp32 scratch is at most SCRATCH_FRACTION of the gradients' own bytes
    (plus one tile row block), so the op's peak stays near the lower bound."""
    need_dh, need_dw = need
    cfg = launch.CUDA_BWD
    plan = launch.plan_backward(n, v, h, torch.bfloat16, need_dh, need_dw, cfg)
    grad_bytes = 2 * h * ((n if need_dh else 0) + (v if need_dw else 0))
    scratch = 0
    if need_dw:
        scratch += 4 * h * plan.cols_per_chunk
    if need_dh:
        scratch = scratch + 4 * h * n if plan.fused else max(scratch, 4 * h * plan.rows_per_chunk)
    assert scratch <= launch.SCRATCH_FRACTION * grad_bytes + 4 * h * max(cfg.block_m, cfg.block_v), (plan, scratch / grad_bytes)


@pytest.mark.parametrize("engine", ENGINES)
def test_rows_with_zero_coefficient_are_skipped(engine):
    """Rows whose g = dL/dlogp is 0 are never read by the backward: NaN hidden states there
    would otherwise poison dW through 0 * NaN."""
    mod = ENGINES[engine]
    n, v, h = 40, 70, 24
    if engine == "torch" and DEVICE.type == "cuda":
        pytest.skip("the torch engine on CUDA computes every row (no host sync to select them)")
    hidden = torch.randn(n, h, device=DEVICE)
    weight = torch.randn(v, h, device=DEVICE) * 0.2
    bias = torch.randn(v, device=DEVICE)
    targets = torch.randint(0, v, (n,), device=DEVICE)
    valid = torch.ones(n, dtype=torch.bool, device=DEVICE)
    _, m, log_s, q, *_ = mod.forward(hidden, weight, bias, targets, valid, 1.0, None, False)
    g = torch.randn(n, device=DEVICE)
    skipped = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    skipped[::3] = True
    skipped[10:20] = True
    g[skipped] = 0.0
    hidden[skipped] = float("nan")
    dh, dw, db = mod.backward(hidden, weight, bias, targets, m, log_s, q, g, 1.0, None, True, True, True)
    assert torch.isfinite(dw).all() and torch.isfinite(db).all()
    assert torch.isfinite(dh[~skipped]).all() and torch.count_nonzero(dh[skipped].nan_to_num(1.0)) == 0


def test_torch_engine_computes_float64_in_float64():
    case = make_case((50,), vocab=300, hidden_dim=40, bias=True, seed=22)
    truth = run(case, torch.float64, "reference", tau=0.7)
    res = run(case, torch.float64, "torch", tau=0.7)
    assert res.stats.logp.dtype == torch.float64
    assert max(errors(res, truth).values()) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inside_torch_compile_the_loss_matches_eager(backend):
    """Users compile the model around the loss: the fused op is a graph break (run eagerly),
    the layers before it compile, and gradients flow through both."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 48).to(DEVICE)
    weight = torch.randn(300, 48, device=DEVICE, requires_grad=True)
    hidden = torch.randn(3, 20, 48, device=DEVICE)
    targets = torch.randint(0, 300, (3, 20), device=DEVICE)
    adv = torch.randn(3, device=DEVICE)

    def step(h):
        return gft_kernels.gft_loss(layer(h), weight, targets, adv, 0.7, backend=backend, check_values=False)

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=False)):
        layer.zero_grad()
        weight.grad = None
        loss = fn(hidden)
        loss.backward()
        results.append((loss.detach(), weight.grad.clone(), layer.weight.grad.clone()))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
