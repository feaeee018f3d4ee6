"""The public op: ``gft_loss`` and the ``GFTLoss`` module.

``gft_loss`` is a keyword facade: it builds the typed options (``options.py``, each group checked
once, where it is built) and hands them to ``_loss``, which checks the tensors, picks the engine
(``engine.py``), runs it through the custom ops (``fused.py``) and applies the head (``head.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import reference, torch_backend  # noqa: F401  (the CPU engines register themselves)
from .engine import Engine, ForwardRequest, KernelOptions, RowStats, capabilities
from .fused import fused_logprobs, precomputed_loss
from .head import GFTStats, PolicyTerms, head_stats, per_token_loss, reduce_loss, reduction_weights
from .options import IGNORE_INDEX, GFTOptions, LogitOptions, LossOptions, PolicyOptions, RunOptions, check_normalizer
from .validation import (
    check_input_values,
    check_layout,
    check_policy_tensors,
    check_tensors,
    choose_engine,
    layout_value_checks,
    split_lm_head,
)


def gft_loss(
    hidden: Tensor,
    lm_head: Tensor | nn.Linear,
    targets: Tensor,
    adv: Tensor | float,
    tau: float = 0.7,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    old_logp: Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    kl: str = "k3",
    entropy_coef: float = 0.0,
    backend: str = "auto",
    launch_options=None,
    return_stats: bool = False,
    check_values: bool = True,
    vocab_parallel_group=None,
    vocab_start: int | None = None,
    seq_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor | tuple[Tensor, GFTStats]:
    """Group Fine-Tuning loss from hidden states, without materializing the ``[N x V]`` logits.

    Args:
        hidden [..., H]: final hidden states, aligned with ``targets`` (no shift inside).
        lm_head [V, H]: output projection weight, or an ``nn.Linear`` (its bias is used).
        targets [...]: int64 next-token ids; ``ignore_index`` marks tokens that do not count.
        adv: advantage, broadcastable to ``targets``: a scalar, ``[B]`` (one per sequence of a
            ``[B, T, H]`` input; this reading wins when ``B == T``), or per token.
        tau: DCR threshold (paper: best near 0.7). 0 gives SFT / policy gradient, > 1 gives DFT.
        reduction: ``"mean"`` over valid tokens (0 when none), ``"sum"``, ``"none"`` (shape of
            ``targets``, 0 at ignored tokens), ``"seq-mean-token-mean"`` (each sequence's mean
            over its valid tokens, then the mean over sequences with a valid token),
            ``"seq-mean-token-sum"`` (each sequence's sum, then that mean); sequences are the
            leading dim of ``targets``. Dr. GRPO's constant normalizer is ``"mean"`` with
            ``normalizer`` = that constant.
        normalizer: explicit denominator for ``"mean"`` (e.g. the global token count over gradient
            accumulation steps and processes) or for the ``"seq-"`` reductions (the global
            number of sequences), a number or a one-element tensor.
        seq_ids, cu_seqlens: a packed (varlen) layout, several sequences in a row; pass one.
            ``seq_ids`` (int, ``[N]`` or targets' shape): each token's sequence, in ``[0, S)``.
            ``cu_seqlens`` (int32 or int64 ``[S + 1]``, as flash-attention names it): the
            sequences' cumulative lengths over the flat tokens, ``0 = c_0 <= ... <= c_S = N``.
            The ``"seq-"`` reductions then count each of these sequences (inside the op, on
            every engine and path), not the leading dim. ``adv`` may then be one per sequence,
            ``[S]`` (a token takes its sequence's, ``adv[seq_t]``; S != N: a 1-D ``adv`` of N
            entries is per token), a scalar, or per token. Shapes and dtypes are always
            checked; the values (in range, non-decreasing, ``c_S = N``) with ``check_values``.
        bias [V], temperature, softcap: logits are ``softcap * tanh(((h W^T + b) / T) / softcap)``.
        old_logp: behaviour policy's per-token log-probs (broadcast like ``adv``): the importance
            ratio ``r = exp(logp - old_logp)`` with PPO clipping to ``[1 - clip_low, 1 + clip_high]``
            (``clip_high`` defaults to ``clip_low``; DAPO's "clip higher" sets it larger) and,
            with ``dual_clip = c > 1``, the dual clip ``-c A`` for ``A < 0``.
        ref_logp: reference model's per-token log-probs: a KL penalty ``beta * KL_t``, estimator
            ``kl`` in ``"k1"`` (``logp - ref``), ``"k2"`` (``(logp - ref)^2 / 2``), ``"k3"``
            (``exp(ref - logp) - (ref - logp) - 1``).
        entropy_coef: entropy bonus, ``- entropy_coef * H_t``; its gradient flows through the
            fused backward.
        backend: ``"triton"`` (fused kernels), ``"torch"`` (chunked PyTorch, bounded memory),
            ``"reference"`` (materialized logits; float64-capable), ``"auto"`` (triton on CUDA,
            torch otherwise), or the name of an engine registered with
            ``gft_kernels.engine.register_engine`` (docs/architecture.md).
        launch_options: the Triton engine's ``gft_kernels.triton_ops.LaunchOptions`` (e.g.
            ``LaunchOptions(backward_design="atomic")``: the tightest memory); None: defaults.
        return_stats: also return a :class:`GFTStats` (per-token log-probs and entropy, DCR
            rectified fraction, mean target probability, accuracy, ratio, clip fraction, KL)
            from the same pass.
        check_values: check target ids, advantages and log-probs by value (one host sync on CUDA).
        vocab_parallel_group: a ``torch.distributed`` process group over which the lm_head is
            split by vocabulary rows (tensor / vocabulary parallelism): ``lm_head`` (and ``bias``)
            are this rank's rows ``[vocab_start, vocab_start + V_local)`` of the full ``[V, H]``
            head; every other input (hidden, targets as *global* ids, adv, log-probs) and every
            option is the same on every rank of the group. The loss, the stats and ``dhidden``
            are those of the unsharded op on every rank; the lm_head's (and bias's) gradient is
            this shard's rows. The weight is never gathered: the forward all-reduces O(N)
            per-token statistics, the backward all-reduces ``dhidden`` ``[N, H]``. Engines
            ``"torch"`` and ``"triton"``. Every rank must call the op (collectives inside).
        vocab_start: the first global vocabulary row of this rank's shard; None derives it from
            the shards' sizes in group-rank order (rank 0 holds the first rows) with one small
            all-gather, which also checks that the shards tile ``[0, V)``.

    Under ``torch.autocast`` the product's inputs are cast to the autocast dtype, as
    ``nn.Linear`` would (float64 excepted); gradients come back in the inputs' own dtypes, and
    a backward run inside or outside an autocast region gives the same gradients.

    Returns:
        The loss, fp32 (fp64 for fp64 inputs); ``(loss, stats)`` when ``return_stats``.

    Per valid token (``C`` the DCR coefficient, detached)::

        pg_t   = -A logp                                               without old_logp
               = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))    with it; dual clip: for A < 0,
                                                                       min(that, -dual_clip * A)
        loss_t = C * pg_t + beta * KL_t - entropy_coef * H_t

    At ``old_logp = logp.detach()`` (r = 1) the gradient is the on-policy one, ``-A C grad logp``.

    Exact PyTorch equivalent of the default (what ``backend="reference"`` computes)::

        z    = F.linear(hidden, W, bias).float() / temperature          # [..., V]
        z    = softcap * torch.tanh(z / softcap)                        # if softcap
        logp = z.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        p    = logp.detach().exp()
        C    = torch.where(p < tau, p, 1.0)                             # DCR, Eq. 5
        valid = targets != ignore_index
        loss_t = torch.where(valid, -adv * C * logp, 0.0)
        loss = loss_t.sum() / valid.sum().clamp_min(1)                  # reduction="mean"
    """
    options = GFTOptions(
        LossOptions.build(tau, reduction, normalizer, ignore_index),
        PolicyOptions.build(clip_low, clip_high, dual_clip, beta, kl, entropy_coef),
        LogitOptions.build(temperature, softcap),
        RunOptions.build(backend, launch_options, vocab_parallel_group, vocab_start, return_stats, check_values),
    )
    weight, bias = split_lm_head(lm_head, bias)
    return _loss(hidden, weight, bias, targets, adv, options, old_logp, ref_logp, PerCall(None, seq_ids, cu_seqlens))


class PerCall(NamedTuple):
    """What a call adds to options built once: a normalizer (None: the options') and a packed layout."""

    normalizer: float | Tensor | None = None
    seq_ids: Tensor | None = None
    cu_seqlens: Tensor | None = None


def gft_loss_with_options(
    hidden: Tensor,
    lm_head: Tensor | nn.Linear,
    targets: Tensor,
    adv: Tensor | float,
    options: GFTOptions,
    *,
    bias: Tensor | None = None,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    seq_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
):
    """:func:`gft_loss` on options built once (``GFTLoss.options``, or ``GFTOptions`` of the typed
    groups): what a caller that holds the options (the model adapter) calls with each batch.
    ``normalizer``, when given, replaces the options' for this call."""
    if not isinstance(options, GFTOptions):
        raise TypeError(f"options must be a gft_kernels.options.GFTOptions, got {type(options).__name__}")
    weight, bias = split_lm_head(lm_head, bias)
    per_call = PerCall(normalizer, seq_ids, cu_seqlens)
    return _loss(hidden, weight, bias, targets, adv, options, old_logp, ref_logp, per_call)


def _autocast_cast(x, dtype):
    if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != torch.float64:
        return x.to(dtype)
    return x


def _autocast_like_linear(fn):
    """What ``nn.Linear`` does under autocast: the product's inputs (hidden, weight, bias) in the
    autocast dtype (float64 is left alone), through differentiable casts, so the gradients come
    back in the parameters' own dtypes; the rest runs with autocast off (as
    ``custom_fwd(cast_inputs=...)`` would; the ops' backward turns it off too)."""

    @functools.wraps(fn)
    def wrapper(hidden, weight, bias, *args):
        if not (isinstance(hidden, Tensor) and torch.is_autocast_enabled(hidden.device.type)):
            return fn(hidden, weight, bias, *args)
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight, bias = (_autocast_cast(x, dtype) for x in (hidden, weight, bias))
        with torch.autocast(hidden.device.type, enabled=False):
            return fn(hidden, weight, bias, *args)

    return wrapper


class _Flat(NamedTuple):
    """One call's tensors, flat ``[N]`` rows (``hidden`` ``[N, H]``), and the targets' shape."""

    request: ForwardRequest  # the engine's view: targets are safe ids (local ids when vocab-parallel)
    targets: Tensor  # the original ids
    adv: Tensor
    shape: torch.Size


def _flatten(hidden, weight, bias, targets, adv, ignore_index, vocab_start) -> _Flat:
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden2d.numel() and hidden2d.stride(-1) != 1:
        hidden2d = hidden2d.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    flat_targets = targets.reshape(-1)
    valid = flat_targets != ignore_index
    engine_targets = torch.where(valid, flat_targets, torch.zeros_like(flat_targets))
    if vocab_start is not None:
        # local column of the target where this rank owns it, else -1 (matches no column)
        local = flat_targets - vocab_start
        owned = valid & (local >= 0) & (local < weight.shape[0])
        engine_targets = torch.where(owned, local, torch.full_like(local, -1))
    request = ForwardRequest(hidden2d, weight, bias, engine_targets, valid)
    return _Flat(request, flat_targets, adv.reshape(-1), targets.shape)


@_autocast_like_linear
def _loss(hidden, weight, bias, targets, adv, options: GFTOptions, old_logp=None, ref_logp=None, per_call=None):
    """The op on checked options: tensor checks, then the engine, then the head."""
    loss_options, run = options.loss, options.run
    reduction = loss_options.reduction
    normalizer, seq_ids, cu_seqlens = per_call or PerCall()
    normalizer = loss_options.normalizer if normalizer is None else check_normalizer(normalizer, reduction)
    if isinstance(targets, Tensor):
        sequences, adv = check_layout(targets, adv, seq_ids, cu_seqlens)
    else:
        sequences = None  # check_tensors names the wrong type
    targets, adv = check_tensors(hidden, weight, bias, targets, adv)
    per_token = check_policy_tensors(targets, reduction, old_logp, ref_logp, packed=sequences is not None)
    terms = options.policy.bind(
        *(per_token[k].reshape(-1) if k in per_token else None for k in ("old_logp", "ref_logp"))
    )
    engine = choose_engine(run.backend, hidden, options.kernel())
    vocab_start, vocab_size = None, weight.shape[0]
    if run.vocab_parallel_group is not None:
        vocab_start, vocab_size = vocab_shard(run.vocab_parallel_group, weight.shape[0], run.vocab_start, hidden.device)
    if run.check_values:
        layout = () if sequences is None else layout_value_checks(sequences, seq_ids, cu_seqlens)
        check_input_values(targets, adv, normalizer, vocab_size, loss_options.ignore_index, per_token, layout)
    flat = _flatten(hidden, weight, bias, targets, adv, loss_options.ignore_index, vocab_start)
    valid, tau = flat.request.valid, loss_options.tau
    aux = None
    if _one_pass(engine, flat, options):
        loss, rows = _one_pass_loss(engine, flat, terms, options, normalizer, sequences)
    else:
        rows = _rows(engine, flat, options.kernel(engine), run.vocab_parallel_group)
        loss_tok, aux = per_token_loss(rows.logp, rows.entropy, valid, flat.adv, tau, terms)
        loss = reduce_loss(loss_tok, valid, reduction, normalizer, flat.shape, sequences)
    if not run.return_stats:
        return loss
    if aux is None:  # the one-pass path differentiated the head inside: its per-token values again
        _, aux = per_token_loss(rows.logp, rows.entropy, valid, flat.adv, tau, terms)
    return loss, head_stats(rows.logp, rows.entropy, rows.target_is_max, valid, tau, aux, flat.shape)


def _one_pass(engine: Engine, flat: _Flat, options: GFTOptions) -> bool:
    """A scalar loss that will be differentiated, on an engine that can form the gradients in
    the same pass (3 products, no recompute; the backward only scales them). Eager only: under
    torch.compile the ops run (the head here is a Python callable)."""
    hidden, weight, bias = flat.request.hidden, flat.request.weight, flat.request.bias
    return (
        capabilities(engine).one_pass
        and options.run.vocab_parallel_group is None
        and options.loss.reduction != "none"
        and hidden.shape[0] > 0
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    )


def _one_pass_loss(engine: Engine, flat: _Flat, terms: PolicyTerms, options: GFTOptions, normalizer, sequences):
    valid, tau = flat.request.valid, options.loss.tau

    def token_loss(lp, ent, idx):
        sliced = dataclasses.replace(
            terms,
            old_logp=None if terms.old_logp is None else terms.old_logp.index_select(0, idx),
            ref_logp=None if terms.ref_logp is None else terms.ref_logp.index_select(0, idx),
        )
        return per_token_loss(lp, ent, valid.index_select(0, idx), flat.adv.index_select(0, idx), tau, sliced)[0]

    acc = torch.float64 if flat.request.hidden.dtype == torch.float64 else torch.float32
    weights = reduction_weights(valid, options.loss.reduction, normalizer, flat.shape, acc, sequences)
    return precomputed_loss(engine.name, flat.request, options.kernel(engine), token_loss, weights)


def _rows(engine: Engine, flat: _Flat, kernel: KernelOptions, group=None) -> RowStats:
    """Per-row (logp, entropy, target_is_max, ...) of the engine; logp (and entropy with an
    entropy term) differentiable."""
    hidden, weight, bias, targets, valid = flat.request
    if capabilities(engine).autograd_rows:
        return engine.rows(flat.request, kernel)
    if hidden.shape[0] == 0:
        # No tokens: keep the graph so backward gives zero gradients of the right shapes.
        logp = (hidden.sum() * 0 + weight.sum() * 0).float().reshape(1)[:0]
        return RowStats(logp, None, None, None, logp * 0, valid)
    return fused_logprobs(engine.name, flat.request, kernel, group)


def vocab_shard(group, rows: int, start: int | None, device) -> tuple[int, int]:
    """(first global row of this rank's shard, full vocabulary size V) of an lm_head split by
    vocabulary over ``group``, where this rank holds ``rows`` rows starting at ``start`` (None:
    after the shards of the lower group ranks). One all-gather of two integers per rank; checks
    that the shards tile ``[0, V)`` without gaps or overlaps."""
    import torch.distributed as dist

    on = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = torch.tensor([-1 if start is None else start, rows], dtype=torch.int64, device=on)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    every = torch.stack(every).tolist()
    given = [s for s, _ in every if s >= 0]
    if 0 < len(given) < len(every):
        raise ValueError("vocab_start must be given on every rank of vocab_parallel_group or on none")
    if not given:
        starts, acc = [], 0
        for _, n in every:
            starts.append(acc)
            acc += n
        every = [[s0, n] for s0, (_, n) in zip(starts, every)]
    vocab = sum(n for _, n in every)
    ends = sorted((s0, s0 + n) for s0, n in every)
    if ends[0][0] != 0 or any(a[1] != b[0] for a, b in zip(ends, ends[1:])):
        raise ValueError(
            f"the lm_head shards of vocab_parallel_group must tile [0, V) without gaps or overlaps; "
            f"got rows [start, end) = {ends}"
        )
    return every[dist.get_rank(group)][0], vocab


class GFTLoss(nn.Module):
    """``nn.Module`` form of :func:`gft_loss`; the same options in the same order.

    ``forward(hidden, lm_head, targets, adv, old_logp=None, ref_logp=None, *, normalizer=None,
    seq_ids=None, cu_seqlens=None)`` calls ``gft_loss`` with the options given here and, given
    there, the per-batch log-probs, a normalizer for this batch (None: the one given here) and
    the packed layout.
    """

    def __init__(
        self,
        tau: float = 0.7,
        *,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        normalizer: float | Tensor | None = None,
        bias: Tensor | None = None,
        temperature: float = 1.0,
        softcap: float | None = None,
        clip_low: float = 0.2,
        clip_high: float | None = None,
        dual_clip: float | None = None,
        beta: float = 0.0,
        kl: str = "k3",
        entropy_coef: float = 0.0,
        backend: str = "auto",
        launch_options=None,
        return_stats: bool = False,
        check_values: bool = True,
        vocab_parallel_group=None,
        vocab_start: int | None = None,
    ):
        super().__init__()
        # Built (and checked) once, at construction: not at the first step, not on every call.
        self.options = GFTOptions(
            LossOptions.build(tau, reduction, normalizer, ignore_index),
            PolicyOptions.build(clip_low, clip_high, dual_clip, beta, kl, entropy_coef),
            LogitOptions.build(temperature, softcap),
            RunOptions.build(backend, launch_options, vocab_parallel_group, vocab_start, return_stats, check_values),
        )
        # a parameter stays one (trained with the module); a tensor is a buffer: .to() moves it and
        # it is in the state_dict
        if isinstance(bias, nn.Parameter):
            self.bias = bias
        else:
            self.register_buffer("bias", bias)

    @property
    def tau(self) -> float:
        return self.options.loss.tau

    @tau.setter
    def tau(self, tau) -> None:  # a schedule may move tau: checked like the rest
        loss = self.options.loss
        loss = LossOptions.build(tau, loss.reduction, loss.normalizer, loss.ignore_index)
        self.options = dataclasses.replace(self.options, loss=loss)

    def forward(
        self,
        hidden,
        lm_head,
        targets,
        adv,
        old_logp=None,
        ref_logp=None,
        *,
        normalizer=None,
        seq_ids=None,
        cu_seqlens=None,
    ):
        weight, bias = split_lm_head(lm_head, self.bias)
        per_call = PerCall(normalizer, seq_ids, cu_seqlens)
        return _loss(hidden, weight, bias, targets, adv, self.options, old_logp, ref_logp, per_call)

    def extra_repr(self) -> str:
        groups = (self.options.loss, self.options.policy, self.options.logits, self.options.run)
        return ", ".join(f"{f.name}={getattr(g, f.name)!r}" for g in groups for f in dataclasses.fields(g))


class TokenLogprobs(NamedTuple):
    """``logprobs``' result, in the targets' shape, fp32 (fp64 for fp64 inputs), 0 at ignored
    tokens: the target's log-prob and, with ``return_entropy``, the entropy of its distribution."""

    logp: Tensor
    entropy: Tensor | None


def logprobs(
    hidden: Tensor,
    lm_head: Tensor | nn.Linear,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
    ignore_index: int = IGNORE_INDEX,
    check_values: bool = True,
    vocab_parallel_group=None,
    vocab_start: int | None = None,
) -> TokenLogprobs:
    """Per-token log-probs (and entropies) from hidden states, without the ``[N x V]`` logits:
    what an RL trainer needs for old-policy and reference log-probs and for a KL estimate.

    Arguments as :func:`gft_loss`'s (``hidden [..., H]``, ``lm_head [V, H]`` or an ``nn.Linear``,
    ``targets [...]``, the logits transform, the engines, ``vocab_parallel_group``). Both
    outputs are differentiable; the backward recomputes the logits chunk by chunk, and takes
    the upstream gradients as the engines' per-row ``g = dL/dlogp`` (``dlogp/dz = onehot -
    softmax``) and ``dL/dH`` (``dH/dz = -p (log p + H)``). Returns a :class:`TokenLogprobs`
    (``entropy`` None unless ``return_entropy``).

    Exact PyTorch equivalent (what ``backend="reference"`` computes)::

        z       = F.linear(hidden, W, bias).float() / temperature        # [..., V]
        z       = softcap * torch.tanh(z / softcap)                      # if softcap
        lp      = z.log_softmax(-1)
        valid   = targets != ignore_index
        logp    = torch.where(valid, lp.gather(-1, targets.clamp_min(0)[..., None])[..., 0], 0.0)
        entropy = torch.where(valid, -(lp.exp() * lp).sum(-1), 0.0)
    """
    logits = LogitOptions.build(temperature, softcap)
    ignore_index = LossOptions.build(0.0, "none", None, ignore_index).ignore_index
    run = RunOptions.build(backend, None, vocab_parallel_group, vocab_start, bool(return_entropy), check_values)
    kernel = KernelOptions(
        temperature=logits.temperature,
        softcap=logits.softcap,
        with_entropy=run.return_stats,
        entropy_grad=run.return_stats,
        outside=run.vocab_parallel_group is not None,
    )
    weight, bias = split_lm_head(lm_head, bias)
    return _logprobs(hidden, weight, bias, targets, kernel, ignore_index, run)


@_autocast_like_linear
def _logprobs(hidden, weight, bias, targets, kernel: KernelOptions, ignore_index: int, run: RunOptions):
    targets, zero = check_tensors(hidden, weight, bias, targets, 0.0)
    engine = choose_engine(run.backend, hidden, kernel, op="logprobs")
    vocab_start, vocab_size = None, weight.shape[0]
    if run.vocab_parallel_group is not None:
        vocab_start, vocab_size = vocab_shard(run.vocab_parallel_group, weight.shape[0], run.vocab_start, hidden.device)
    if run.check_values:
        check_input_values(targets, zero, None, vocab_size, ignore_index)
    flat = _flatten(hidden, weight, bias, targets, zero, ignore_index, vocab_start)
    rows = _rows(engine, flat, kernel, run.vocab_parallel_group)
    valid = flat.request.valid

    def masked(x):  # an upstream gradient at an ignored token reaches no engine row
        return torch.where(valid, x, torch.zeros_like(x)).reshape(flat.shape)

    return TokenLogprobs(masked(rows.logp), masked(rows.entropy) if kernel.with_entropy else None)
