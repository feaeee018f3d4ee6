"""The packed (varlen) layout of ``gft_loss``: ``seq_ids`` or ``cu_seqlens`` (issue 32, item 3).

Sequences of random lengths (one of length 1, one whose tokens are all ignored) laid out in one
flat row give the loss and every gradient that the same sequences give padded, one per row, in
float64 on the reference engine: every reduction, every engine (the Triton one through the CPU
interpreter, in fp32), with and without a normalizer, with one advantage per sequence. The
layout's arguments are refused by shape, dtype and value, in one line, naming the argument.
"""

import pytest
import torch
from helpers import DEVICE

import gft_kernels
import gft_kernels.api as api
from gft_kernels import gft_loss

V, H = 37, 13  # not multiples of any block
REDUCTIONS = ("mean", "sum", "none", "seq-mean-token-mean", "seq-mean-token-sum")
ENGINES = {"reference": torch.float64, "torch": torch.float32, "triton": torch.float32}


def _sequences(seed, lengths=(4, 1, 6, 3, 2)):
    """Flat tokens of sequences of ``lengths``; the 4th is all ignored, the 2nd one token long."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H**0.5)
    targets = torch.randint(0, V, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.2] = -100
    starts = torch.tensor([0, *lengths]).cumsum(0)
    targets[starts[3] : starts[4]] = -100  # a sequence with nothing to count
    targets[starts[1]] = torch.randint(0, V, (), generator=g)  # the length-1 sequence counts
    adv = torch.randn(len(lengths), generator=g, dtype=torch.float64)
    return hidden, weight, targets, adv, list(lengths)


def _padded(x, lengths, fill):
    """[N, ...] flat tokens as [S, max(lengths), ...] rows, ``fill`` after each sequence's end."""
    out = x.new_full((len(lengths), max(lengths), *x.shape[1:]), fill)
    start = 0
    for row, n in enumerate(lengths):
        out[row, :n] = x[start : start + n]
        start += n
    return out


def _unpadded(x, lengths):
    return torch.cat([x[row, :n] for row, n in enumerate(lengths)])


def _layout(kind, lengths):
    if kind == "cu_seqlens":
        return {"cu_seqlens": torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)}
    return {"seq_ids": torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(DEVICE)}


def _loss_and_grads(hidden, weight, targets, adv, upstream, **kw):
    hidden = hidden.detach().to(DEVICE).requires_grad_(True)
    weight = weight.detach().to(DEVICE).requires_grad_(True)
    loss = gft_loss(hidden, weight, targets.to(DEVICE), adv.to(DEVICE), 0.7, **kw)
    (loss * upstream.to(DEVICE)).sum().backward()
    return loss.detach().cpu(), hidden.grad.cpu(), weight.grad.cpu()


def _normalizer(reduction, with_normalizer):
    if not with_normalizer or reduction in ("sum", "none"):
        return None
    return 9.0 if reduction == "mean" else 3.5


# (a normalizer applies to "mean" and the "seq-" reductions)
REDUCTIONS_AND_NORMALIZERS = [(r, False) for r in REDUCTIONS] + [
    (r, True) for r in REDUCTIONS if r not in ("sum", "none")
]


