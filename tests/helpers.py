"""Input builders and error measures shared by the tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import gft_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23, torch.float64: 2.0**-52}


@dataclass
class Case:
    """One problem in float64 (the ground truth is computed from these same values)."""

    hidden: torch.Tensor  # [*lead, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None
    targets: torch.Tensor  # [*lead]
    adv: torch.Tensor  # broadcastable to targets

    def cast(self, dtype):
        """The case rounded to ``dtype``, and the rounded values back in float64 (the truth's inputs)."""

        def rnd(x):
            return None if x is None else x.to(dtype).to(torch.float64)

        return Case(rnd(self.hidden), rnd(self.weight), rnd(self.bias), self.targets, self.adv)


def make_case(
    lead,
    vocab,
    hidden_dim,
    *,
    bias=False,
    ignore_frac=0.1,
    zero_adv_frac=0.0,
    logit_scale=1.0,
    adv_shape="token",
    seed=0,
    device=DEVICE,
) -> Case:
    g = torch.Generator().manual_seed(seed)
    lead = tuple(lead)
    h = torch.randn(*lead, hidden_dim, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden_dim, generator=g, dtype=torch.float64) * (logit_scale / hidden_dim**0.5)
    b = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, vocab, lead, generator=g)
    t[torch.rand(lead, generator=g) < ignore_frac] = -100
    if adv_shape == "scalar":
        a = torch.tensor(1.3, dtype=torch.float64)
    elif adv_shape == "sequence":
        a = torch.randn(lead[0], generator=g, dtype=torch.float64)
    else:
        a = torch.randn(lead, generator=g, dtype=torch.float64)
    if zero_adv_frac and a.dim():
        a[torch.rand(a.shape, generator=g) < zero_adv_frac] = 0.0
    to = dict(device=device)
    return Case(h.to(**to), w.to(**to), None if b is None else b.to(**to), t.to(**to), a.to(**to))


@dataclass
class Result:
    loss: torch.Tensor
    grads: dict  # name -> float64 gradient
    stats: gft_kernels.GFTStats
    scales: dict | None = None  # truth only: the magnitudes rounding errors are relative to


