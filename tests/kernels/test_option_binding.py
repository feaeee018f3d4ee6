"""Each option checked where it binds, against tests/truth.py (which shares no code with the
library): the stats at and around p == tau, ``[B]`` advantages for targets of three dims, the
sequence reductions on the chunked path with a sequence whose tokens are all ignored, a pad
id >= 0 as ignore_index, the dual clip at ratios past it, and a softcapped model's sampling
temperature (without TRL installed)."""

import math

import pytest
import torch
from helpers import DEVICE
from truth import truth_loss

import gft_kernels

# (backend, dtype, relative tolerance of the loss and gradients against the float64 truth)
ENGINES = [
    ("reference", torch.float64, 1e-9),
    ("torch", torch.float64, 1e-9),
    ("torch", torch.float32, 3e-5),
    ("triton", torch.float32, 3e-5),
]
IDS = [f"{b}-{str(d)[6:]}" for b, d, _ in ENGINES]


def _leaves(seed, lead, v=40, h=16, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.3 if bias else None
    targets = torch.randint(0, v, lead, generator=g)
    return [x if x is None else x.to(DEVICE) for x in (hidden, weight, b, targets)], g


def _compare(backend, dtype, tol, hidden, weight, bias, targets, adv, tau, **options):
    """Loss and every gradient of the op against the truth, on the same rounded inputs."""
    rounded = [None if x is None else x.to(dtype).double() for x in (hidden, weight, bias)]
    want = [None if x is None else x.clone().requires_grad_() for x in rounded]
    truth = truth_loss(*want[:2], want[2], targets, adv, tau, **options)
    got_leaves = [None if x is None else x.to(dtype).requires_grad_() for x in rounded]
    lib_options = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in options.items()}
    got = gft_kernels.gft_loss(
        got_leaves[0], got_leaves[1], targets, adv.to(dtype), tau, bias=got_leaves[2], backend=backend, **lib_options
    )
    up = torch.randn(truth.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    (truth * up).sum().backward()
    (got.double() * up).sum().backward()
    assert torch.allclose(got.double(), truth.detach(), rtol=tol, atol=tol * truth.abs().max().item() + 1e-12)
    for name, a, b in zip(("hidden", "weight", "bias"), got_leaves, want):
        if a is not None:
            err = ((a.grad.double() - b.grad).norm() / b.grad.norm().clamp_min(1e-12)).item()
            assert err < tol, (name, err)


def _true_p(hidden, weight, bias, targets, ignore_index=-100):
    z = hidden @ weight.t() + (0 if bias is None else bias)
    logp = z.log_softmax(-1).gather(-1, torch.where(targets == ignore_index, 0, targets)[..., None])[..., 0]
    return logp.exp()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_stats_at_and_around_p_equal_tau(backend):
    """rectified_frac counts p < tau (the coefficient is 1 at p == tau): with tau set to a
    token's own probability as the op computed it, and one ulp either side, against counts taken
    here; the other stats against the float64 truth's values."""
    (hidden, weight, bias, targets), _ = _leaves(3, (2, 9))
    targets[0, :3] = -100
    valid = targets != -100
    dtype = torch.float64  # tau is a Python float: exact against float64 probabilities
    h, w, b = hidden, weight, bias
    _, stats = gft_kernels.gft_loss(h, w, targets, 1.0, 0.5, bias=b, backend=backend, return_stats=True)
    p = stats.logp.double().exp()
    at = p[valid].sort().values[5].item()  # a valid token's own p, inside the range
    for tau in (math.nextafter(at, 0.0), at, math.nextafter(at, 1.0)):
        _, s = gft_kernels.gft_loss(h, w, targets, 1.0, tau, bias=b, backend=backend, return_stats=True)
        ps = s.logp.double().exp()[valid]
        assert torch.equal(ps, p[valid])
        assert s.rectified_frac.item() == pytest.approx((ps < tau).double().mean().item(), abs=1e-7)
        assert s.rectified_frac.item() == pytest.approx(
            5 / valid.sum().item() + (tau > at) / valid.sum().item(), abs=1e-7
        )
    tp = _true_p(hidden, weight, bias, targets)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert stats.mean_prob.item() == pytest.approx(tp[valid].mean().item(), rel=tol)
    assert stats.n_valid.item() == valid.sum().item()
    z = hidden @ weight.t() + bias
    assert stats.accuracy.item() == pytest.approx((z.argmax(-1) == targets)[valid].double().mean().item(), abs=1e-7)
    lp = z.log_softmax(-1)
    entropy = -(lp.exp() * lp).sum(-1)
    torch.testing.assert_close(stats.entropy.double(), torch.where(valid, entropy, 0.0), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,dtype,tol", ENGINES, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "seq-mean-token-mean", "seq-mean-token-sum", "none"])
def test_sequence_advantages_for_targets_of_three_dims(backend, dtype, tol, reduction):
    """``[B]`` advantages with targets ``[B, T, K]``: one advantage per leading index."""
    (hidden, weight, bias, targets), g = _leaves(5, (3, 4, 2))
    targets[1, 0] = -100
    adv = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE)
    _compare(backend, dtype, tol, hidden, weight, bias, targets, adv, 0.6, reduction=reduction)


@pytest.mark.parametrize("backend,dtype,tol", ENGINES, ids=IDS)
@pytest.mark.parametrize("reduction", ["seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("normalizer", [None, 4.0])
def test_sequence_reductions_with_a_sequence_all_ignored(backend, dtype, tol, reduction, normalizer):
    """The torch engine's one-pass path (a scalar loss under grad) weights tokens by sequence:
    a sequence without a valid token counts for nothing (not 0 / 0)."""
    (hidden, weight, bias, targets), g = _leaves(7, (4, 6))
    targets[2] = -100
    targets[0, :2] = -100
    adv = torch.randn(4, generator=g, dtype=torch.float64).to(DEVICE)
    _compare(backend, dtype, tol, hidden, weight, bias, targets, adv, 0.7, reduction=reduction, normalizer=normalizer)


@pytest.mark.parametrize("backend,dtype,tol", ENGINES, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "seq-mean-token-mean", "sum"])
def test_an_ignore_index_that_is_a_vocabulary_id(backend, dtype, tol, reduction):
    """A pad id >= 0 as ignore_index: those tokens are ignored, -100 is then an error, and the
    stats count the same tokens as the truth."""
    pad = 3
    (hidden, weight, bias, targets), g = _leaves(9, (3, 8))
    targets[targets == pad] = 0
    targets[0, 5:] = pad
    targets[2, :4] = pad
    adv = torch.randn(3, 8, generator=g, dtype=torch.float64).to(DEVICE)
    _compare(backend, dtype, tol, hidden, weight, bias, targets, adv, 0.7, reduction=reduction, ignore_index=pad)
    _, stats = gft_kernels.gft_loss(
        hidden.to(dtype),
        weight.to(dtype),
        targets,
        adv.to(dtype),
        0.7,
        bias=bias.to(dtype),
        backend=backend,
        ignore_index=pad,
        return_stats=True,
    )
    assert stats.n_valid.item() == (targets != pad).sum().item()
    assert bool((stats.logp[targets == pad] == 0).all())
    with pytest.raises(ValueError, match=f"ignore_index={pad}"):
        gft_kernels.gft_loss(hidden, weight, torch.full_like(targets, -100), adv, ignore_index=pad)


@pytest.mark.parametrize("backend,dtype,tol", ENGINES, ids=IDS)
@pytest.mark.parametrize("dual_clip", [1.5, 3.0])
def test_the_dual_clip_where_it_binds(backend, dtype, tol, dual_clip):
    """Ratios from 0.3 to 6 with negative advantages: past the dual clip c the loss is -c A and
    the token gives no gradient; clip_frac counts those tokens too."""
    (hidden, weight, bias, targets), g = _leaves(11, (2, 12))
    z = hidden @ weight.t() + bias
    logp = z.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    ratios = torch.tensor([0.3, 0.7, 1.0, 1.3, 1.7, 2.5, 3.5, 6.0] * 3, dtype=torch.float64)[:24].reshape(2, 12)
    old = logp - ratios.to(DEVICE).log()
    keep = old <= 0  # old log-probs must be log-probs
    targets = torch.where(keep, targets, -100)
    old = torch.where(keep, old, 0.0)
    adv = -torch.rand(2, 12, generator=g, dtype=torch.float64).to(DEVICE) - 0.1
    adv[1, ::3] *= -1  # a few positive ones: the dual clip leaves them alone
    binding = keep & (adv < 0) & (ratios.to(DEVICE) > dual_clip)
    assert binding.sum() >= 3
    _compare(backend, dtype, tol, hidden, weight, bias, targets, adv, 0.7, old_logp=old, dual_clip=dual_clip)
    _, stats = gft_kernels.gft_loss(
        hidden,
        weight,
        targets,
        adv,
        0.7,
        bias=bias,
        old_logp=old,
        dual_clip=dual_clip,
        backend="reference",
        return_stats=True,
    )
    valid = targets != -100
    r = ratios.to(DEVICE)
    clipped = ((r > 1.2) & (adv > 0)) | ((r < 0.8) & (adv < 0)) | ((adv < 0) & (r > dual_clip))
    assert stats.clip_frac.item() == pytest.approx(clipped[valid].double().mean().item(), abs=1e-12)


def test_sampling_temperature_is_exact_with_a_final_softcap():
    """TRL (and verl) score samples with ``model_logits / T``; for a softcapped model that is
    ``cap_c(z) / T = cap_{c/T}(z / T)``, which ``causal_lm_gft_loss(temperature=T)`` passes on.
    (Moved here from tests/integrations/test_trl.py, which is skipped whole where TRL is not installed.)"""
    transformers = pytest.importorskip("transformers")
    from gft_kernels import causal_lm_gft_loss

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.Gemma2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            final_logit_softcapping=3.0,
        )
    ).double()
    ids = torch.randint(0, 64, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    T, tau = 0.6, 0.2
    logits = model(input_ids=ids).logits[:, :-1] / T
    logp = logits.log_softmax(-1).gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
    p = logp.detach().exp()
    valid = labels[:, 1:] != -100
    want = torch.where(valid, -adv[:, None] * torch.where(p < tau, p, 1.0) * logp, 0.0).sum() / valid.sum()
    for backend in ("torch", "reference"):
        got = causal_lm_gft_loss(model, ids, None, labels, adv, tau, temperature=T, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,dtype,tol", ENGINES, ids=IDS)
def test_every_stat_on_every_engine(backend, dtype, tol):
    """The policy stats (ratio, clip fraction, KL) and the others, written out here from the
    truth's own log-probs, on every engine (test_policy_terms checks them on one)."""
    (hidden, weight, bias, targets), g = _leaves(13, (3, 8))
    targets[0, :3] = -100
    valid = targets != -100
    z = hidden @ weight.t() + bias
    logp = z.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    ratio = torch.tensor([0.5, 0.9, 1.1, 1.5] * 6, dtype=torch.float64).reshape(3, 8).to(DEVICE)
    old = torch.where(valid, (logp - ratio.log()).clamp_max(0.0), 0.0)
    ref = torch.where(valid, (logp - 0.3).clamp_max(0.0), 0.0)
    adv = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE)
    h, w, b = (x.to(dtype) for x in (hidden, weight, bias))
    _, stats = gft_kernels.gft_loss(
        h,
        w,
        targets,
        adv.to(dtype),
        0.4,
        bias=b,
        old_logp=old.to(dtype),
        ref_logp=ref.to(dtype),
        beta=0.1,
        kl="k2",
        backend=backend,
        return_stats=True,
    )
    r = (logp - old).exp()
    a = adv[:, None].expand(3, 8)
    p = logp.exp()
    want = dict(
        ratio_mean=r[valid].mean(),
        kl_mean=(0.5 * (ref - logp) ** 2)[valid].mean(),
        clip_frac=(((r > 1.2) & (a > 0)) | ((r < 0.8) & (a < 0)))[valid].double().mean(),
        rectified_frac=(p < 0.4)[valid].double().mean(),
        mean_prob=p[valid].mean(),
        accuracy=(z.argmax(-1) == targets)[valid].double().mean(),
    )
    for name, value in want.items():
        assert getattr(stats, name).item() == pytest.approx(value.item(), rel=max(tol, 1e-6), abs=1e-7), name
    assert stats.n_valid.item() == valid.sum().item()


@pytest.mark.parametrize("reduction", ["mean", "sum", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_the_chunked_engines_two_paths_agree_on_every_option(reduction):
    """The chunked engine has two paths: one pass (a scalar loss under grad: gradients formed in
    the forward) and the custom ops (no grad, ``reduction="none"``, torch.compile). Every option
    gives the same loss on both."""
    (hidden, weight, bias, targets), g = _leaves(17, (3, 9))
    targets[1] = -100
    logp = (hidden @ weight.t() + bias).log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    options = dict(
        reduction=reduction,
        normalizer=6.0 if reduction != "sum" else None,
        temperature=0.9,
        softcap=7.0,
        old_logp=(logp - 0.2).clamp_max(0.0),
        dual_clip=2.0,
        clip_high=0.3,
        ref_logp=(logp - 0.1).clamp_max(0.0),
        beta=0.05,
        entropy_coef=0.02,
        ignore_index=-100,
    )
    adv = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE)
    h = hidden.clone().requires_grad_()
    one_pass = gft_kernels.gft_loss(h, weight, targets, adv, 0.5, bias=bias, backend="torch", **options)
    with torch.no_grad():
        ops = gft_kernels.gft_loss(hidden, weight, targets, adv, 0.5, bias=bias, backend="torch", **options)
    truth = truth_loss(hidden, weight, bias, targets, adv, 0.5, **options)
    torch.testing.assert_close(one_pass.detach(), ops, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ops, truth, rtol=1e-10, atol=1e-12)
