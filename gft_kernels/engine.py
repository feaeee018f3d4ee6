"""The engine contract: what an engine of the fused op implements, in code.

An engine maps (hidden, lm_head, targets) to per-row partial statistics without keeping the
``[N x V]`` logits, and maps the per-row upstream gradient ``g = dL/dlogp`` back to
dhidden / dlm_head / dbias by recomputing the logits. The GFT head (advantage, DCR, reduction)
lives in ``head.py`` and reaches an engine only through ``g``.

**A new engine is one new file**: a class implementing :class:`Engine` (``name``, ``supports``,
``partials``, ``backward``), registered with :func:`register_engine`; then
``gft_loss(..., backend=<its name>)`` runs it through the same autograd function and
``torch.compile`` op as the built-in ones. What else it can do it declares in
``capabilities`` (:class:`Capabilities`: whether ``backend="auto"`` may take it and on which
devices, a one-pass loss, autograd-native rows) and ``suitable`` (the hardware it is checked
on); :func:`select` is the one place that chooses an engine, by those answers, never by name. ``reference.py`` is such a file (its engine is
checked against the others in tests/kernels/test_engines.py); ``torch_backend.py`` (chunked PyTorch)
and ``triton_ops/launch.py`` (fused Triton kernels) are the two bounded-memory ones.

The partial statistics of a row over a set of columns (:class:`RowPartials`) are its max
``m``, ``s_excl`` = the sum over the non-target columns of ``exp(z - m)``, the target logit
``z_t`` (0 when the target is not among the columns) and, for entropy, ``s_all = sum exp(z -
m)`` and ``t = sum exp(z - m) (z - m)``; rows that are not valid hold zeros. An engine may
return S disjoint column sets (the Triton forward's vocabulary splits); ``merge_partials``
merges them, exactly and in O(N) per set, and also the vocabulary shards of the ranks of a
process group (``gft_loss(..., vocab_parallel_group=...)``); ``finish_logprob`` then gives the
per-row :class:`RowStats`. ``KernelOptions.outside``: some targets are -1, a token whose target
lies in another rank's shard; it matches no column (its ``z_t`` is 0 and its backward has no
target column here).

The log-sum-exp is carried in two parts, ``lse = m + log_s`` (``log_s = log sum exp(z - m)``),
and the backward forms ``p = exp((z - m) - log_s)``: one fp32 ``lse`` of a row with logits near
1e4 has an ulp of 1e-3, which would be a 1e-3 relative error in every probability of that row.
``q = 1 - p`` of the target is carried separately, as ``sigmoid(lse_excl - z_t)``: ``1 -
exp(logp)`` cancels catastrophically for confident tokens, which is where the target column of
``onehot - softmax`` is decided; ``logp = -softplus(lse_excl - z_t)`` keeps full relative
precision near 0. For entropy ``H = -sum p log p`` the logits' gradient is ``dH/dz_j = -p_j
(log p_j + H)``.

Gradients come back in the inputs' dtypes. Rows with ``g == 0`` (and ``g_entropy == 0``)
contribute nothing, so an engine may skip them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class KernelOptions:
    """Everything an engine reads besides tensors; one object for the autograd function and the
    engines (built from ``gft_loss``'s typed options, already checked)."""

    temperature: float = 1.0
    softcap: float | None = None
    with_entropy: bool = False  # the forward also gives the rows' entropy
    entropy_grad: bool = False  # the loss has an entropy term: the backward takes dL/dH
    launch: Any = None  # the engine's own launch options (Triton: LaunchOptions); None: defaults
    outside: bool = False  # vocabulary parallel: targets of -1 lie in another rank's shard

    def key(self) -> str:
        """Every field, as text (what a custom op's schema can carry; built from the fields one by
        one, since dynamo does not trace a dataclass's repr)."""
        launch = "" if self.launch is None else self.launch.key()
        return f"{self.temperature}|{self.softcap}|{self.with_entropy}|{self.entropy_grad}|{self.outside}|{launch}"

    @classmethod
    def from_key(cls, key: str, launch_type=None) -> KernelOptions:
        """The options ``key()`` wrote; ``launch_type`` (the engine's) reads the launch options."""
        *values, launch = key.split("|", 5)
        launch = launch_type.from_key(launch) if launch else None
        temperature, softcap, with_entropy, entropy_grad, outside = map(parse_value, values)
        return cls(temperature, softcap, with_entropy, entropy_grad, launch, outside)


def parse_value(text: str):
    """A field written by ``str()``: None, a bool, an int, a float (repr round-trips) or text."""
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class ForwardRequest(NamedTuple):
    hidden: Tensor  # [N, H], rows contiguous
    weight: Tensor  # [V, H]
    bias: Tensor | None  # [V]
    targets: Tensor  # [N] int64 in [0, V) (-1 with KernelOptions.outside)
    valid: Tensor  # [N] bool


class RowPartials(NamedTuple):
    """Per-row partial statistics of S disjoint column sets, each ``[S, N]`` (see the module
    docstring); ``s_all`` and ``t`` are None without entropy."""

    m: Tensor
    s_excl: Tensor
    z_t: Tensor
    s_all: Tensor | None = None
    t: Tensor | None = None


class RowStats(NamedTuple):
    """Per-row results of a forward, all ``[N]``, 0 at rows that were not valid."""

    logp: Tensor  # log-prob of the target, fp32 (fp64 for fp64 inputs)
    m: Tensor  # the row's max logit
    log_s: Tensor  # log sum exp(z - m): lse = m + log_s
    q: Tensor  # 1 - p of the target, without cancellation
    entropy: Tensor  # of the row's distribution; 0 unless asked for
    target_is_max: Tensor  # bool: the target's logit is a maximum of the row (argmax accuracy)


class Needs(NamedTuple):
    dhidden: bool
    dweight: bool
    dbias: bool


class BackwardRequest(NamedTuple):
    """What a backward reads: the forward's inputs, its per-row stats (``m``, ``log_s``, ``q``
    and, with an entropy term, ``entropy``), the upstream per-row gradients and which input
    gradients to form."""

    inputs: ForwardRequest  # its ``valid`` is unused: the active rows are those with g != 0
    rows: RowStats
    g: Tensor  # [N] dL/dlogp, the stats' dtype
    g_entropy: Tensor | None  # [N] dL/dentropy when the loss has an entropy term
    need: Needs


class Grads(NamedTuple):
    dhidden: Tensor | None
    dweight: Tensor | None
    dbias: Tensor | None


class Capabilities(NamedTuple):
    """What an engine can do beyond the contract's three methods (``Engine.capabilities``; an
    engine without the attribute has the defaults: chosen only by name, no extra paths)."""

    auto_rank: int | None = None  # backend="auto" tries engines by this rank, highest first; None: never
    auto_devices: tuple[str, ...] | None = None  # device types "auto" considers it on; None: any
    one_pass: bool = False  # has ``loss_and_grads``: a scalar loss and its gradients in one pass
    autograd_rows: bool = False  # has ``rows(request, options) -> RowStats``, differentiated by autograd
    description: str = ""  # how a message names it ("the chunked torch engine"); "": its name


@runtime_checkable
class Engine(Protocol):
    """The contract every engine implements (see the module docstring).

    Optional members, read by :func:`select` and the op (absent: the defaults):

    - ``capabilities``: a :class:`Capabilities`.
    - ``suitable(hidden, options) -> str | None``: why ``backend="auto"`` should not take this
      engine on this hardware although it could run there (an untested GPU generation, a missing
      package version), or None. A named ``backend`` skips it.
    - ``loss_and_grads(request, options, token_loss, token_weight, need) -> (loss, RowStats,
      Grads)`` with ``capabilities.one_pass``; ``rows(request, options) -> RowStats`` with
      ``capabilities.autograd_rows``.
    """

    name: str
    dtypes: tuple[torch.dtype, ...]  # input dtypes it computes (others: a TypeError before it runs)
    launch_options: type | None  # its launch options' class (with key / from_key), or None

    def supports(self, hidden: Tensor, options: KernelOptions) -> str | None:
        """Why this engine cannot run these inputs here (device, dtype, hardware, package), or None."""

    def partials(self, request: ForwardRequest, options: KernelOptions) -> RowPartials:
        """Per-row partial statistics over this weight's columns, unmerged."""

    def backward(self, request: BackwardRequest, options: KernelOptions) -> Grads:
        """dhidden / dweight / dbias (None where not needed) from the upstream per-row gradients."""


_ENGINES: dict[str, Engine] = {}
# the built-in engines, imported on first use (the Triton one imports triton, which reads
# TRITON_INTERPRET at import)
_BUILT_IN = {
    "torch": "gft_kernels.torch_backend",
    "triton": "gft_kernels.triton_ops.launch",
    "reference": "gft_kernels.reference",
}


def register_engine(engine: Engine) -> Engine:
    """Make ``engine`` available as ``gft_loss(..., backend=engine.name)``."""
    if not isinstance(engine, Engine):
        raise TypeError(f"an engine implements gft_kernels.engine.Engine, got {type(engine).__name__}")
    _ENGINES[engine.name] = engine
    return engine


def get_engine(name: str) -> Engine:
    if name not in _ENGINES and name in _BUILT_IN:
        import importlib

        importlib.import_module(_BUILT_IN[name])  # registers itself
    return _ENGINES[name]


def engine_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*_BUILT_IN, *_ENGINES]))


