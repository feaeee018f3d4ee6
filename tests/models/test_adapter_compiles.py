"""The model adapter compiles: ``torch.compile(fullgraph=True)`` under inductor around
``causal_lm_gft_loss`` and around a patched model's forward makes one graph, and the compiled loss
and every parameter's gradient equal eager's, in fp32 and under bf16 autocast, on architectures
with each kind of logits transform (a final softcap, a logits scale, a head with a bias). Under
compile the head's input comes from the model's backbone, which the probe saw to give it
exactly (``head_input``); eagerly, from a hook that stops the model's forward at its head."""

import contextlib

import pytest
import torch
from tiny_models import tiny_model

import gft_kernels
from gft_kernels.models import check_model, head_input, logits_transform

transformers = pytest.importorskip("transformers")

# One layer each (compiling on a CPU takes most of these tests' time), with the logits transform
# of each kind set to bind at a tiny model's small logits: a final softcap (gemma2), a logits
# scale (granite), a head with a bias (phi).
SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)
ARCHITECTURES = {
    "gemma2": ("Gemma2", dict(head_dim=16, final_logit_softcapping=0.5, tie_word_embeddings=False)),
    "granite": ("Granite", dict(logits_scaling=0.25)),
    "phi": ("Phi", dict()),
}
# Compiled against eager, with inductor rounding to bf16 where eager does (emulate_precision_casts).
# Under bf16 autocast the bf16 gradients of the op's inputs may be summed in another order when
# compiled (the api takes the ops under torch.compile): bf16's machine epsilon of a gradient's
# largest entry.
# The losses (fp32 out of the op either way) agree to 1e-5.
GRAD_TOLERANCE = {"fp32": 1e-5, "bf16": 2**-7}  # largest difference / largest entry


def _model(model_type):
    prefix, extra = ARCHITECTURES[model_type]
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{prefix}Config")(**SMALL, **extra)
    cfg._attn_implementation = "eager"
    return getattr(transformers, f"{prefix}ForCausalLM")(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, -2:] = -100
    adv = torch.tensor([0.7, -1.3])
    return ids, mask, labels, adv


def _losses_and_grads(model, fn, ids, precision):
    """Both losses, and every parameter's gradient of a weighted sum of them."""
    model.zero_grad(set_to_none=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with autocast:
        adapter, patched = fn(ids)
    (adapter + 0.5 * patched).backward()
    return (adapter.detach(), patched.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_adapter_and_patched_forward_compile_and_equal_eager(model_type, precision):
    model = _model(model_type)
    assert logits_transform(model).found or model.lm_head.bias is not None  # a transform binds
    ids, mask, labels, adv = _batch()
    gft_kernels.patch(model, tau=0.7, backend="torch")  # probes the model, eagerly

    def step(ids):
        adapter = gft_kernels.causal_lm_gft_loss(model, ids, mask, labels, adv, 0.7, backend="torch")
        patched = model(ids, attention_mask=mask, labels=labels, advantages=adv * 0.5, tau=0.3).loss
        return adapter, patched

    torch._dynamo.reset()
    eager_losses, eager_grads = _losses_and_grads(model, step, ids, precision)
    with torch._inductor.config.patch(emulate_precision_casts=True):
        compiled = torch.compile(step, backend="inductor", fullgraph=True)
        losses, grads = _losses_and_grads(model, compiled, ids, precision)
    for loss, eager in zip(losses, eager_losses):
        torch.testing.assert_close(loss, eager, rtol=1e-5, atol=0)
    assert all(g.abs().max() > 0 for g in eager_grads.values())
    for name, g in eager_grads.items():
        err = float((grads[name] - g).abs().max() / g.abs().max())
        assert err <= GRAD_TOLERANCE[precision], (name, err)


def test_compiled_head_input_is_the_backbones_output_the_probe_checked():
    """Under compile the head's input is the backbone's output, equal to what the model's own
    forward hands to its head (captured eagerly by the hook)."""
    model = tiny_model("llama", dtype=torch.float32)
    ids, mask, _, _ = _batch()
    check_model(model)
    torch._dynamo.reset()
    compiled = torch.compile(lambda ids: head_input(model, ids, mask), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids), head_input(model, ids, mask), rtol=0, atol=0)


class _Rescaled(torch.nn.Module):
    """A causal LM whose forward changes its backbone's output before the head."""

    def __init__(self, inner):
        super().__init__()
        self.model, self.lm_head, self.config = inner.model, inner.lm_head, inner.config

    def get_output_embeddings(self):
        return self.lm_head

    @property
    def base_model(self):
        return self.model

    def forward(self, input_ids, attention_mask=None, **kwargs):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return transformers.modeling_outputs.CausalLMOutput(logits=self.lm_head(h * 0.5))


def test_compile_refuses_a_model_whose_backbone_output_is_not_its_head_input():
    model = _Rescaled(tiny_model("llama", dtype=torch.float32))
    ids, mask, labels, _ = _batch()
    check_model(model)  # exact eagerly: the hook captures the rescaled input
    eager = gft_kernels.causal_lm_gft_loss(model, ids, mask, labels, 1.0, 0.0, backend="torch")
    torch.testing.assert_close(
        eager, torch.nn.functional.cross_entropy(model(ids, mask).logits[:, :-1].transpose(1, 2), labels[:, 1:])
    )
    torch._dynamo.reset()
    compiled = torch.compile(lambda ids: head_input(model, ids, mask), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="changes its backbone LlamaModel's output before the head"):
        compiled(ids)


def test_compile_refuses_a_model_not_probed():
    model = tiny_model("llama", dtype=torch.float32)
    ids, mask, labels, _ = _batch()
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda ids: gft_kernels.causal_lm_gft_loss(model, ids, mask, labels, 1.0, 0.7, backend="torch"),
        backend="eager",
        fullgraph=True,
    )
    with pytest.raises(Exception, match=r"not probed; call check_model\(model\)"):
        compiled(ids)


def test_compile_refuses_a_head_with_hooks():
    """A head that runs more than its forward (here a user's hook; a sharding framework's hooks
    gather its weight) is called as the head's own forward, eagerly only."""
    model = tiny_model("llama", dtype=torch.float32)
    ids, mask, labels, _ = _batch()
    check_model(model)
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    eager = gft_kernels.causal_lm_gft_loss(model, ids, mask, labels, 1.0, 0.7, backend="torch")
    assert calls == [()]  # the hook ran, on the loss the head's call returned
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda ids: gft_kernels.causal_lm_gft_loss(model, ids, mask, labels, 1.0, 0.7, backend="torch"),
        backend="eager",
        fullgraph=True,
    )
    with pytest.raises(Exception, match="the output head Linear is wrapped or has hooks"):
        compiled(ids)
    assert eager.dim() == 0


@pytest.mark.slow
def test_without_fullgraph_a_refusal_is_a_graph_break_and_the_hook_runs():
    """Without fullgraph the refusal breaks the graph: the rest runs eagerly, where the hook
    captures the head's input of a model never probed."""
    model = tiny_model("llama", dtype=torch.float32)
    ids, mask, _, _ = _batch()
    torch._dynamo.reset()
    partial = torch.compile(lambda ids: head_input(model, ids, mask), backend="eager")
    torch.testing.assert_close(partial(ids), head_input(model, ids, mask), rtol=0, atol=0)
