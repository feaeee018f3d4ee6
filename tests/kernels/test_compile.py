"""``torch.compile(fullgraph=True)`` traces a small transformers model with the loss inside: the
engines' launches are custom ops (``gft_kernels/fused.py``) with fake implementations, so dynamo
makes one graph, and the compiled loss and every gradient equal eager's (the torch engine, the
reference, and the Triton engine, through its interpreter on a CPU)."""

import pytest
import torch

import gft_kernels

transformers = pytest.importorskip("transformers")


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    return transformers.LlamaForCausalLM(cfg)


class _Recorder:
    """A dynamo backend that counts the graphs it is handed (one: no graph break) and runs them
    through AOTAutograd (forward and backward graphs, as inductor would get them)."""

    def __init__(self):
        from torch._dynamo.backends.common import aot_autograd

        self.graphs = 0
        self._aot = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=lambda gm, _: gm)

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self._aot(gm, example_inputs)


CASES = {
    "plain": dict(),
    "stats+policy-terms": dict(return_stats=True, entropy_coef=0.05, clip_high=0.3, temperature=0.8, softcap=5.0),
    "per-token": dict(reduction="none"),
}


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
@pytest.mark.parametrize("case", CASES)
def test_compiled_model_with_the_loss_inside_is_one_graph_and_equals_eager(backend, case):
    torch._dynamo.reset()  # each case compiles the same code object afresh (no recompile limit)
    model = _model()
    ids = torch.randint(0, 96, (2, 11))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 8:] = -100
    adv = torch.tensor([0.7, -1.3])
    old_logp = torch.full((2, 10), -3.0)
    options = dict(CASES[case], backend=backend, check_values=False)  # value checks read tensors on the host
    if case == "stats+policy-terms":
        options["old_logp"] = old_logp

    def step(ids):
        h = model.model(input_ids=ids).last_hidden_state
        out = gft_kernels.gft_loss(h[:, :-1], model.lm_head.weight, labels[:, 1:], adv, 0.7, **options)
        loss, stats = out if isinstance(out, tuple) else (out, None)
        if loss.dim():
            loss = (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum()
        return loss if stats is None else (loss, stats.rectified_frac, stats.entropy)

    def run(fn):
        model.zero_grad(set_to_none=True)
        out = fn(ids)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return out, grads

    recorder = _Recorder()
    eager_out, eager_grads = run(step)
    compiled_out, compiled_grads = run(torch.compile(step, backend=recorder, fullgraph=True))
    assert recorder.graphs == 1
    for a, b in zip(
        compiled_out if isinstance(compiled_out, tuple) else (compiled_out,),
        eager_out if isinstance(eager_out, tuple) else (eager_out,),
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) == len(list(model.parameters()))
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_dynamo_explain_finds_no_graph_break():
    model = _model()
    ids = torch.randint(0, 96, (2, 7))
    labels = ids.clone()
    labels[:, :2] = -100

    def step(ids):
        h = model.model(input_ids=ids).last_hidden_state
        return gft_kernels.gft_loss(
            h[:, :-1], model.lm_head.weight, labels[:, 1:], 1.0, 0.7, backend="torch", check_values=False
        )

    explained = torch._dynamo.explain(step)(ids)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_the_ops_text_argument_carries_every_option():
    """The custom ops carry the engine's options as text (``KernelOptions.key``): every field,
    the Triton launch options and CUDA tiles included, reads back equal."""
    from gft_kernels.engine import KernelOptions
    from gft_kernels.triton_ops import launch

    tuned = launch.LaunchOptions(
        backward_design="atomic",
        scratch_fraction=1e-9,
        split_cols=48,
        stores_only=True,
        cuda_tiles=(launch.CUDA_FWD, launch.CUDA_BWD),
    )
    for options in (
        KernelOptions(),
        KernelOptions(0.7, 5.0, True, True, launch.DEFAULT_OPTIONS, True),
        KernelOptions(1 / 3, None, False, False, tuned, False),
    ):
        assert KernelOptions.from_key(options.key(), launch.LaunchOptions) == options