def capabilities(engine: Engine) -> Capabilities:
    return getattr(engine, "capabilities", None) or Capabilities()


def describe(engine: Engine) -> str:
    return capabilities(engine).description or f"the {engine.name} engine"


# The built-in engines that backend="auto" may take, with their rank and devices, known before
# their module is imported (the Triton one imports triton: not on a machine it would not run on).
_BUILT_IN_AUTO = {"triton": (20, ("cuda",)), "torch": (10, None)}


class Selection(NamedTuple):
    """The engine that runs, and why: ``reason`` says why it was chosen; ``passed_over`` is set
    when ``backend="auto"`` passed over an engine that serves this device and dtype (its reason
    is in ``reason``), which a caller may tell the user once."""

    engine: Engine
    reason: str
    passed_over: str | None = None  # the name a user would pass to force that engine


def _auto_candidates(device_type: str) -> list[tuple[int, str]]:
    ranked = {}
    for name, (rank, devices) in _BUILT_IN_AUTO.items():
        if name not in _ENGINES and (devices is None or device_type in devices):
            ranked[name] = rank
    for name, engine in _ENGINES.items():
        caps = capabilities(engine)
        if caps.auto_rank is not None and (caps.auto_devices is None or device_type in caps.auto_devices):
            ranked[name] = caps.auto_rank
    return sorted(((rank, name) for name, rank in ranked.items()), reverse=True)


