"""Every causal-LM architecture the installed transformers maps (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``),
built tiny from its config, in float64: ``gft_kernels.causal_lm_gft_loss`` gives the loss and every
parameter's gradient of GFT computed from the model's own ``model(...).logits`` (tied and untied
heads; backends "torch" and "reference"), or refuses with ``UnsupportedModelError`` naming the
architecture. Skipped only: architectures that cannot be built tiny, or whose own forward does
not run on the tiny config (the reason is the skip message)."""

import inspect

import pytest
import torch
from model_check import OwnForwardFails, batch, check
from tiny_models import Skip, causal_lm_types, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

import gft_kernels
from gft_kernels.models import UnsupportedModelError, head_input, logits_transform


@pytest.mark.slow
@pytest.mark.parametrize("model_type", causal_lm_types())
def test_exact_or_refused(model_type):
    verdicts = {}
    for tie in (True, False):
        try:
            model = tiny_model(model_type, tie=tie)
        except Skip as e:
            pytest.skip(str(e))
        for backend in ("torch", "reference"):
            try:
                verdicts[tie, backend] = check(model, backend)
            except OwnForwardFails as e:
                pytest.skip(str(e))
    # one verdict per model: the refusal does not depend on the backend
    assert len({v for (tie, _), v in verdicts.items() if tie}) == 1
    assert len({v for (tie, _), v in verdicts.items() if not tie}) == 1
    if verdicts[False, "torch"] == "exact":
        check_patched(model)
        check_compiled_head_input(model)


def check_compiled_head_input(model):
    """Where the probe let the backbone stand in for the hook (the path under torch.compile), the
    backbone gives the head's input exactly on a batch with padding too."""
    from gft_kernels.models.probe import _BACKBONES, _backbone_head_input, _BackboneCall

    if not isinstance(_BACKBONES.get(model), _BackboneCall):
        return  # refused under compile; eager only
    ids, mask, _, _ = batch(logits_transform(model).vocab or model.config.get_text_config(decoder=True).vocab_size)
    mask[1, -2:] = 0
    with torch.no_grad():
        hooked = head_input(model, ids, mask)
        torch.testing.assert_close(_backbone_head_input(model, ids, mask, {}), hooked, rtol=0, atol=0)


def check_patched(model):
    """The patched forward (no advantages, tau 0) gives the model's own loss, or refuses."""
    ids, mask, labels, _ = batch(logits_transform(model).vocab or model.config.get_text_config(decoder=True).vocab_size)
    kw = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    try:
        with torch.no_grad():
            own = model(input_ids=ids, attention_mask=mask, labels=labels, **kw).loss
    except Exception:
        own = None  # its own loss does not run on a text batch: the patch must refuse
    try:
        gft_kernels.patch(model, backend="torch")
    except UnsupportedModelError as e:
        assert type(model).__name__ in str(e)
        return
    assert own is not None
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    finally:
        gft_kernels.unpatch(model)
    assert out.logits is None
    torch.testing.assert_close(out.loss, own.to(out.loss.dtype), rtol=1e-6, atol=1e-7)


def _tiny(config_cls, model_cls, **fields):
    import transformers

    sizes = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    cfg = getattr(transformers, config_cls)(**{**sizes, **fields})
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(cfg).double()


@pytest.mark.parametrize(
    "config_cls,model_cls,fields,found",
    [
        ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 3.0}, "logits / logits_scaling = 3"),
        ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", {"logits_scaling": 3.0}, "logits * logits_scaling = 3"),
        ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.3}, "logits * logit_scale = 0.3"),
        ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 2.0}, "softcap final_logit_softcapping = 2"),
        (
            "MiniCPM3Config",
            "MiniCPM3ForCausalLM",
            {
                "dim_model_base": 8,
                "num_key_value_heads": 4,
                "qk_nope_head_dim": 8,
                "qk_rope_head_dim": 8,
                "v_head_dim": 8,
                "q_lora_rank": 16,
                "kv_lora_rank": 16,
            },
            None,
        ),
    ],
)
def test_known_transforms_with_nontrivial_values(config_cls, model_cls, fields, found):
    """The defaults of the tiny enumeration leave some scales at 1: here each is away from 1.
    Granite divides by ``logits_scaling``, HyperCLOVAX multiplies by it, MiniCPM3 divides the
    hidden state before its head (taken with the head's input: nothing in the table)."""
    model = _tiny(config_cls, model_cls, **fields)
    spec = logits_transform(model)
    assert (found in spec.found) if found else spec.found == ()
    assert check(model, "torch") == "exact"


class _ScaledLlama(LlamaForCausalLM):
    """A model that transforms its logits in a way no config field says."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = self.transform(out.logits)
        return out


def test_unknown_logit_scale_is_refused():
    model = _ScaledLlama(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).double()
    model.transform = lambda z: z * 1.5
    ids, mask, labels, adv = batch(64)
    with pytest.raises(UnsupportedModelError, match=r"_ScaledLlama.*best scalar fit x1\.5"):
        gft_kernels.causal_lm_gft_loss(model, ids, mask, labels, adv, backend="torch")
    # the verdict is cached; a second call refuses without probing again
    with pytest.raises(NotImplementedError, match="_ScaledLlama"):
        gft_kernels.causal_lm_gft_loss(model, ids, mask, labels, adv, backend="torch")


def test_unknown_softcap_is_refused_by_the_amplified_probe():
    """In fp32, a cap of 500 changes the tiny model's natural logits (|z| < 2) by about 1e-6,
    within fp32 agreement: the probe's amplified logits (about 200) show it."""
    model = _ScaledLlama(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    model.transform = lambda z: 500.0 * torch.tanh(z / 500.0)
    with pytest.raises(UnsupportedModelError, match="at amplified logits"):
        gft_kernels.check_model(model)


def test_head_with_extra_parameters_is_refused():
    model = _tiny("LlamaConfig", "LlamaForCausalLM")

    class Head(torch.nn.Linear):
        def __init__(self):
            super().__init__(32, 64, bias=False)
            self.gain = torch.nn.Parameter(torch.ones(64))

        def forward(self, x):
            return super().forward(x) * self.gain

    model.lm_head = Head().double()
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM.*parameters \['gain', 'weight'\]"):
        gft_kernels.check_model(model)


def test_functional_op_on_padded_batch_with_token_advantages():
    """Right padding (mask 0, labels -100) and per-token advantages [B, T-1]."""
    model = _tiny("Qwen2Config", "Qwen2ForCausalLM")
    ids, mask, labels, _ = batch(64)
    mask[1, -2:] = 0
    labels[1, -2:] = -100
    adv = torch.randn(2, ids.shape[1] - 1, dtype=torch.float64)
    loss = gft_kernels.causal_lm_gft_loss(model, ids, mask, labels, adv, 0.7, backend="torch")
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logp = logits.log_softmax(-1).gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
    p = logp.detach().exp()
    valid = labels[:, 1:] != -100
    ref = torch.where(valid, -adv * torch.where(p < 0.7, p, 1.0) * logp, 0.0).sum() / valid.sum()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