@pytest.mark.parametrize("layout", ["seq_ids", "cu_seqlens"])
@pytest.mark.parametrize(
    ("reduction", "with_normalizer"),
    REDUCTIONS_AND_NORMALIZERS,
    ids=[f"{r}-{n}" for r, n in REDUCTIONS_AND_NORMALIZERS],
)
@pytest.mark.parametrize("engine", list(ENGINES))
def test_packed_equals_padded_float64(engine, reduction, with_normalizer, layout, monkeypatch):
    dtype = ENGINES[engine]
    hidden, weight, targets, adv, lengths = _sequences(seed=len(reduction) + 7 * with_normalizer)
    hidden, weight = (x.to(dtype).to(torch.float64) for x in (hidden, weight))  # the engine's rounded inputs
    normalizer = _normalizer(reduction, with_normalizer)
    g = torch.Generator().manual_seed(5)
    up_packed = torch.randn(targets.shape, generator=g, dtype=torch.float64) if reduction == "none" else torch.ones(())
    up_padded = _padded(up_packed, lengths, 0.0) if reduction == "none" else up_packed

    want, want_dh, want_dw = _loss_and_grads(
        _padded(hidden, lengths, 0.0),
        weight,
        _padded(targets, lengths, -100),
        adv,
        up_padded,
        reduction=reduction,
        normalizer=normalizer,
        backend="reference",
    )
    if reduction == "none":
        want = _unpadded(want, lengths)
    want_dh = _unpadded(want_dh, lengths)

    one_pass = []
    real = api.precomputed_loss
    monkeypatch.setattr(api, "precomputed_loss", lambda *a: one_pass.append(1) or real(*a))
    got, got_dh, got_dw = _loss_and_grads(
        hidden.to(dtype),
        weight.to(dtype),
        targets,
        adv.to(dtype),
        up_packed.to(dtype),
        reduction=reduction,
        normalizer=normalizer,
        backend=engine,
        **_layout(layout, lengths),
    )
    # the chunked engine reduces a packed row on its one-pass path (the gradients formed in the forward)
    assert bool(one_pass) == (engine == "torch" and reduction != "none")
    rtol, atol = (1e-12, 1e-14) if dtype == torch.float64 else (1e-5, 1e-6)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    for name, a, b in (("dhidden", got_dh, want_dh), ("dlm_head", got_dw, want_dw)):
        torch.testing.assert_close(
            a.double(), b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()), msg=lambda m, n=name: f"{n}: {m}"
        )


def test_the_seq_reductions_count_the_layouts_sequences_not_the_row():
    """One row of three sequences: the seq- reductions average over 2 sequences with a valid
    token (the third is all ignored), each sequence's tokens apart; adv one per sequence."""
    hidden = torch.randn(6, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64)
    targets = torch.tensor([[1, 2, 3, -100, -100, 4]])
    seq_ids = torch.tensor([[0, 0, 0, 1, 1, 2]])
    adv = torch.tensor([1.0, 5.0, -2.0], dtype=torch.float64)
    loss_t = gft_loss(hidden[None], weight, targets, adv, 0.0, reduction="none", seq_ids=seq_ids, backend="reference")
    per_seq = [loss_t[0, :3].sum(), loss_t[0, 5]]
    torch.testing.assert_close(
        gft_loss(hidden[None], weight, targets, adv, 0.0, reduction="seq-mean-token-mean", seq_ids=seq_ids),
        (per_seq[0] / 3 + per_seq[1]) / 2,
    )
    torch.testing.assert_close(
        gft_loss(hidden[None], weight, targets, adv, 0.0, reduction="seq-mean-token-sum", seq_ids=seq_ids),
        (per_seq[0] + per_seq[1]) / 2,
    )
    # adv[seq_t]: the per-sequence advantage reaches each of its tokens
    logp = gft_loss(hidden, weight, targets[0], 1.0, 0.0, reduction="none", backend="reference")
    torch.testing.assert_close(loss_t[0], logp * adv[seq_ids[0]])


