"""``gft_kernels.logprobs``: per-token log-probs and entropies with their backward, on every
engine, against a float64 truth written here (materialized logits, autograd), with random
upstream gradients on both outputs (the ignored tokens' included: they must reach nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import DEVICE, make_case, rel_err

import gft_kernels

ROOT = Path(__file__).resolve().parents[2]


def _truth(hidden, weight, bias, targets, temperature=1.0, softcap=None, ignore_index=-100):
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lp = z - torch.logsumexp(z, -1, keepdim=True)
    valid = targets != ignore_index
    logp = lp.gather(-1, torch.where(valid, targets, 0)[..., None])[..., 0]
    entropy = -(lp.exp() * lp).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def _outputs(fn, hidden, weight, bias, up_logp, up_entropy):
    """Both outputs and the gradients of ``sum(up_logp * logp + up_entropy * entropy)``."""
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    logp, entropy = fn(*leaves)
    (logp.double() * up_logp + entropy.double() * up_entropy).sum().backward()
    return [logp.detach().double(), entropy.detach().double(), *(x.grad.double() for x in leaves)]


def _case(seed=0, lead=(3, 7), vocab=61, hidden_dim=12):
    case = make_case(lead, vocab, hidden_dim, bias=True, ignore_frac=0.25, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    up = [torch.randn(lead, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2)]
    return case, up


@pytest.mark.parametrize(
    "backend,dtype,tol",
    [
        ("reference", torch.float64, 1e-12),
        ("torch", torch.float64, 1e-12),
        ("torch", torch.float32, 2e-5),
        ("triton", torch.float32, 2e-5),
        ("auto", torch.float32, 2e-5),
    ],
)
@pytest.mark.parametrize("softcap", [None, 6.0])
def test_logprobs_and_entropy_match_the_float64_truth(backend, dtype, tol, softcap):
    case, (up_lp, up_ent) = _case()
    options = dict(temperature=0.8, softcap=softcap)
    cast = [x.to(dtype) for x in (case.hidden, case.weight, case.bias)]
    got = _outputs(
        lambda h, w, b: gft_kernels.logprobs(
            h, w, case.targets, bias=b, return_entropy=True, backend=backend, **options
        ),
        *cast,
        up_lp,
        up_ent,
    )
    want = _outputs(
        lambda h, w, b: _truth(h, w, b, case.targets, **options), *(x.double() for x in cast), up_lp, up_ent
    )
    ignored = case.targets == -100
    assert ignored.any() and (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()
    for name, a, b in zip(("logp", "entropy", "dhidden", "dweight", "dbias"), got, want):
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    assert got[0].dtype == got[1].dtype == torch.float64  # (cast above) fp32 outputs for fp32 inputs:
    out = gft_kernels.logprobs(cast[0], cast[1], case.targets, bias=cast[2], backend=backend, **options)
    assert out.logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.entropy is None


def test_logprobs_without_entropy_are_the_gft_loss_stats_and_its_gradient():
    """The log-prob alone: gradients of ``sum(up * logp)`` equal the truth's (no entropy term)."""
    case, (up, _) = _case(seed=3)
    got = _outputs(
        lambda h, w, b: (gft_kernels.logprobs(h, w, case.targets, bias=b, backend="torch").logp, h.sum() * 0),
        case.hidden,
        case.weight,
        case.bias,
        up,
        0.0,
    )
    want = _outputs(
        lambda h, w, b: (_truth(h, w, b, case.targets)[0], h.sum() * 0), case.hidden, case.weight, case.bias, up, 0.0
    )
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_confident_tokens_keep_relative_precision(backend):
    """p within 1e-7 of 1: the fused engines give logp and its gradient to fp32 relative
    precision, where materialized fp32 logits (naive PyTorch) lose most digits."""
    n, v, margin = 20, 50, 20.0
    g = torch.Generator().manual_seed(12)
    targets = torch.randint(0, v, (n,), generator=g)
    hidden = margin * torch.nn.functional.one_hot(targets, v).double() + 0.3 * torch.randn(
        n, v, generator=g, dtype=torch.float64
    )
    weight = torch.eye(v, dtype=torch.float64) + 0.01 * torch.randn(v, v, generator=g, dtype=torch.float64)
    hidden, weight, targets = (x.to(DEVICE) for x in (hidden, weight, targets))
    up = torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE)
    h32, w32 = hidden.float(), weight.float()

    def grads(fn, h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        logp = fn(h, w)
        (logp.double() * up).sum().backward()
        return logp.detach().double(), w.grad.double()

    truth = grads(lambda h, w: _truth(h, w, None, targets)[0], h32.double(), w32.double())
    got = grads(lambda h, w: gft_kernels.logprobs(h, w, targets, backend=backend).logp, h32, w32)
    assert (truth[0] < 0).all() and (truth[0] > -1e-5).all()
    assert ((got[0] - truth[0]).abs() / truth[0].abs()).max() < 1e-5
    assert rel_err(got[1], truth[1]) < 1e-5
    naive = grads(lambda h, w: gft_kernels.logprobs(h, w, targets, backend="reference").logp, h32, w32)
    assert rel_err(naive[1], truth[1]) > 1e-3  # the cancellation the fused engines avoid


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_autocast_runs_the_product_as_linear_would(backend):
    """Under autocast the product's inputs are cast as ``nn.Linear``'s; gradients come back in
    the parameters' dtype and equal those of the same op on the cast inputs."""
    case, (up, up_ent) = _case(seed=5)
    h, w, b = (x.float() for x in (case.hidden, case.weight, case.bias))
    dtype = torch.bfloat16

    def under_autocast(h, w, b):
        with torch.autocast(DEVICE.type, dtype=dtype):
            out = gft_kernels.logprobs(h, w, case.targets, bias=b, return_entropy=True, backend=backend)
        return out.logp, out.entropy

    def on_cast_inputs(h, w, b):
        out = gft_kernels.logprobs(
            h.to(dtype), w.to(dtype), case.targets, bias=b.to(dtype), return_entropy=True, backend=backend
        )
        return out.logp, out.entropy

    got, want = _outputs(under_autocast, h, w, b, up, up_ent), _outputs(on_cast_inputs, h, w, b, up, up_ent)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_no_tokens_and_bad_input():
    h, w = torch.randn(0, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    out = gft_kernels.logprobs(h, w, torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert out.logp.shape == out.entropy.shape == (0,)
    out.logp.sum().backward()
    assert w.grad.shape == w.shape and not w.grad.any()
    with pytest.raises(ValueError, match=r"\[0, V=9\)"):
        gft_kernels.logprobs(torch.randn(2, 4), w, torch.tensor([3, 9]))
    with pytest.raises(ValueError, match="temperature"):
        gft_kernels.logprobs(torch.randn(2, 4), w, torch.tensor([3, 1]), temperature=0.0)


@pytest.mark.parametrize("model_type", ["gemma2", "qwen2"])
def test_causal_lm_logprobs_equal_the_models_own_logits(model_type):
    """Through the model adapter: the model's own logits transform (gemma2's final softcap)
    and a sampling temperature, against ``model(...).logits``, log-probs, entropies and the
    head's gradient."""
    from tiny_models import tiny_model

    model = tiny_model(model_type)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    T = 0.7
    up = torch.randn(2, 8, generator=g, dtype=torch.float64)
    weight = model.get_output_embeddings().weight

    lp_all = (model(input_ids=ids).logits[:, :-1].double() / T).log_softmax(-1)
    valid = labels[:, 1:] != -100
    want_lp = torch.where(valid, lp_all.gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0], 0.0)
    want_ent = torch.where(valid, -(lp_all.exp() * lp_all).sum(-1), 0.0)
    (want_grad,) = torch.autograd.grad((want_lp * up).sum() + (want_ent * up).sum(), weight)

    out = gft_kernels.causal_lm_logprobs(model, ids, None, labels, temperature=T, return_entropy=True, backend="torch")
    (grad,) = torch.autograd.grad((out.logp * up).sum() + (out.entropy * up).sum(), weight)
    torch.testing.assert_close(out.logp, want_lp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.entropy, want_ent, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-10)


_VOCAB_PARALLEL = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    import gft_kernels

    def worker(rank, world, init, out):
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
        g = torch.Generator().manual_seed(0)
        h = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
        w = torch.randn(23, 8, generator=g, dtype=torch.float64)
        b = torch.randn(23, generator=g, dtype=torch.float64)
        t = torch.randint(0, 23, (3, 5), generator=g)
        t[0, 0], t[1, 1] = -100, 22
        up = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
        bounds = [0, 9, 23]
        rows = slice(bounds[rank], bounds[rank + 1])

        def run(w, b, dtype=torch.float64, **kw):
            h1, w1, b1 = (x.detach().to(dtype).clone().requires_grad_() for x in (h, w, b))
            out = gft_kernels.logprobs(h1, w1, t, bias=b1, return_entropy=True, temperature=0.9, **kw)
            (out.logp * up[0] + out.entropy * up[1]).sum().backward()
            return [out.logp, out.entropy, h1.grad, w1.grad, b1.grad]

        want = run(w, b, backend="torch")
        want[3], want[4] = want[3][rows], want[4][rows]
        for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):
            got = run(w[rows], b[rows], dtype, backend=backend, vocab_parallel_group=dist.group.WORLD)
            err = max(float((x.double() - y.double()).abs().max()) for x, y in zip(got, want))
            print(backend, rank, err)
            with open(os.path.join(out, f"{backend}{rank}"), "w") as f:
                f.write(json.dumps(err))
        dist.destroy_process_group()

    if __name__ == "__main__":
        out = sys.argv[1]
        mp.start_processes(worker, args=(2, os.path.join(out, "init"), out), nprocs=2, start_method="fork")
    """
)


@pytest.mark.slow
def test_vocabulary_parallel_logprobs_equal_one_process(tmp_path):
    """Two gloo ranks, each holding uneven rows of the head: the log-probs, entropies, dhidden
    and this rank's rows of dW and db equal the unsharded op's, on both engines (triton through
    the interpreter; fp64 inputs on the chunked engine)."""
    script = tmp_path / "vocab_parallel.py"
    script.write_text(_VOCAB_PARALLEL)
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(2):
        assert float((tmp_path / f"torch{rank}").read_text()) < 1e-12
        assert float((tmp_path / f"triton{rank}").read_text()) < 1e-4


@pytest.mark.slow
def test_logprobs_compile_as_one_graph_and_equal_eager():
    """``torch.compile(fullgraph=True)`` traces the op (its engine launches are the same custom
    ops as ``gft_loss``'s): log-probs, entropies and every gradient equal eager's."""

    def op(h, w, b, t):
        out = gft_kernels.logprobs(
            h, w, t, bias=b, return_entropy=True, backend="torch", check_values=False, temperature=0.8, softcap=5.0
        )
        return out.logp, out.entropy

    case, (up_lp, up_ent) = _case(seed=7)
    leaves = [x.float() for x in (case.hidden, case.weight, case.bias)]
    eager = _outputs(lambda h, w, b: op(h, w, b, case.targets), *leaves, up_lp, up_ent)
    compiled_op = torch.compile(op, fullgraph=True)
    compiled = _outputs(lambda h, w, b: compiled_op(h, w, b, case.targets), *leaves, up_lp, up_ent)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