def _dtype_reason(engine: Engine, hidden: Tensor) -> str | None:
    if hidden.dtype in engine.dtypes:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in engine.dtypes)
    return f"backend={engine.name!r} supports {names} inputs, got {str(hidden.dtype).replace('torch.', '')}"


def select(backend: str, hidden: Tensor, options: KernelOptions = KernelOptions()) -> Selection:  # noqa: B008 (frozen)
    """The one place an engine is chosen. A named ``backend`` must support the inputs (else a
    TypeError for the dtype, a ValueError for the rest, naming the engine); ``"auto"`` takes the
    highest-ranked engine (``Capabilities.auto_rank``) that considers this device type, computes
    this dtype, supports these inputs and finds the hardware suitable."""
    if backend != "auto":
        try:
            engine = get_engine(backend)
        except ImportError as err:
            raise ValueError(f"backend={backend!r} needs the {err.name} package (pip install 'gft[triton]')") from err
        except KeyError:
            raise ValueError(f"backend must be one of {('auto', *engine_names())}, got {backend!r}") from None
        reason = _dtype_reason(engine, hidden)
        if reason is not None:
            raise TypeError(reason + (" (use backend='reference')" if hidden.dtype == torch.float64 else ""))
        reason = engine.supports(hidden, options)
        if reason is not None:
            raise ValueError(reason)
        return Selection(engine, f"backend={backend!r} was asked for")
    passed_over, why = None, []
    for _, name in _auto_candidates(hidden.device.type):
        try:
            engine = get_engine(name)
        except ImportError as err:
            passed_over = passed_over or name
            why.append(f"the {err.name} package is not installed")
            continue
        if _dtype_reason(engine, hidden) is not None:
            continue  # an engine that does not compute this dtype is not passed over: it never applied
        suitable = getattr(engine, "suitable", None)
        reason = engine.supports(hidden, options) or (suitable(hidden, options) if suitable else None)
        if reason is None:
            dtype = str(hidden.dtype).replace("torch.", "")
            chosen = "; ".join(why) or f"the highest-ranked engine for {hidden.device.type} and {dtype}"
            return Selection(engine, chosen, passed_over)
        passed_over = passed_over or name
        why.append(reason)
    raise ValueError(
        f"backend='auto' found no engine for {hidden.device}, {hidden.dtype}: " + ("; ".join(why) or "none registered")
    )


