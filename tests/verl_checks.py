"""GFT in verl, against the installed verl package (run in .venv-verl by tests/integrations/test_verl.py).

What runs on a CPU: the policy-loss registry and its plugin loading, verl's loss aggregation
(``agg_loss``) in every mode, verl's actor loss (``workers.utils.losses.ppo_loss``) selecting
the loss by configuration, verl's reference log-prob/entropy functions and its torch
``FusedLinearForPPO``, and verl's fused-kernel model forward (``patch_forward_with_backends``,
``impl_backend="triton"``) with our op in place of verl's Triton kernel.
"""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import verl  # noqa: E402,F401  (loads the gft plugin)
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn  # noqa: E402

from gft_train.integrations import verl as verl_gft  # noqa: E402

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def actor_config(**kw):
    from verl.workers.config import ActorConfig, PolicyLossConfig

    loss_mode = kw.pop("loss_mode", "gft")
    return ActorConfig(
        strategy="fsdp",
        rollout_n=4,
        ppo_micro_batch_size_per_gpu=2,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode),
        **kw,
    )


def batch(B=6, T=9, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 1, 5, 0, 7, 3])[:B]  # one fully masked response
    mask = torch.arange(T)[None] < lengths[:, None]
    logp = -((torch.rand(B, T, generator=g, dtype=dtype) * 3) ** 2)
    logp[0, :3] = torch.tensor([-1e-4, -0.3566749439387324, -0.35667])  # p near 1, p == 0.7 (about), p just above
    adv = torch.randn(B, 1, generator=g, dtype=dtype).expand(B, T).clone()
    isw = torch.rand(B, T, generator=g, dtype=dtype) + 0.5
    return logp, adv, mask, isw


def expected(logp, adv, mask, mode, tau, isw=None, info=None):
    """The GFT loss written out in float64 from the formulas (not through verl's agg_loss)."""
    info = info or {}
    p = logp.detach().exp()
    coef = torch.where(p < tau, p, torch.ones_like(p))
    loss = -adv * coef * logp
    if isw is not None:
        loss = loss * isw
    m = mask.to(loss.dtype)
    dp = info.get("dp_size", 1)
    seq_sum = (loss * m).sum(-1)
    n_seq_local = (m.sum(-1) > 0).sum()
    if mode == "token-mean":
        return (loss * m).sum() / info.get("batch_num_tokens", m.sum()) * dp
    if mode == "token-sum":
        return (loss * m).sum() * dp
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        out = seq_sum.sum() / info.get("global_batch_size", n_seq_local) * dp
        return out / (info.get("loss_scale_factor") or mask.shape[-1]) if mode.endswith("norm") else out
    seq_mean = seq_sum / m.sum(-1).clamp(min=1)
    return seq_mean.sum() / info.get("global_batch_size", n_seq_local) * dp


def test_the_plugin_registers_gft_when_verl_is_imported():
    assert "gft" in POLICY_LOSS_REGISTRY
    assert get_policy_loss_fn("gft") is POLICY_LOSS_REGISTRY["gft"]


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("tau", [0.0, 0.7, 2.0])
@pytest.mark.parametrize("distributed", [False, True])
def test_gft_policy_loss_through_get_policy_loss_fn(mode, tau, distributed):
    logp, adv, mask, isw = batch()
    cfg = actor_config()
    info = {"dp_size": 2, "batch_num_tokens": 61, "global_batch_size": 11} if distributed else {}
    cfg.global_batch_info.update(info)
    name = "gft" if tau == verl_gft.DEFAULT_TAU else f"gft_test_{tau}"
    if name != "gft":
        verl_gft.register_gft_policy_loss(name, tau=tau)
    fn = get_policy_loss_fn(name)
    for weights in (None, isw):
        lp = logp.clone().requires_grad_(True)
        loss, metrics = fn(
            old_log_prob=logp - 0.3,
            log_prob=lp,
            advantages=adv,
            response_mask=mask,
            loss_agg_mode=mode,
            config=cfg,
            rollout_is_weights=weights,
        )
        (grad,) = torch.autograd.grad(loss, lp)
        lp2 = logp.clone().requires_grad_(True)
        want = expected(lp2, adv, mask, mode, tau, weights, info)
        (want_grad,) = torch.autograd.grad(want, lp2)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
        assert grad[~mask].abs().max() == 0
        assert set(metrics) == {"actor/gft_rectified_frac", "actor/gft_mean_prob"}


