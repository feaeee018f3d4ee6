"""One architecture against its own logits: used by test_models_exact.py (and to print the table)."""

from __future__ import annotations

import inspect

import torch

import gft_kernels
from gft_kernels.models import UnsupportedModelError

TAU = 0.7


class OwnForwardFails(Exception):
    """The model's own forward does not run on its tiny config (nothing to compare with)."""


def batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 3, (2, 7), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100  # a prompt
    labels[1, 5] = -100
    mask = torch.ones_like(ids)
    adv = torch.tensor([1.25, -0.75], dtype=torch.float64)
    return ids, mask, labels, adv


def gft_from_logits(logits, labels, adv, tau=TAU):
    logits = logits[:, :-1].to(torch.float64)
    targets = labels[:, 1:]
    logp = logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    p = logp.detach().exp()
    valid = targets != -100
    loss_t = torch.where(valid, -adv[:, None] * torch.where(p < tau, p, 1.0) * logp, 0.0)
    return loss_t.sum() / valid.sum()


def check(model, backend):
    """'exact', or the refusal's message. Raises AssertionError when silently different."""
    model.eval()
    vocab = gft_kernels.models.logits_transform(model).vocab or model.config.get_text_config(decoder=True).vocab_size
    ids, mask, labels, adv = batch(vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    kw = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **kw)
    except Exception as e:
        raise OwnForwardFails(
            f"its own forward fails on the tiny config: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:200] if str(e) else ''}"
        ) from e
    try:
        loss = gft_kernels.causal_lm_gft_loss(model, ids, mask, labels, adv, TAU, backend=backend)
    except UnsupportedModelError as e:
        msg = str(e)
        assert type(model).__name__ in msg, msg
        return msg
    logits = model(input_ids=ids, attention_mask=mask, **kw).logits
    ref = gft_from_logits(logits, labels, adv)
    # float64 throughout, except where a model computes in fp32 whatever its dtype (logits cast
    # with .float(), fp32 attention): then fp32's precision, relative to each gradient's size
    tight = logits.dtype == torch.float64
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-9 if tight else 1e-6, atol=1e-12 if tight else 1e-9)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    overall = max((float(r.abs().max()) for r in ref_grads if r is not None and r.numel()), default=1.0)
    for name, p, g, r in zip(names, params, grads, ref_grads):
        g = torch.zeros_like(p) if g is None else g
        r = torch.zeros_like(p) if r is None else r
        scale = max(float(r.abs().max()) if r.numel() else 0.0, 1e-3 * overall, 1e-30)
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6 * scale, msg=lambda m, name=name: f"grad of {name}: {m}")
    return "exact"
