"""Numerical edge cases: huge logits, confident and uniform distributions, nothing valid."""

import math

import pytest
import torch
from helpers import DEVICE, Case, errors, make_case, rel_err, run

import gft_kernels

BACKENDS = ["reference", "torch", "triton"]
FUSED = ["torch", "triton"]


@pytest.mark.parametrize("backend", FUSED)
def test_logits_of_magnitude_1e4(backend):
    """No overflow, and no error beyond the rounding of fp32 logits themselves (ulp(1e4) = 1e-3,
    which every fp32 implementation pays): at most naive fp32 PyTorch's error, or 3e-5. The
    floor is that rounding's scale: on this case naive PyTorch's gradient errors are 2.5e-6 to
    1.02e-5 depending on the summation order alone (CPU vs H100), and so are the fused ones."""
    case = make_case((24,), vocab=70, hidden_dim=16, logit_scale=1e4 / 4, seed=11)
    for tau in (0.0, 0.7, 2.0):
        res = run(case, torch.float32, backend, tau=tau)
        truth = run(case.cast(torch.float32), torch.float64, "reference", tau=tau)
        naive = errors(run(case, torch.float32, "reference", tau=tau), truth)
        assert torch.isfinite(res.loss).all() and torch.isfinite(res.stats.entropy).all()
        assert all(torch.isfinite(g).all() for g in res.grads.values())
        errs = errors(res, truth)
        assert all(errs[k] <= max(3e-5, 1.5 * naive[k]) for k in errs), (tau, errs, naive)


def _confident_case(margin: float) -> Case:
    """Each target logit about ``margin`` above all others: p = 1 - O(V e^-margin), nearly one-hot.
    Hidden states are ``margin`` times the one-hot of the target plus noise, W is near identity."""
    n, v = 20, 50
    g = torch.Generator().manual_seed(12)
    targets = torch.randint(0, v, (n,), generator=g)
    hidden = margin * torch.nn.functional.one_hot(targets, v).double() + 0.3 * torch.randn(
        n, v, generator=g, dtype=torch.float64
    )
    weight = torch.eye(v, dtype=torch.float64) + 0.01 * torch.randn(v, v, generator=g, dtype=torch.float64)
    return Case(
        *(x.to(DEVICE) for x in (hidden, weight)),
        None,
        targets.to(DEVICE),
        torch.ones(n, dtype=torch.float64, device=DEVICE),
    )


@pytest.mark.parametrize("backend", FUSED)
def test_confident_tokens_keep_relative_precision(backend):
    """p within 1e-7 of 1: logp ~ -1e-7 and 1 - p must come from the other logits, not from
    1 - exp(logp), which cancels. The fused backends get both to fp32 relative precision; the
    materialized fp32 reference (naive PyTorch) loses most digits here."""
    case = _confident_case(margin=20.0)
    truth = run(case.cast(torch.float32), torch.float64, "reference", tau=0.0)
    res = run(case, torch.float32, backend, tau=0.0)
    lp, lp_ref = res.stats.logp.double(), truth.stats.logp.double()
    assert (lp_ref < 0).all() and (lp_ref > -1e-5).all()
    assert ((lp - lp_ref).abs() / lp_ref.abs()).max() < 1e-5
    for name in ("hidden", "weight"):
        assert rel_err(res.grads[name], truth.grads[name]) < 1e-5, name
    naive = run(case, torch.float32, "reference", tau=0.0)
    assert rel_err(naive.grads["weight"], truth.grads["weight"]) > 1e-3  # the cancellation we avoid


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_distribution(backend):
    n, v, h = 9, 37, 5
    hidden = torch.randn(n, h, device=DEVICE, requires_grad=True)
    weight = torch.zeros(v, h, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, v, (n,), device=DEVICE)
    loss, stats = gft_kernels.gft_loss(hidden, weight, targets, 1.0, tau=0.0, backend=backend, return_stats=True)
    torch.testing.assert_close(stats.logp, torch.full((n,), -math.log(v), device=DEVICE))
    torch.testing.assert_close(stats.entropy, torch.full((n,), math.log(v), device=DEVICE))
    torch.testing.assert_close(loss, torch.tensor(math.log(v), device=DEVICE))
    loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0  # dz @ W with W = 0
    # dW = -(onehot - 1/V)^T h / n
    expected = (torch.nn.functional.one_hot(targets, v).float() - 1 / v).t() @ hidden.detach() / -n
    torch.testing.assert_close(weight.grad, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_word_vocabulary_has_probability_one(backend):
    hidden = torch.randn(6, 4, device=DEVICE, requires_grad=True)
    weight = torch.randn(1, 4, device=DEVICE, requires_grad=True)
    targets = torch.zeros(6, dtype=torch.long, device=DEVICE)
    loss, stats = gft_kernels.gft_loss(hidden, weight, targets, 1.0, backend=backend, return_stats=True)
    assert stats.logp.abs().max() == 0 and stats.mean_prob == 1 and loss == 0
    loss.backward()
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_all_tokens_ignored_gives_zero_loss_and_gradients(backend, reduction, dtype):
    hidden = torch.randn(2, 5, 8, dtype=dtype, device=DEVICE, requires_grad=True)
    weight = torch.randn(33, 8, dtype=dtype, device=DEVICE, requires_grad=True)
    bias = torch.randn(33, dtype=dtype, device=DEVICE, requires_grad=True)
    targets = torch.full((2, 5), -100, device=DEVICE)
    loss, stats = gft_kernels.gft_loss(
        hidden,
        weight,
        targets,
        torch.randn(2, device=DEVICE),
        bias=bias,
        reduction=reduction,
        backend=backend,
        return_stats=True,
    )
    assert torch.count_nonzero(loss) == 0 and torch.isfinite(loss).all()
    loss.sum().backward()
    for x in (hidden, weight, bias):
        assert x.grad is not None and torch.count_nonzero(x.grad) == 0 and torch.isfinite(x.grad).all()
    assert stats.n_valid == 0 and stats.rectified_frac == 0 and stats.mean_prob == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens_at_all(backend):
    hidden = torch.randn(0, 7, device=DEVICE, requires_grad=True)
    weight = torch.randn(11, 7, device=DEVICE, requires_grad=True)
    loss = gft_kernels.gft_loss(hidden, weight, torch.zeros(0, dtype=torch.long, device=DEVICE), 1.0, backend=backend)
    assert loss == 0
    loss.backward()
    assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("backend", FUSED)
def test_unwritten_buffers_cannot_pass(backend, monkeypatch):
    """Fresh buffers poisoned with NaN: every output the engines rely on must be written."""
    case = make_case((3, 10), vocab=90, hidden_dim=20, bias=True, ignore_frac=0.3, zero_adv_frac=0.4, seed=13)
    truth = run(case.cast(torch.float32), torch.float64, "reference", tau=0.5)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        x = real_empty(*args, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x.fill_(-(2**30))

    def nan_empty_like(*args, **kwargs):
        x = real_empty_like(*args, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x.fill_(-(2**30))

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    res = run(case, torch.float32, backend, tau=0.5)
    errs = errors(res, truth)
    assert max(errs.values()) < 1e-5, errs
    assert torch.isfinite(res.stats.entropy).all()