def test_dcr_at_exactly_tau_is_one_as_the_paper():
    tau = 0.5
    lp = torch.tensor([[torch.log(torch.tensor(0.5, dtype=torch.float64))]], requires_grad=True)
    fn = verl_gft.register_gft_policy_loss("gft_half", tau=tau)
    loss, _ = fn(
        lp.detach(),
        lp,
        torch.ones(1, 1, dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.bool),
        "token-sum",
        actor_config(),
    )
    (g,) = torch.autograd.grad(loss, lp)
    assert g.item() == -1.0  # C = 1 at p == tau (the released code would weight by p = 0.5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_tau0_takes_verls_vanilla_ppo_gradient_at_ratio_one(mode):
    """At tau = 0 GFT is the on-policy policy gradient: the same gradient as verl's clipped PPO
    loss (``vanilla``) when the old log-probs are the current ones (ratio 1), and the same value
    and gradient as verl's ``gpg``."""
    logp, adv, mask, isw = batch()
    cfg = actor_config()
    gft = verl_gft.register_gft_policy_loss("gft_tau0", tau=0.0)
    grads = {}
    for name, fn in (("gft", gft), ("vanilla", get_policy_loss_fn("vanilla")), ("gpg", get_policy_loss_fn("gpg"))):
        lp = logp.clone().requires_grad_(True)
        loss, _ = fn(
            old_log_prob=logp.detach(),
            log_prob=lp,
            advantages=adv,
            response_mask=mask,
            loss_agg_mode=mode,
            config=cfg,
            rollout_is_weights=isw,
        )
        grads[name] = (loss, torch.autograd.grad(loss, lp)[0])
    torch.testing.assert_close(grads["gft"][1], grads["vanilla"][1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads["gft"][1], grads["gpg"][1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads["gft"][0], grads["gpg"][0], rtol=1e-12, atol=1e-14)


def test_the_actor_loss_selects_gft_by_configuration():
    """verl's actor loss (``workers.utils.losses.ppo_loss``) with ``policy_loss.loss_mode=gft``."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    logp, adv, mask, _ = batch(dtype=torch.float32)
    B, R = mask.shape
    P = 3
    prompts = torch.ones(B, P, dtype=torch.long)
    attention = torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], dim=1)
    # the model's output is unpadded: one value per real token, response log-probs shifted left by one
    flat = []
    for b in range(B):
        n = int(mask[b].sum())
        seq = torch.zeros(P + n)
        seq[P - 1 : P - 1 + n] = logp[b, :n]
        flat.append(seq)
    flat = torch.cat(flat).requires_grad_(True)
    data = TensorDict(
        {
            "prompts": prompts,
            "responses": torch.ones(B, R, dtype=torch.long),
            "attention_mask": attention,
            "response_mask": mask.long(),
            "old_log_probs": logp - 0.1,
            "advantages": adv.float(),
        },
        batch_size=[B],
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=B)
    cfg = actor_config(loss_agg_mode="token-mean", entropy_coeff=0.0, use_kl_loss=False)
    loss, metrics = ppo_loss(cfg, {"log_probs": flat}, data)
    lp = logp.clone().requires_grad_(True)
    want = expected(lp, adv.float(), mask, "token-mean", verl_gft.DEFAULT_TAU)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
    loss.backward()
    assert flat.grad.abs().sum() > 0
    assert "actor/gft_rectified_frac" in metrics


# ---- the fused log-prob + entropy op --------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 7), (13,)])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fused_op_equals_verls_reference_and_torch_fused_path(shape, backend):
    from verl.utils.experimental.torch_functional import FusedLinearForPPO
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    g = torch.Generator().manual_seed(1)
    H, V, T = 24, 101, 0.7
    hidden = torch.randn(*shape, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, shape, generator=g)
    up = torch.randn(shape, generator=g)
    up_entropy = torch.randn(shape, generator=g)  # an entropy term in the loss (entropy_coeff != 0)

    def run(fn):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        lp, ent = fn(h, w)
        (lp.mul(up).sum() + ent.mul(up_entropy).sum()).backward()
        return lp.detach(), ent.detach(), h.grad, w.grad

    def verl_reference(h, w):
        logits = (h @ w.T) / T
        return logprobs_from_logits(logits, labels), entropy_from_logits(logits)

    ours = run(lambda h, w: verl_gft.linear_logprob_entropy(h, w, labels, T, "none", backend=backend))
    ref = run(verl_reference)
    torch_fused = run(lambda h, w: FusedLinearForPPO(impl_backend="torch")(h, w, labels, T))
    for other in (ref, torch_fused):
        for a, b in zip(ours, other):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32


def test_vocabulary_split_across_ranks_is_refused():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, 8, generator=g)
    w = torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 11, (5,), generator=g)
    with pytest.raises(NotImplementedError):
        verl_gft.linear_logprob_entropy(h, w, labels, dist_process_group=object())


def test_verls_fused_kernel_forward_runs_our_op():
    """verl's own fused-kernel model forward (``impl_backend="triton"``) with the op installed:
    per-token log-probs and entropies as verl's non-fused path computes them from the logits."""
    import verl.utils.kernel.linear_cross_entropy as lce
    from transformers import AutoModelForCausalLM, Qwen2Config
    from verl.models.transformers.monkey_patch import patch_forward_with_backends
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(cfg).float()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones_like(ids)
    T = 0.7
    logits = model(input_ids=ids, attention_mask=mask).logits
    labels = torch.roll(ids, -1, -1)
    ref_lp, ref_ent = logprobs_from_logits(logits / T, labels), entropy_from_logits(logits / T)
    (ref_grad,) = torch.autograd.grad(ref_lp.sum(), model.lm_head.weight)

    previous = verl_gft.install_fused_kernel()
    try:
        assert lce.linear_cross_entropy is verl_gft.linear_logprob_entropy
        patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="triton")
        out = model(input_ids=ids, attention_mask=mask, temperature=T, return_dict=True)
        torch.testing.assert_close(out.log_probs, ref_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.entropy, ref_ent, rtol=1e-5, atol=1e-5)
        (grad,) = torch.autograd.grad(out.log_probs.sum(), model.lm_head.weight)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)
    finally:
        lce.linear_cross_entropy = previous


