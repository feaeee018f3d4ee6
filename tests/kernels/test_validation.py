"""Bad input gets a ValueError/TypeError naming the argument and the value seen, before any
kernel runs; nothing the caller passed is modified."""

import warnings

import pytest
import torch
from torch import nn

import gft_kernels
from gft_kernels.triton_ops import launch


def _inputs(n=6, v=20, h=8, dtype=torch.float32):
    return (
        torch.randn(2, n, h, dtype=dtype),
        torch.randn(v, h, dtype=dtype),
        torch.randint(0, v, (2, n)),
        torch.randn(2, dtype=dtype),
    )


@pytest.fixture
def no_kernel(monkeypatch):
    """Fail loudly if any engine is reached: errors must come before a launch."""

    def boom(*a, **k):
        raise AssertionError("an engine ran before the input was rejected")

    for mod in (launch, gft_kernels.torch_backend, gft_kernels.reference):
        for method in ("partials", "backward", "loss_and_grads"):
            if hasattr(mod.ENGINE, method):
                monkeypatch.setattr(mod.ENGINE, method, boom)
    monkeypatch.setattr(gft_kernels.reference, "reference_logprobs", boom)


BAD = [
    # (description, change to the default call, exception, words the message must contain)
    ("hidden last dim", dict(hidden=torch.randn(2, 6, 9)), ValueError, ["H = 9", "(20, 8)"]),
    ("targets shape", dict(targets=torch.randint(0, 20, (2, 5))), ValueError, ["targets", "(2, 6)", "(2, 5)"]),
    ("targets dtype", dict(targets=torch.zeros(2, 6)), TypeError, ["targets", "torch.float32"]),
    ("target id too large", dict(targets=torch.full((2, 6), 20)), ValueError, ["[0, V=20)", "20"]),
    ("negative target id", dict(targets=torch.full((2, 6), -1)), ValueError, ["ignore_index=-100", "-1"]),
    ("adv not finite", dict(adv=torch.tensor([1.0, float("nan")])), ValueError, ["adv", "nan"]),
    ("adv infinite", dict(adv=float("inf")), ValueError, ["adv", "inf"]),
    ("adv shape", dict(adv=torch.randn(3)), ValueError, ["adv", "(3,)", "(2, 6)"]),
    ("adv integer", dict(adv=torch.ones(2, dtype=torch.long)), TypeError, ["adv", "torch.int64"]),
    ("negative tau", dict(tau=-0.1), ValueError, ["tau", "-0.1"]),
    ("nan tau", dict(tau=float("nan")), ValueError, ["tau", "nan"]),
    ("tau string", dict(tau="0.7"), TypeError, ["tau", "'0.7'"]),
    ("reduction", dict(reduction="avg"), ValueError, ["reduction", "'avg'"]),
    ("backend", dict(backend="cuda"), ValueError, ["backend", "'cuda'"]),
    (
        "dtype mismatch",
        dict(lm_head=torch.randn(20, 8, dtype=torch.float16)),
        TypeError,
        ["torch.float32", "torch.float16"],
    ),
    ("lm_head 1-d", dict(lm_head=torch.randn(20)), ValueError, ["lm_head", "(20,)"]),
    ("lm_head type", dict(lm_head=[[1.0]]), TypeError, ["lm_head", "list"]),
    ("bias shape", dict(bias=torch.randn(19)), ValueError, ["bias", "(19,)"]),
    ("temperature", dict(temperature=0.0), ValueError, ["temperature", "0.0"]),
    ("softcap", dict(softcap=-1.0), ValueError, ["softcap", "-1.0"]),
    ("normalizer zero", dict(normalizer=0), ValueError, ["normalizer", "0"]),
    ("normalizer tensor zero", dict(normalizer=torch.tensor(0.0)), ValueError, ["normalizer", "0"]),
    ("normalizer with sum", dict(normalizer=10, reduction="sum"), ValueError, ["normalizer", "'sum'"]),
    (
        "float64 on triton",
        dict(
            hidden=torch.randn(2, 6, 8, dtype=torch.float64),
            lm_head=torch.randn(20, 8, dtype=torch.float64),
            backend="triton",
        ),
        TypeError,
        ["float64", "reference"],
    ),
]


@pytest.mark.parametrize("desc,change,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_before_any_kernel(desc, change, exc, words, no_kernel):
    hidden, weight, targets, adv = _inputs()
    args = dict(hidden=hidden, lm_head=weight, targets=targets, adv=adv)
    kwargs = {}
    for k, v in change.items():
        (args if k in args else kwargs)[k] = v
    with pytest.raises(exc) as info:
        gft_kernels.gft_loss(args["hidden"], args["lm_head"], args["targets"], args["adv"], **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch, no_kernel):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight, targets, adv = _inputs()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        gft_kernels.gft_loss(hidden, weight, targets, adv, backend="triton")


def test_linear_with_bias_and_explicit_bias_is_ambiguous():
    hidden, _, targets, adv = _inputs()
    with pytest.raises(ValueError, match="own bias"):
        gft_kernels.gft_loss(hidden, nn.Linear(8, 20), targets, adv, bias=torch.zeros(20))


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="reduction"):
        gft_kernels.GFTLoss(reduction="avg")
    with pytest.raises(ValueError, match="tau"):
        gft_kernels.GFTLoss(tau=-1)