def _upstream(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def run(
    case: Case, dtype, backend, *, tau=0.7, reduction="mean", grads=("hidden", "weight", "bias"), **kwargs
) -> Result:
    """Loss, gradients (float64 copies) and stats of one backend on ``case`` cast to ``dtype``.

    ``reduction="none"`` is backpropagated with a fixed random upstream gradient.
    """
    leaves = {}
    for name in ("hidden", "weight", "bias"):
        x = getattr(case, name)
        leaves[name] = None if x is None else x.detach().to(dtype).clone().requires_grad_(name in grads)
    loss, stats = gft_kernels.gft_loss(
        leaves["hidden"],
        leaves["weight"],
        case.targets,
        case.adv.to(dtype),
        tau,
        bias=leaves["bias"],
        reduction=reduction,
        backend=backend,
        return_stats=True,
        **kwargs,
    )
    objective = (loss.double() * _upstream(loss.shape).to(loss.device)).sum() if reduction == "none" else loss
    if any(x is not None and x.requires_grad for x in leaves.values()):
        objective.backward()
    out = {n: x.grad.double() for n, x in leaves.items() if x is not None and x.requires_grad}
    scales = _error_scales(case, tau, reduction, kwargs) if dtype == torch.float64 else None
    return Result(loss.detach().double(), out, stats, scales)


def _error_scales(case: Case, tau, reduction, kwargs) -> dict:
    """Condition-aware scales of the float64 truth (the bounds of floating-point dot products,
    |fl(a . b) - a . b| <~ n u |a| . |b|):

    loss: the same reduction of per-token |A| C max(|logp|, 1); dhidden: |dz| @ |W|; dweight: |dz|^T @ |h|;
    dbias: sum of |dz|; where dz = dL/d(h W^T + b). A result that cancels to nearly zero is
    judged against the size of what was summed, not against its own tiny value.
    """
    import torch.nn.functional as F
    from truth import _per_token

    h = case.hidden.reshape(-1, case.hidden.shape[-1])
    t = case.targets.reshape(-1)
    valid = t != -100
    lin = F.linear(h, case.weight, case.bias).detach().requires_grad_()
    z = lin / kwargs.get("temperature", 1.0)
    if kwargs.get("softcap") is not None:
        z = kwargs["softcap"] * torch.tanh(z / kwargs["softcap"])
    logp = z.log_softmax(-1).gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    adv = _per_token(case.adv, case.targets).reshape(-1)  # [B] per sequence (tests/truth.py's own rule)
    # per-token |A| C max(|logp|, 1 nat): as for logp itself, an absolute error e in logp is a
    # relative error e in p, so a confident token's tiny -logp is not the scale of its rounding
    p = logp.detach().exp()
    coef = torch.where(p >= tau, torch.ones_like(p), p)
    terms = torch.where(valid, adv.abs() * coef * logp.detach().abs().clamp_min(1.0), torch.zeros_like(coef))
    loss_t = torch.where(valid, -adv * coef * logp, torch.zeros_like(logp))
    if reduction == "none":
        loss = loss_t
    elif reduction == "sum":
        loss = loss_t.sum()
    else:
        loss = loss_t.sum() / (kwargs.get("normalizer") or valid.sum().clamp_min(1))
    if reduction == "none":
        objective = (loss * _upstream(case.targets.shape).to(loss.device).reshape(-1)).sum()
        loss_scale = terms.norm()
    else:
        count = kwargs.get("normalizer") or valid.sum().clamp_min(1)
        loss_scale = terms.sum() / (count if reduction == "mean" else 1)
        objective = loss
    (dlin,) = torch.autograd.grad(objective, lin)
    dlin = dlin.abs()
    return {
        "loss": float(loss_scale.detach()),
        "dhidden": float((dlin @ case.weight.abs()).norm()),
        "dweight": float((dlin.t() @ h.abs()).norm()),
        "dbias": float(dlin.sum(0).norm()),
    }


def rel_err(x: torch.Tensor, ref: torch.Tensor, scale: float = 0.0) -> float:
    """Norm-wise error relative to max(||ref||, scale); 0 when both are exactly zero."""
    x, ref = x.double().flatten(), ref.double().flatten()
    diff = (x - ref).norm().item()
    denom = max(ref.norm().item(), scale)
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / denom


def errors(res: Result, truth: Result) -> dict:
    """Errors of every output of ``res`` against ``truth``: the loss and the gradients relative
    to the truth's condition-aware scales; per-token log-probs relative to max(|logp|, 1 nat)
    (an absolute error of e in logp is a relative error of e in p)."""
    sc = truth.scales
    out = {"loss": rel_err(res.loss, truth.loss, sc["loss"])}
    lp, lp_ref = res.stats.logp.double().flatten(), truth.stats.logp.double().flatten()
    out["logp"] = ((lp - lp_ref).abs() / lp_ref.abs().clamp_min(1.0)).max().item() if lp.numel() else 0.0
    for name, g in truth.grads.items():
        out[f"d{name}"] = rel_err(res.grads[name], g, sc[f"d{name}"])
    return out


def safe_tau(case: Case, tau: float, margin: float) -> float:
    """``tau`` moved off every token's probability by ``margin`` (relative), so that rounding in a
    lower precision cannot flip a DCR decision between the backend and the float64 truth."""
    if tau == 0.0 or tau > 1.0:
        return tau
    res = run(case, torch.float64, "reference", tau=tau, grads=())
    valid = case.targets.flatten() != -100
    p = res.stats.logp.flatten()[valid].exp()
    for _ in range(1000):
        close = (p - tau).abs() < margin * max(tau, 1e-3)
        if not bool(close.any()):
            return tau
        tau = tau * (1 + 2 * margin) + 1e-6
    raise AssertionError("could not place tau between the probabilities")