@pytest.mark.skipif(not torch.cuda.is_available(), reason="verl's Triton linear_cross_entropy needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_op_equals_verls_triton_kernel_on_cuda(dtype):  # the GPU check
    import verl.utils.kernel.linear_cross_entropy as lce

    verls = lce.__dict__.get("_gft_previous", lce.linear_cross_entropy)
    g = torch.Generator(device="cuda").manual_seed(3)
    N, H, V, T = 1000, 512, 32000, 0.9
    hidden = torch.randn(N, H, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(V, H, device="cuda", generator=g) * 0.05).to(dtype)
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    up = torch.randn(N, device="cuda", generator=g)
    outs = []
    for fn in (verls, verl_gft.linear_logprob_entropy):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lp, ent = fn(h, w, labels, T, "none")
        ((lp * up).sum() + ent.float().sum() * 0.01).backward()
        outs.append((lp.float(), ent.float(), h.grad.float(), w.grad.float()))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_readme_verl_snippet_runs():
    from doc_pages import python_blocks

    found = python_blocks("verl")
    blocks = [block for block, _ in found]
    assert len(blocks) == 1
    exec(compile(blocks[0], str(found[0][1]), "exec"), {})


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "--noconftest", "-p", "no:cacheprovider", *sys.argv[1:]]))