@pytest.mark.parametrize("adv_kind", ["scalar", "token", "flat-token"])
def test_packed_with_a_scalar_or_per_token_advantage(adv_kind):
    hidden, weight, targets, adv_seq, lengths = _sequences(seed=3)
    seq_ids = _layout("seq_ids", lengths)["seq_ids"].cpu()
    if adv_kind == "scalar":
        adv = torch.tensor(1.7, dtype=torch.float64)
    else:
        adv = adv_seq[seq_ids] + torch.randn(seq_ids.shape, dtype=torch.float64)  # differs within a sequence
    flat_shape = adv_kind == "flat-token"  # a [1, N] row with adv given flat [N]
    want = gft_loss(
        _padded(hidden, lengths, 0.0),
        weight,
        _padded(targets, lengths, -100),
        adv if adv.dim() == 0 else _padded(adv, lengths, 0.0),
        0.7,
        reduction="seq-mean-token-mean",
        backend="reference",
    )
    got = gft_loss(
        hidden[None] if flat_shape else hidden,
        weight,
        targets[None] if flat_shape else targets,
        adv,
        0.7,
        reduction="seq-mean-token-mean",
        backend="torch",
        seq_ids=seq_ids,
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_gftloss_takes_the_layout_and_a_normalizer_per_call():
    hidden, weight, targets, adv, lengths = _sequences(seed=4)
    layout = {k: v.cpu() for k, v in _layout("cu_seqlens", lengths).items()}
    module = gft_kernels.GFTLoss(0.7, reduction="seq-mean-token-sum", normalizer=2.0, backend="reference")
    for normalizer in (None, 8.0):
        want = gft_loss(
            hidden,
            weight,
            targets,
            adv,
            0.7,
            reduction="seq-mean-token-sum",
            normalizer=normalizer or 2.0,
            backend="reference",
            **layout,
        )
        torch.testing.assert_close(module(hidden, weight, targets, adv, normalizer=normalizer, **layout), want)
    with pytest.raises(ValueError, match="normalizer must be > 0, got -1.0"):
        module(hidden, weight, targets, adv, normalizer=-1.0, **layout)


def _call(**kw):
    hidden, weight, targets, adv, lengths = _sequences(seed=0)
    args = dict(reduction="seq-mean-token-mean", backend="torch")
    args.update(kw)
    return gft_loss(hidden, weight, args.pop("targets", targets), args.pop("adv", adv), 0.7, **args)


N = 16  # the tokens of _sequences()
CU = torch.tensor([0, 4, 5, 11, 14, 16], dtype=torch.int32)


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        (dict(seq_ids=torch.zeros(N, dtype=torch.long), cu_seqlens=CU), ValueError, "seq_ids or cu_seqlens, not both"),
        (dict(seq_ids=torch.zeros(N)), TypeError, "seq_ids must be an int32 or int64 tensor, got torch.float32"),
        (dict(seq_ids=[0] * N), TypeError, "seq_ids must be an int32 or int64 tensor, got list"),
        (dict(seq_ids=torch.zeros(2, 8, dtype=torch.long)), ValueError, r"seq_ids must have targets' shape \(16,\)"),
        (dict(seq_ids=torch.full((N,), 5)), ValueError, r"seq_ids must be in \[0, 5\) .* found \[5\]"),
        (dict(seq_ids=torch.full((N,), -1)), ValueError, r"seq_ids must be in \[0, 5\) .* found \[-1\]"),
        (dict(cu_seqlens=CU.float()), TypeError, "cu_seqlens must be an int32 or int64 tensor, got torch.float32"),
        (dict(cu_seqlens=CU[None]), ValueError, r"cu_seqlens must have shape \[S \+ 1\] .* got \(1, 6\)"),
        (dict(cu_seqlens=CU[:1]), ValueError, "cu_seqlens has no sequence .* targets have 16 tokens"),
        (dict(cu_seqlens=CU + 1), ValueError, "cu_seqlens must start at 0, got 1"),
        (
            dict(cu_seqlens=torch.tensor([0, 6, 5, 11, 14, 16], dtype=torch.int32)),
            ValueError,
            "cu_seqlens must be non-decreasing",
        ),
        (
            dict(cu_seqlens=torch.tensor([0, 4, 5, 11, 14, 15], dtype=torch.int32)),
            ValueError,
            "cu_seqlens must end at the number of tokens N = 16, got 15",
        ),
        (
            dict(cu_seqlens=CU, adv=torch.ones(4, dtype=torch.float64)),
            ValueError,
            r"adv of shape \(4,\) is neither per token \(N = 16\) nor per sequence \(S = 5",
        ),
        (
            dict(seq_ids=torch.zeros(N, dtype=torch.long), adv=torch.ones(0, dtype=torch.float64)),
            ValueError,
            r"adv has no entry \(shape \(0,\)\) but targets have 16 tokens",
        ),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_a_bad_layout_is_refused_in_one_line(kw, error, message):
    if "seq_ids" in kw and "found" in message:
        kw = dict(kw, adv=torch.ones(5, dtype=torch.float64))  # S = 5 from one advantage per sequence
    with pytest.raises(error, match=message) as info:
        _call(**kw)
    assert "\n" not in str(info.value)


def test_a_layout_lets_the_seq_reductions_take_one_flat_row():
    hidden, weight, targets, adv, lengths = _sequences(seed=0)
    with pytest.raises(ValueError, match="needs targets of shape"):
        gft_loss(hidden, weight, targets, 1.0, reduction="seq-mean-token-mean")
    gft_loss(hidden, weight, targets, 1.0, reduction="seq-mean-token-mean", cu_seqlens=CU)
