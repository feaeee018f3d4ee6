"""The special cases of docs/spec.md, each checked against an implementation that is not ours.

- tau = 0, A = 1, mean: plain SFT, ``F.cross_entropy`` (value and gradients)
- tau > 1, A = 1: DFT, ``-mean(sg(p) log p)``; also Liger Kernel's fused linear cross entropy
  with ``use_token_scaling=True`` (its DFT path, a Triton kernel run by the interpreter here)
- tau = 0, any A: on-policy policy gradient; its gradient equals Liger's
  ``LigerFusedLinearGRPOLoss`` at ratio 1 with beta = 0
- a group of one expert demonstration: SFT up to the constant advantage
- the DCR boundary: C = 1 at exactly p == tau (the paper), p just below
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, make_case, rel_err

import gft_kernels

BACKENDS = ["reference", "torch", "triton"]
TOL = 1e-5


def _leaves(case, dtype=torch.float32):
    h = case.hidden.detach().to(dtype).clone().requires_grad_()
    w = case.weight.detach().to(dtype).clone().requires_grad_()
    return h, w


def _assert_close(a, b, tol=TOL):
    assert rel_err(a, b) < tol, rel_err(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tau_zero_unit_advantage_is_cross_entropy(backend):
    case = make_case((3, 11), vocab=75, hidden_dim=33, ignore_frac=0.2, seed=1)
    h, w = _leaves(case)
    loss = gft_kernels.gft_loss(h, w, case.targets, 1.0, tau=0.0, backend=backend)
    gh, gw = torch.autograd.grad(loss, (h, w))
    h2, w2 = _leaves(case)
    ce = F.cross_entropy((h2 @ w2.t()).reshape(-1, 75), case.targets.reshape(-1), ignore_index=-100)
    eh, ew = torch.autograd.grad(ce, (h2, w2))
    _assert_close(loss, ce)
    _assert_close(gh, eh)
    _assert_close(gw, ew)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [1.0000001, 2.0, float("inf")])
def test_tau_above_one_unit_advantage_is_dft(backend, tau):
    case = make_case((40,), vocab=64, hidden_dim=24, logit_scale=3.0, seed=2)
    h, w = _leaves(case)
    loss = gft_kernels.gft_loss(h, w, case.targets, 1.0, tau=tau, backend=backend)
    gh, gw = torch.autograd.grad(loss, (h, w))
    # DFT (arXiv 2508.05629), written out: -mean over valid tokens of sg(p) * log p
    h2, w2 = _leaves(case)
    valid = case.targets != -100
    logp = (h2 @ w2.t()).log_softmax(-1).gather(1, case.targets.clamp_min(0)[:, None]).squeeze(1)
    dft = -(logp.detach().exp() * logp)[valid].mean()
    eh, ew = torch.autograd.grad(dft, (h2, w2))
    _assert_close(loss, dft)
    _assert_close(gh, eh)
    _assert_close(gw, ew)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dft_matches_liger_token_scaling(backend):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    case = make_case((48,), vocab=96, hidden_dim=32, logit_scale=3.0, seed=3)
    h, w = _leaves(case)
    loss = gft_kernels.gft_loss(h, w, case.targets, 1.0, tau=1.5, backend=backend)
    gh, gw = torch.autograd.grad(loss, (h, w))
    h2, w2 = _leaves(case)
    liger = liger_fused_linear_cross_entropy(h2, w2, case.targets, use_token_scaling=True)
    eh, ew = torch.autograd.grad(liger, (h2, w2))
    _assert_close(loss, liger, 1e-5)
    _assert_close(gh, eh, 1e-4)  # Liger's own fp32 path: chunked logits, fp32 softmax
    _assert_close(gw, ew, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tau_zero_is_policy_gradient_and_matches_liger_grpo(backend):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    B, T, H, V = 4, 9, 32, 80
    case = make_case((B, T), vocab=V, hidden_dim=H, ignore_frac=0.0, adv_shape="sequence", seed=4)
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    mask[1, 6:] = 0
    mask[3, 2:] = 0
    targets = case.targets.masked_fill(mask == 0, -100)

    h, w = _leaves(case)
    loss = gft_kernels.gft_loss(h, w, targets, case.adv.float(), tau=0.0, backend=backend)
    gh, gw = torch.autograd.grad(loss, (h, w))

    # -mean(A * logp), written out
    h2, w2 = _leaves(case)
    logp = (h2 @ w2.t()).log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    valid = targets != -100
    pg = -(case.adv.float()[:, None] * logp)[valid].mean()
    _assert_close(loss, pg)

    # Liger's GRPO at ratio 1 (no old log-probs), beta = 0: value -mean(A), gradient -mean(A dlogp)
    h3, w3 = _leaves(case)
    grpo = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=False, loss_type="dapo")
    out = grpo(h3, w3, targets.clamp_min(0), mask, case.adv.float())
    liger_loss = out[0] if isinstance(out, tuple) else out
    eh, ew = torch.autograd.grad(liger_loss, (h3, w3))
    _assert_close(gh, eh, 1e-5)
    _assert_close(gw, ew, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_expert_group_is_sft_up_to_the_advantage(backend):
    """Paper 8.3: with one demonstration per prompt, GFT is SFT scaled by the advantage."""
    case = make_case((2, 7), vocab=50, hidden_dim=20, seed=5)
    h, w = _leaves(case)
    adv = 0.37
    loss = gft_kernels.gft_loss(h, w, case.targets, adv, tau=0.0, backend=backend)
    gh, gw = torch.autograd.grad(loss, (h, w))
    h2, w2 = _leaves(case)
    ce = F.cross_entropy((h2 @ w2.t()).reshape(-1, 50), case.targets.reshape(-1))
    eh, ew = torch.autograd.grad(adv * ce, (h2, w2))
    _assert_close(loss, adv * ce)
    _assert_close(gh, eh)
    _assert_close(gw, ew)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dcr_boundary_p_equal_tau_weighs_one(backend):
    """Eq. 5: C = 1 at p == tau (the released code gives p there; we follow the paper)."""
    case = make_case((12,), vocab=30, hidden_dim=16, ignore_frac=0.0, logit_scale=3.0, seed=6)
    h, w = _leaves(case)
    _, stats = gft_kernels.gft_loss(h, w, case.targets, 1.0, backend=backend, return_stats=True)
    p = stats.logp.exp()
    k = int(p.argmax())
    tau = float(p[k])  # exactly the p this backend computes for token k
    loss_tok = gft_kernels.gft_loss(h, w, case.targets, 1.0, tau=tau, reduction="none", backend=backend)
    assert loss_tok[k] == -stats.logp[k]  # coefficient 1
    below = p < tau
    torch.testing.assert_close(loss_tok[below], -(p * stats.logp)[below], rtol=0, atol=0)
    # one fp32 ulp above p (tau is compared in the log-probs' dtype): the coefficient becomes p
    nudged = torch.nextafter(p[k].detach(), torch.tensor(2.0, device=p.device))
    loss_up = gft_kernels.gft_loss(h, w, case.targets, 1.0, tau=float(nudged), reduction="none", backend=backend)
    assert loss_up[k] == -(p[k] * stats.logp[k])


def test_dcr_coefficient_values():
    logp = torch.log(torch.tensor([1.0, 0.5, 0.25]))
    c = gft_kernels.dcr_coefficient(logp, tau=0.5)
    assert c.tolist() == [1.0, 1.0, 0.25]
    assert gft_kernels.dcr_coefficient(logp, tau=0.0).tolist() == [1.0, 1.0, 1.0]
    assert torch.allclose(gft_kernels.dcr_coefficient(logp, tau=2.0), logp.exp())
