"""One function per provider: each returns ``loss_fn(hidden, weight, targets, adv) -> scalar``.

Where a provider cannot compute GFT exactly, it runs the nearest loss it has and says which in
``Provider.loss`` (the precision check compares it with the float64 reference of *that* loss):

    gft   the GFT loss, tau = 0.7, per-token advantages
    dft   tau > 1 with A = 1 (Liger's ``use_token_scaling``: the nearest thing it has to DCR)
    ce    plain cross-entropy (tau = 0, A = 1)
    pg    on-policy policy gradient (tau = 0, any A): Liger's chunked GRPO loss at ratio 1
    logp  per-token log-probs, differentiated under upstream gradients -A / n_valid (so its
          value and gradients are those of -mean(A logp), the float64 reference's at tau = 0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import gft_kernels

TAU = 0.7


@dataclass(frozen=True)
class Provider:
    name: str
    loss: str  # gft | dft | ce | pg
    build: Callable[[], Callable]  # -> loss_fn; raises ImportError/RuntimeError when unavailable
    devices: tuple = ("cuda", "cpu")
    note: str = ""


def _gft(backend, **launch):
    """The fused op; ``launch``: LaunchOptions fields of a non-default plan of the Triton engine."""

    def build():
        options = None
        if launch:
            from gft_kernels.triton_ops import LaunchOptions

            options = LaunchOptions(**launch)

        def loss_fn(h, w, t, a):
            return gft_kernels.gft_loss(h, w, t, a, TAU, backend=backend, launch_options=options, check_values=False)

        return loss_fn

    return build


def _naive_gft(h, w, t, a):
    """What a user writes without a fused kernel: materialized logits, fp32 log-softmax."""
    logits = (h @ w.t()).float()
    valid = t != -100
    logp = logits.log_softmax(-1).gather(-1, t.clamp_min(0)[:, None]).squeeze(-1)
    p = logp.detach().exp()
    coef = torch.where(p < TAU, p, torch.ones_like(p))
    return -(torch.where(valid, a * coef * logp, 0.0)).sum() / valid.sum().clamp_min(1)


def _logprobs():
    def loss_fn(h, w, t, a):
        logp = gft_kernels.logprobs(h, w, t, check_values=False).logp
        return -(a * logp).sum() / (t != -100).sum().clamp_min(1)

    return loss_fn


def _naive_logprobs(h, w, t, a):
    """Per-token log-probs as a user writes them: materialized logits, fp32 log-softmax, gather."""
    valid = t != -100
    logp = (h @ w.t()).float().log_softmax(-1).gather(-1, t.clamp_min(0)[:, None]).squeeze(-1)
    return -(torch.where(valid, a * logp, 0.0)).sum() / valid.sum().clamp_min(1)


def _compiled():
    return torch.compile(_naive_gft, dynamic=False)


def _liger_flce(token_scaling):
    def build():
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def loss_fn(h, w, t, a):
            return liger_fused_linear_cross_entropy(h, w, t, use_token_scaling=token_scaling)

        return loss_fn

    return build


def _liger_grpo():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    grpo = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=False, loss_type="dapo")

    def loss_fn(h, w, t, a):
        # one "sequence" of N tokens, the per-token advantage folded into one value per sequence
        mask = (t != -100).long()[None]
        out = grpo(h[None], w, t.clamp_min(0)[None], mask, a.mean().reshape(1))
        return out[0] if isinstance(out, tuple) else out

    return loss_fn


def _cce(filter_eps):
    def build():
        from cut_cross_entropy import linear_cross_entropy

        def loss_fn(h, w, t, a):
            # CCE has no advantage weighting: per-token nll, then GFT outside, as its user must
            nll = linear_cross_entropy(h, w, t, reduction="none", filter_eps=filter_eps, impl="cce")
            logp = -nll.float()
            valid = t != -100
            p = logp.detach().exp()
            coef = torch.where(p < TAU, p, torch.ones_like(p))
            return -(torch.where(valid, a * coef * logp, 0.0)).sum() / valid.sum().clamp_min(1)

        return loss_fn

    return build


PROVIDERS = [
    # the order the benchmark measures them in (a time budget cuts the tail): the targets' rivals first
    Provider("gft", "gft", _gft("auto"), note="the default op: gft_loss(..., backend='auto')"),
    Provider(
        "gft_cublas",
        "gft",
        _gft("triton", forward_design="cublas", backward_design="cublas"),
        devices=("cuda",),
        note="cuBLAS products, the GFT math in Triton epilogues, fp32 logits chunks",
    ),
    Provider(
        "gft_cublas_input_logits",
        "gft",
        _gft("triton", forward_design="cublas", backward_design="cublas", logits_dtype="input"),
        devices=("cuda",),
        note="cuBLAS products, logits chunks in the input dtype (naive's rounding)",
    ),
    Provider("cce", "gft", _cce("high"), devices=("cuda",), note="CCE reduction='none' + GFT outside"),
    Provider("cce_exact", "gft", _cce(None), devices=("cuda",), note="CCE without gradient filtering"),
    Provider("liger_flce", "ce", _liger_flce(False), devices=("cuda",), note="plain cross-entropy"),
    Provider(
        "liger_flce_dft",
        "dft",
        _liger_flce(True),
        devices=("cuda",),
        note="Liger fused linear CE with use_token_scaling (DFT), nearest to DCR",
    ),
    Provider("naive_compiled", "gft", _compiled, devices=("cuda",)),
    Provider(
        "gft_triton_atomic",
        "gft",
        _gft("triton", backward_design="atomic"),
        devices=("cuda",),
        note="atomic backward design (tightest memory)",
    ),
    Provider(
        "gft_memory_min",
        "gft",
        _gft("triton", memory="min"),
        devices=("cuda",),
        note="LaunchOptions(memory='min'): every plan within 4% of the gradients (peak within 1.05x)",
    ),
    Provider("naive_eager", "gft", lambda: _naive_gft),
    Provider("gft_torch", "gft", _gft("torch"), note="chunked PyTorch engine (on CUDA: its path without host syncs)"),
    Provider(
        "liger_grpo_chunked",
        "pg",
        _liger_grpo,
        note="Liger chunked GRPO at ratio 1, beta 0: policy gradient (tau = 0), one advantage",
    ),
    Provider("logprobs", "logp", _logprobs, note="gft_kernels.logprobs(..., backend='auto'), per-token log-probs"),
    Provider("logprobs_naive", "logp", lambda: _naive_logprobs, note="materialized logits, log_softmax, gather"),
]
BY_NAME = {p.name: p for p in PROVIDERS}

# (tau, uses the advantage) of each loss kind, for the float64 reference of that loss
LOSS_SPECS = {
    "gft": (TAU, True),
    "dft": (float("inf"), False),
    "ce": (0.0, False),
    "pg": (0.0, True),
    "logp": (0.0, True),
}