def test_value_checks_can_be_turned_off():
    """check_values=False skips the host-syncing checks (the shape checks stay)."""
    hidden, weight, targets, adv = _inputs()
    targets[0, 0] = -100
    loss = gft_kernels.gft_loss(hidden, weight, targets, adv, check_values=False)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_inputs_are_not_modified(backend):
    from helpers import DEVICE

    hidden, weight, targets, adv = (x.to(DEVICE) for x in _inputs())
    bias = torch.randn(20, device=DEVICE)
    targets[0, :2] = -100
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    t_in, a_in = targets.clone(), adv.clone()
    loss = gft_kernels.gft_loss(leaves[0], leaves[1], t_in, a_in, bias=leaves[2], backend=backend)
    loss.backward()
    for x, orig in zip(leaves + [t_in, a_in], [hidden, weight, bias, targets, adv]):
        assert torch.equal(x.detach(), orig)


def test_module_matches_function_and_takes_linear():
    hidden, _, targets, adv = _inputs()
    head = nn.Linear(8, 20)
    mod = gft_kernels.GFTLoss(0.5, reduction="sum", backend="torch")
    expected = gft_kernels.gft_loss(
        hidden, head.weight, targets, adv, 0.5, bias=head.bias, reduction="sum", backend="torch"
    )
    torch.testing.assert_close(mod(hidden, head, targets, adv), expected)
    assert "tau=0.5" in repr(mod)


def test_adv_per_sequence_per_token_and_scalar_agree():
    hidden, weight, targets, _ = _inputs()
    per_seq = torch.tensor([0.5, -2.0])
    per_tok = per_seq[:, None].expand(2, 6)
    a = gft_kernels.gft_loss(hidden, weight, targets, per_seq, backend="torch")
    b = gft_kernels.gft_loss(hidden, weight, targets, per_tok, backend="torch")
    torch.testing.assert_close(a, b)
    c = gft_kernels.gft_loss(hidden, weight, targets, 0.5, backend="torch")
    d = gft_kernels.gft_loss(hidden, weight, targets, torch.full((2,), 0.5), backend="torch")
    torch.testing.assert_close(c, d)


def test_normalizer_replaces_the_local_count():
    hidden, weight, targets, adv = _inputs()
    s = gft_kernels.gft_loss(hidden, weight, targets, adv, reduction="sum", backend="torch")
    m = gft_kernels.gft_loss(hidden, weight, targets, adv, normalizer=37, backend="torch")
    mt = gft_kernels.gft_loss(hidden, weight, targets, adv, normalizer=torch.tensor(37), backend="torch")
    torch.testing.assert_close(m, s / 37)
    torch.testing.assert_close(mt, s / 37)


class _FakeCudaTensor:
    """Stands in for a CUDA tensor in check_backend (no GPU here)."""

    is_cuda = True
    dtype = torch.bfloat16
    device = torch.device("cuda", 0)


@pytest.mark.parametrize(
    "capability,shared,expect",
    [
        ((9, 0), 227 * 1024, "triton"),  # H100 / H200
        ((8, 0), 163 * 1024, "triton"),  # A100
        ((8, 9), 99 * 1024, "torch"),  # a consumer card: too little shared memory
        ((7, 0), 96 * 1024, "torch"),  # V100: no bf16 tensor cores
    ],
)
def test_auto_takes_triton_only_on_hardware_it_is_checked_for(capability, shared, expect, monkeypatch):
    from gft_kernels import validation

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device=None: type("P", (), {"shared_memory_per_block_optin": shared})(),
    )
    monkeypatch.setattr(validation, "_auto_warned", set())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert validation.check_backend("auto", _FakeCudaTensor()) == expect
        assert validation.check_backend("auto", _FakeCudaTensor()) == expect
    says_why = [w for w in seen if "uses the chunked torch engine" in str(w.message)]
    assert len(says_why) == (1 if expect == "torch" else 0)  # once, naming the reason
    if says_why:
        assert "capability" in str(says_why[0].message) or "shared memory" in str(says_why[0].message)


def test_auto_refuses_triton_when_the_shared_memory_is_not_reported(monkeypatch):
    """A torch whose device properties lack ``shared_memory_per_block_optin`` tells nothing about
    the tiles fitting: that is a reason not to take Triton, not a pass."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: type("P", (), {})())
    reason = launch.ENGINE.unsuitable_hardware(torch.device("cuda", 0))
    assert reason is not None and "shared memory" in reason


def test_the_minimum_triton_version_is_the_packages_requirement():
    import re
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    required = re.findall(r'"triton>=(\d+)\.(\d+)', pyproject)
    assert required and {tuple(map(int, r)) for r in required} == {launch.MIN_VERSION}
