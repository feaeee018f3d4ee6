"""The op under torch.autocast (CPU bf16): forward and backward inside and outside autocast regions
give the gradients nn.Linear + the reference loss give, on both CPU engines."""

import pytest
import torch
import torch.nn.functional as F

import gft_kernels

BACKENDS = ["torch", "reference", "triton"]


def _problem(bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, h, v = 24, 32, 80
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    lin = torch.nn.Linear(h, v, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(v, h, generator=g) / h**0.5)
        if bias:
            lin.bias.copy_(torch.randn(v, generator=g) * 0.3)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -100
    adv = torch.randn(n, generator=g)
    return hidden, lin, targets, adv


def _linear_reference(hidden, lin, targets, adv, tau):
    """nn.Linear (autocast applies to it) and the loss written out in fp32."""
    z = lin(hidden).float()
    logp = z.log_softmax(-1).gather(-1, targets.clamp_min(0)[:, None])[:, 0]
    p = logp.detach().exp()
    valid = targets != -100
    loss_t = torch.where(valid, -adv * torch.where(p < tau, p, 1.0) * logp, 0.0)
    return loss_t.sum() / valid.sum()


def _grads(loss, hidden, lin):
    params = [hidden, *lin.parameters()]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_autocast_matches_linear(backend, bias, backward_in_autocast):
    if backend == "triton" and (bias or backward_in_autocast):
        pytest.skip("the interpreter is slow: one Triton case is enough")
    hidden, lin, targets, adv = _problem(bias)
    tau = 0.7
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _linear_reference(hidden, lin, targets, adv, tau)
        ours = gft_kernels.gft_loss(hidden, lin, targets, adv, tau, backend=backend)
        assert ours.dtype == torch.float32
        if backward_in_autocast:
            ref_g, our_g = _grads(ref, hidden, lin), _grads(ours, hidden, lin)
    if not backward_in_autocast:
        ref_g, our_g = _grads(ref, hidden, lin), _grads(ours, hidden, lin)
    # the same bf16 products: agreement to bf16 rounding of the logits
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-3)
    for o, r in zip(our_g, ref_g):
        assert o.dtype == r.dtype == torch.float32
        torch.testing.assert_close(o, r, rtol=5e-2, atol=5e-3)

    # and exactly what explicit bf16 casts outside autocast give
    h16, w16 = hidden.bfloat16(), lin.weight.bfloat16()
    b16 = None if lin.bias is None else lin.bias.bfloat16()
    manual = gft_kernels.gft_loss(h16, w16, targets, adv, tau, bias=b16, backend=backend)
    man_g = torch.autograd.grad(manual, [hidden, *lin.parameters()])
    torch.testing.assert_close(ours, manual, rtol=0, atol=0)
    for o, m in zip(our_g, man_g):
        torch.testing.assert_close(o, m, rtol=0, atol=0)


def test_autocast_leaves_float64_alone():
    hidden, lin, targets, adv = _problem(False)
    hidden64, w64 = hidden.detach().double().requires_grad_(), lin.weight.detach().double()
    plain = gft_kernels.gft_loss(hidden64, w64, targets, adv.double(), 0.7, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = gft_kernels.gft_loss(hidden64, w64, targets, adv.double(), 0.7, backend="torch")
    assert inside.dtype == torch.float64
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)


def test_autocast_off_region_unchanged():
    """No autocast: the cast path is not taken (fp32 stays fp32)."""
    hidden, lin, targets, adv = _problem(True)
    loss = gft_kernels.gft_loss(hidden, lin, targets, adv, 0.0, backend="torch")
    ref = F.cross_entropy(lin(hidden), targets, reduction="none")
    ref = (adv * ref).sum() / (targets != -100).sum()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
