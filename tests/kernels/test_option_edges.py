"""Options at the edges where they bind, each against a value the library does not compute:
``clip_high`` left at its default (it follows ``clip_low``), ``softcap=0``, the op compiled with
bf16 inputs (the custom ops' fake outputs have the real outputs' dtypes), and the CPU engine's
vocabulary split between threads when the vocabulary is not a multiple of the thread count."""

import pytest
import torch
from helpers import DEVICE, errors, make_case, run
from truth import truth_loss

import gft_kernels
from gft_kernels import torch_backend


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_clip_high_left_at_its_default_follows_clip_low(backend):
    """clip_low=0.1 alone clips the ratio to [0.9, 1.1]: tokens with A > 0 at ratios in
    (1.1, 1.2], which the default clip (0.2) would keep, give no gradient and count in clip_frac."""
    g = torch.Generator().manual_seed(21)
    n, v, h = 16, 24, 8
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(DEVICE)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5).to(DEVICE)
    targets = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    logp = (hidden @ weight.t()).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    ratios = torch.tensor([1.15, 1.18, 0.85, 1.05, 0.95, 1.3, 0.7, 1.12] * 2, dtype=torch.float64).to(DEVICE)
    old = logp - ratios.log()
    adv = torch.tensor([1.0, 0.5, -1.0, 1.0, -0.5, 1.0, -1.0, 2.0] * 2, dtype=torch.float64).to(DEVICE)
    in_band = (ratios > 1.1) & (ratios <= 1.2) & (adv > 0)
    assert in_band.sum() == 6 and bool((old <= 0).all())
    dtype = torch.float32 if backend == "triton" else torch.float64
    leaves = [x.to(dtype).double().requires_grad_() for x in (hidden, weight)]
    truth = truth_loss(*leaves, None, targets, adv, 0.7, old_logp=old, clip_low=0.1, clip_high=0.1)
    truth.backward()
    got_leaves = [x.detach().to(dtype).requires_grad_() for x in leaves]
    loss, stats = gft_kernels.gft_loss(
        *got_leaves,
        targets,
        adv.to(dtype),
        0.7,
        old_logp=old.to(dtype),
        clip_low=0.1,
        backend=backend,
        return_stats=True,
    )
    loss.backward()
    tol = 1e-10 if dtype == torch.float64 else 3e-5
    torch.testing.assert_close(loss.double(), truth.detach(), rtol=tol, atol=tol)
    for got, want in zip(got_leaves, leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=tol, atol=tol * float(want.grad.abs().max()))
    clipped = ((ratios > 1.1) & (adv > 0)) | ((ratios < 0.9) & (adv < 0))
    assert stats.clip_frac.item() == pytest.approx(clipped.double().mean().item(), abs=1e-6)
    # the band binds: with clip_high=0.2 the loss is another one
    wide = gft_kernels.gft_loss(*got_leaves, targets, adv.to(dtype), 0.7, old_logp=old.to(dtype), clip_low=0.1,
                                clip_high=0.2, backend=backend)  # fmt: skip
    assert abs(wide.item() - loss.item()) > 100 * tol * abs(loss.item())


@pytest.mark.parametrize("softcap", [0, 0.0, -0.0])
def test_a_softcap_of_zero_is_refused(softcap):
    hidden, weight = torch.randn(4, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match=r"softcap must be > 0 or None, got -?0(\.0)?$"):
        gft_kernels.gft_loss(hidden, weight, torch.randint(0, 16, (4,)), 1.0, softcap=softcap)


