"""The model adapter takes a ``GFTLoss`` built once (issue 32, item 4), and a packed layout.

``causal_lm_gft_loss(model, ..., loss=GFTLoss(...), normalizer=...)`` gives what the keyword form
gives with the same options; options given twice (in the loss and as keywords) are refused, as
are a loss that carries what is the model's (its head's bias, its softcap). A packed row with
``cu_seqlens`` gives the padded batch's loss and gradients for the "seq-" reductions.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gft_kernels import GFTLoss, causal_lm_gft_loss


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).to(torch.float64)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    return ids, mask, labels, adv


@pytest.mark.parametrize("reduction", ["mean", "seq-mean-token-sum"])
def test_the_adapter_with_a_loss_equals_the_keyword_form(reduction):
    model = _model()
    ids, mask, labels, adv = _batch()
    options = dict(reduction=reduction, return_stats=True, backend="torch", temperature=0.8)
    loss_fn = GFTLoss(0.5, entropy_coef=0.1, **options)
    for normalizer in (None, 7.0):
        got, got_stats = causal_lm_gft_loss(model, ids, mask, labels, adv, loss=loss_fn, normalizer=normalizer)
        g_got = torch.autograd.grad(got, list(model.parameters()))
        want, want_stats = causal_lm_gft_loss(
            model, ids, mask, labels, adv, 0.5, normalizer=normalizer, loss_options=dict(entropy_coef=0.1), **options
        )
        g_want = torch.autograd.grad(want, list(model.parameters()))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got_stats.entropy, want_stats.entropy, rtol=1e-12, atol=1e-14)
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # the same loss, another tau: it is the loss's tau that reaches the head
    other = causal_lm_gft_loss(model, ids, mask, labels, adv, loss=GFTLoss(0.0, entropy_coef=0.1, **options))
    assert not torch.allclose(other[0], got)


def test_options_given_twice_or_owned_by_the_model_are_refused():
    model = _model()
    ids, mask, labels, adv = _batch()
    loss_fn = GFTLoss(0.5)
    with pytest.raises(TypeError, match=r"pass the loss's options in loss, not again as \['reduction', 'tau'\]"):
        causal_lm_gft_loss(model, ids, mask, labels, adv, 0.7, loss=loss_fn, reduction="sum")
    with pytest.raises(TypeError, match=r"not again as \['entropy_coef'\]"):
        causal_lm_gft_loss(model, ids, mask, labels, adv, loss=loss_fn, loss_options=dict(entropy_coef=0.1))
    with pytest.raises(TypeError, match="loss must be a gft_kernels.GFTLoss, got dict"):
        causal_lm_gft_loss(model, ids, mask, labels, adv, loss={"tau": 0.5})
    with pytest.raises(ValueError, match="the bias is the model head's"):
        causal_lm_gft_loss(model, ids, mask, labels, adv, loss=GFTLoss(bias=torch.zeros(64, dtype=torch.float64)))
    with pytest.raises(ValueError, match="the softcap is the model's"):
        causal_lm_gft_loss(model, ids, mask, labels, adv, loss=GFTLoss(softcap=30.0))


@pytest.mark.parametrize("reduction", ["seq-mean-token-mean", "seq-mean-token-sum"])
def test_a_packed_row_with_cu_seqlens_gives_the_padded_loss(reduction):
    model = _model()
    ids, mask, labels, adv = _batch()
    loss_fn = GFTLoss(0.7, reduction=reduction, backend="torch")
    want = causal_lm_gft_loss(model, ids, mask, labels, adv, loss=loss_fn)
    g_want = torch.autograd.grad(want, list(model.parameters()))
    lengths = mask.sum(1).tolist()
    row = torch.cat([ids[r, :n] for r, n in enumerate(lengths)])[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    # position t predicts token t + 1 of its own sequence; a sequence's last position predicts nothing
    shifted = torch.cat([torch.cat([labels[r, 1:n], torch.tensor([-100])]) for r, n in enumerate(lengths)])[None]
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    got = causal_lm_gft_loss(
        model,
        row,
        None,
        None,
        adv,  # one per sequence
        loss=loss_fn,
        shift_labels=shifted,
        cu_seqlens=cu_seqlens,
        position_ids=position_ids,
    )
    g_got = torch.autograd.grad(got, list(model.parameters()))
    # (float64 model, rotary tables in float32: agreement to float32's precision)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