def forward(engine: Engine, request: ForwardRequest, options: KernelOptions) -> RowStats:
    """An engine's RowStats (its partial statistics, merged): a forward without autograd."""
    return rows_from_partials(engine.partials(request, options), request.valid)


def merge_partials(part: RowPartials, group=None) -> RowPartials:
    """Merge ``S`` column sets onto the rows' common max: a RowPartials of ``[N]`` tensors. With
    a process ``group`` the sets of every rank are merged too: an all-reduce (max) of ``m``,
    then one (sum) of the rescaled sums, so every rank ends with the whole vocabulary's."""
    m = part.m.amax(dim=0)
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shift = part.m - m  # <= 0
    scale = torch.exp(shift)
    merged = [
        (part.s_excl * scale).sum(dim=0),
        part.z_t.sum(dim=0),
    ]  # only the set holding the target adds a nonzero z_t
    if part.s_all is not None:
        merged.append((part.s_all * scale).sum(dim=0))
        merged.append((scale * (part.t + shift * part.s_all)).sum(dim=0))  # t re-centred on m
    if group is not None:
        merged = torch.stack(merged)
        dist.all_reduce(merged, group=group)
        merged = list(merged)
    return RowPartials(m, *merged)


def rows_from_partials(part: RowPartials, valid: Tensor, group=None) -> RowStats:
    """RowStats of the merged partial statistics, 0 at rows not valid."""
    merged = merge_partials(part, group)
    logp, log_s, q, entropy, is_max = finish_logprob(merged)
    zero = torch.zeros_like(logp)
    entropy = zero if entropy is None else entropy
    return RowStats(*(torch.where(valid, x, zero) for x in (logp, merged.m, log_s, q, entropy)), is_max & valid)


def finish_logprob(merged: RowPartials):
    """Per-row results from one row's merged statistics (all ``[N]``, fp32 or fp64).

    Returns (logp, log_s, q = 1 - p, entropy or None, target_is_max); lse = m + log_s. With
    V = 1, s_excl = 0 and p = 1 exactly.
    """
    m, s_excl, z_t, s_all, t = merged
    d = s_excl.log() + m - z_t  # lse_excl - z_t
    logp = -F.softplus(d)
    q = torch.sigmoid(d)
    log_s = torch.log(s_excl + torch.exp(z_t - m))  # >= 0: the max column adds exp(0) = 1
    entropy = None
    if t is not None:
        entropy = s_all.log() - t / s_all
    return logp, log_s, q, entropy, z_t >= m