def _bf16_case():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 6, 16, generator=g).to(DEVICE, torch.bfloat16)
    weight = (torch.randn(40, 16, generator=g) / 4).to(DEVICE, torch.bfloat16)
    bias = (torch.randn(40, generator=g) / 4).to(DEVICE, torch.bfloat16)
    targets = torch.randint(0, 40, (2, 6), generator=g).to(DEVICE)
    targets[0, :2] = -100
    return hidden, weight, bias, targets, g


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_the_ops_fake_outputs_have_the_real_dtypes_with_bf16_inputs(backend):
    """What dynamo and inductor plan with (the fake implementations) is what the ops return with
    bf16 inputs: fp32 row statistics, gradients in bf16 (``torch.library.opcheck``)."""
    from gft_kernels.engine import KernelOptions
    from gft_kernels.fused import _spec

    hidden, weight, bias, targets, g = _bf16_case()
    flat, valid = hidden.reshape(-1, 16), (targets != -100).reshape(-1)
    flat_targets = torch.where(valid, targets.reshape(-1), 0)
    spec = _spec(backend, KernelOptions(softcap=5.0, with_entropy=True, entropy_grad=True))
    stats_args = (flat, weight, bias, flat_targets, valid, spec)
    torch.library.opcheck(torch.ops.gft_kernels.row_stats, stats_args)
    _, m, log_s, q, entropy, _ = torch.ops.gft_kernels.row_stats(*stats_args)
    assert {x.dtype for x in (m, log_s, q, entropy)} == {torch.float32}
    dlogp = torch.randn(flat.shape[0], generator=g).to(DEVICE) * valid
    grads_args = (flat, weight, bias, flat_targets, [m, log_s, q, entropy], dlogp, dlogp * 0.5, [True] * 3, spec)
    torch.library.opcheck(torch.ops.gft_kernels.row_grads, grads_args)
    assert [x.dtype for x in torch.ops.gft_kernels.row_grads(*grads_args)] == [torch.bfloat16] * 3


@pytest.mark.slow
def test_the_op_compiled_by_inductor_with_bf16_inputs_equals_eager():
    """Inductor generates code for the dtypes the fake implementations give: compiled with
    fullgraph, the op on bf16 inputs gives eager's loss and gradients."""
    hidden, weight, bias, targets, _ = _bf16_case()
    adv = torch.tensor([0.7, -1.3], device=DEVICE)

    def step(hidden, weight, bias):
        return gft_kernels.gft_loss(
            hidden,
            weight,
            targets,
            adv,
            0.7,
            bias=bias,
            backend="torch",
            check_values=False,
            softcap=5.0,
            entropy_coef=0.1,
        )

    def loss_and_grads(fn):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        loss = fn(*leaves)
        loss.backward()
        return loss.detach(), [x.grad for x in leaves]

    torch._dynamo.reset()
    eager_loss, eager_grads = loss_and_grads(step)
    loss, grads = loss_and_grads(torch.compile(step, backend="inductor", fullgraph=True))
    assert loss.dtype == eager_loss.dtype == torch.float32
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-7)
    for got, want in zip(grads, eager_grads):
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(torch.device(DEVICE).type != "cpu", reason="the CPU engine's split between threads")
@pytest.mark.parametrize("threads", [2, 3])
def test_the_thread_split_of_a_vocabulary_not_a_multiple_of_the_threads(monkeypatch, threads):
    """V = 301 over 2 or 3 threads: shares of unequal widths that cover every column once; the
    loss, gradients and per-token log-probs equal the float64 truth (the reference engine)."""
    monkeypatch.setattr(torch_backend, "MIN_SHARE_COLUMNS", 64)
    shares = []
    shared = torch_backend._shared_loss_and_grads
    monkeypatch.setattr(torch_backend, "_shared_loss_and_grads", lambda *a: shares.append(a[-1]) or shared(*a))
    case = make_case((3, 20), vocab=301, hidden_dim=16, bias=True, ignore_frac=0.2, seed=8)
    truth = run(case, torch.float64, "reference", entropy_coef=0.2, softcap=4.0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run(case, torch.float64, "torch", entropy_coef=0.2, softcap=4.0)
    finally:
        torch.set_num_threads(before)
    (cols,) = shares
    assert len(cols) == threads and len({c.stop - c.start for c in cols}) == 2
    assert [c.start for c in cols[1:]] == [c.stop for c in cols[:-1]] and (cols[0].start, cols[-1].stop) == (0, 301)
    assert max(errors(got, truth).values()) < 1e-12
