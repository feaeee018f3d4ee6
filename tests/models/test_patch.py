"""gft_kernels.patch(model): the model's forward returns the GFT loss without logits; with no
advantages and tau=0 it is the model's own loss, and transformers.Trainer trains it unchanged."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import gft_kernels


def _model(dtype=torch.float64, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        **extra,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[2, -3:] = -100
    return ids, mask, labels


def _grads(loss, model):
    return torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("num_items", [None, 11])
def test_patched_loss_is_the_models_own(num_items):
    model = _model()
    ids, mask, labels = _batch()
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    own = model(input_ids=ids, attention_mask=mask, labels=labels, **kw).loss
    own_g = _grads(own, model)
    gft_kernels.patch(model, backend="torch")
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    assert out.logits is None
    # transformers' loss upcasts the logits with .float(): a float64 model's own loss is fp32
    torch.testing.assert_close(out.loss, own.double(), rtol=1e-6, atol=1e-7)
    for g, r in zip(_grads(out.loss, model), own_g):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7 * float(r.abs().max()))


def test_patched_gft_with_advantages_and_stats():
    model = _model()
    ids, mask, labels = _batch()
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    ref = gft_kernels.causal_lm_gft_loss(model, ids, mask, labels, adv, 0.7, backend="torch")
    gft_kernels.patch(model, backend="torch")
    out = model(ids, attention_mask=mask, labels=labels, advantages=adv, tau=0.7, return_gft_stats=True)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-14)
    assert out.gft_stats.logp.shape == (3, 8)
    # per-token advantages aligned with labels [B, T] are shifted with them
    tok = adv[:, None].expand(3, 9).clone()
    out2 = model(ids, attention_mask=mask, labels=labels, advantages=tok, tau=0.7)
    torch.testing.assert_close(out2.loss, ref, rtol=1e-12, atol=1e-14)
    # the patch's own tau is the default
    gft_kernels.patch(model, tau=0.7, backend="torch")
    torch.testing.assert_close(
        model(ids, attention_mask=mask, labels=labels, advantages=adv).loss, ref, rtol=1e-12, atol=1e-14
    )


def test_without_labels_the_original_forward_runs():
    model = _model()
    ids, mask, _ = _batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    gft_kernels.patch(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=0)
    generated = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)
    gft_kernels.unpatch(model)
    assert "forward" not in model.__dict__
    assert model(input_ids=ids, labels=ids).logits is not None


def test_a_model_whose_loss_adds_terms_is_refused():
    """Mixtral with output_router_logits adds its router's auxiliary loss to its own loss."""
    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.5,
    )
    cfg._experts_implementation = "eager"
    model = MixtralForCausalLM(cfg)
    with pytest.raises(gft_kernels.UnsupportedModelError, match="MixtralForCausalLM.*auxiliary"):
        gft_kernels.patch(model)
    assert "forward" not in model.__dict__


def _train(patched, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _model(torch.float32, seed=1)
    if patched:
        gft_kernels.patch(model, backend="torch")
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(16):
        n = 6 + i % 5
        ids = torch.randint(0, 64, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})

    def collate(items):
        width = max(len(r["input_ids"]) for r in items)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in items])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in items])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in items])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    args = TrainingArguments(
        output_dir=str(tmp_path / ("p" if patched else "u")),
        max_steps=5,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, [p.detach().clone() for p in model.parameters()]


def test_trainer_loss_curve_unchanged_by_the_patch(tmp_path):
    losses, params = _train(False, tmp_path)
    patched_losses, patched_params = _train(True, tmp_path)
    assert len(losses) == 5
    torch.testing.assert_close(torch.tensor(patched_losses), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    # Adam moves a weight by about lr per step whatever its gradient's size, so fp32 rounding
    # differences in near-zero gradients show up to a small fraction of lr (5e-3)
    for p, q in zip(patched_params, params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=5e-5)
