"""The engines' launches as ``torch.library`` custom ops, and their autograd.

``gft_kernels::row_stats`` (forward: an engine's partial statistics, merged into per-row
``RowStats``) and ``gft_kernels::row_grads`` (backward: dhidden / dlm_head / dbias from the
per-row upstream gradients) are opaque to ``torch.compile``: their ``register_fake`` gives the
output shapes, so dynamo traces a model with the loss inside as one graph (no graph break)
and the engines' chunk loops and kernel launches run as they do eagerly. The contract the
engines implement is ``engine.py``.

Two paths stay eager (``torch.compiler.disable``): a vocabulary-parallel call (its collectives
take a process group, which an op's schema cannot carry) and the chunked engine's one-pass
loss (its head is a Python callable); under ``torch.compile`` the latter takes the ops.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor

from .engine import BackwardRequest, ForwardRequest, KernelOptions, Needs, RowStats, get_engine, rows_from_partials


def _spec(engine: str, options: KernelOptions) -> str:
    """The engine and its options as an op's text argument (a schema carries no Python objects);
    dynamo traces this (the options are written field by field) and keys the graph on it."""
    return f"{engine}|{options.key()}"


def _unspec(spec: str):
    name, key = spec.split("|", 1)
    engine = get_engine(name)
    return engine, _options(key, engine.launch_options)


@functools.lru_cache(maxsize=256)
def _options(key: str, launch_type) -> KernelOptions:
    return KernelOptions.from_key(key, launch_type)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("gft_kernels::row_stats", mutates_args=())
def _row_stats(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, valid: Tensor, spec: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    engine, options = _unspec(spec)
    # the products in the inputs' dtype, whatever autocast region the op is called from
    with torch.autocast(hidden.device.type, enabled=False):
        part = engine.partials(ForwardRequest(hidden, weight, bias, targets, valid), options)
        return tuple(rows_from_partials(part, valid))


@_row_stats.register_fake
def _(hidden, weight, bias, targets, valid, spec):
    n, acc = hidden.shape[0], _acc_dtype(hidden.dtype)
    return (*(hidden.new_empty(n, dtype=acc) for _ in range(5)), hidden.new_empty(n, dtype=torch.bool))


@torch.library.custom_op("gft_kernels::row_grads", mutates_args=())
def _row_grads(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    rows: list[Tensor],
    g: Tensor,
    g_entropy: Tensor | None,
    need: list[bool],
    spec: str,
) -> tuple[Tensor, Tensor, Tensor]:
    engine, options = _unspec(spec)
    m, log_s, q, entropy = rows
    stats = RowStats(m, m, log_s, q, entropy, m)  # logp and target_is_max are not read
    request = BackwardRequest(ForwardRequest(hidden, weight, bias, targets, None), stats, g, g_entropy, Needs(*need))
    # custom_bwd's treatment: the forward ran with autocast off, so does the backward
    with torch.autocast(hidden.device.type, enabled=False):
        grads = engine.backward(request, options)
    return tuple(x if x is not None else hidden.new_empty(0) for x in grads)


@_row_grads.register_fake
def _(hidden, weight, bias, targets, rows, g, g_entropy, need, spec):
    like = (hidden, weight, bias)
    return tuple(torch.empty_like(x) if n else hidden.new_empty(0) for x, n in zip(like, need))


def _setup_row_stats(ctx, inputs, output):
    hidden, weight, bias, targets, _, spec = inputs
    _, m, log_s, q, entropy, _ = output
    ctx.save_for_backward(hidden, weight, bias, targets, m, log_s, q, entropy)
    ctx.spec = spec


def _row_stats_backward(ctx, dlogp, _dm, _dlog_s, _dq, dentropy, _dmax):
    hidden, weight, bias, targets, m, log_s, q, entropy = ctx.saved_tensors
    _, options = _unspec(ctx.spec)
    need = [
        bool(ctx.needs_input_grad[0]),
        bool(ctx.needs_input_grad[1]),
        bool(ctx.needs_input_grad[2]) and bias is not None,
    ]
    # an op's unused outputs get zero gradients: dL/dentropy is read only when the loss has an
    # entropy term (stats are detached)
    g_entropy = dentropy.to(q.dtype) if options.entropy_grad else None
    dh, dw, db = _row_grads(
        hidden, weight, bias, targets, [m, log_s, q, entropy], dlogp.to(q.dtype), g_entropy, need, ctx.spec
    )
    return (
        dh if need[0] else None,  # hidden
        dw if need[1] else None,  # weight
        db if need[2] else None,  # bias
        None,
        None,
        None,
    )  # targets, valid, spec


torch.library.register_autograd("gft_kernels::row_stats", _row_stats_backward, setup_context=_setup_row_stats)


def fused_logprobs(engine: str, request: ForwardRequest, options: KernelOptions, group=None) -> RowStats:
    """Per-row (logp, entropy, target_is_max, ...) of an engine, differentiable through the engine's
    backward (logp, and entropy when the loss has an entropy term)."""
    if group is not None:
        return _vocab_parallel(engine, request, options, group)
    hidden, weight, bias, targets, valid = request
    return RowStats(*_row_stats(hidden, weight, bias, targets, valid, _spec(engine, options)))


@torch.compiler.disable
def _vocab_parallel(engine, request, options, group):
    """``VocabParallelLogProb`` applied eagerly: its collectives take a process group."""
    hidden, weight, bias, targets, valid = request
    return RowStats(*VocabParallelLogProb.apply(engine, hidden, weight, bias, targets, valid, options, group))


class VocabParallelLogProb(torch.autograd.Function):
    """RowStats of a vocabulary-sharded lm_head: ``weight``/``bias`` are this rank's rows and
    ``targets`` are local (-1 where another rank owns the target). The forward merges the ranks'
    partial statistics (two all-reduces of O(N) floats), the backward forms this shard's dW/db
    and all-reduces dH, the sum of every shard's contribution."""

    @staticmethod
    def forward(ctx, engine, hidden, weight, bias, targets, valid, options, group):
        ctx.engine, ctx.options, ctx.group = get_engine(engine), options, group
        part = ctx.engine.partials(ForwardRequest(hidden, weight, bias, targets, valid), options)
        rows = rows_from_partials(part, valid, group)
        ctx.save_for_backward(hidden, weight, bias, targets, *rows)
        ctx.set_materialize_grads(False)  # an unused entropy gets None: no entropy term
        ctx.mark_non_differentiable(*rows[1:4], rows.target_is_max)
        if not options.entropy_grad:
            ctx.mark_non_differentiable(rows.entropy)
        return tuple(rows)

    @staticmethod
    def backward(ctx, dlogp, _dm, _dlog_s, _dq, dentropy, _dmax):
        hidden, weight, bias, targets, *rows = ctx.saved_tensors
        rows = RowStats(*rows)
        need = Needs(*ctx.needs_input_grad[1:3], ctx.needs_input_grad[3] and bias is not None)
        g = torch.zeros_like(rows.q) if dlogp is None else dlogp.to(rows.q.dtype)
        g_entropy = dentropy.to(rows.q.dtype) if dentropy is not None else None
        request = BackwardRequest(ForwardRequest(hidden, weight, bias, targets, None), rows, g, g_entropy, need)
        with torch.autocast(hidden.device.type, enabled=False):
            dh, dw, db = ctx.engine.backward(request, ctx.options)
        if dh is not None:
            dist.all_reduce(dh, group=ctx.group)  # every shard's dz @ W_shard, summed
        return (
            None,  # engine
            dh,
            dw,
            db,  # hidden, weight, bias
            None,
            None,
            None,
            None,
        )  # targets, valid, options, group


class _PrecomputedGrads(torch.autograd.Function):
    """A scalar loss whose gradients were formed in the forward: backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss, grads):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.grads is None:
            raise RuntimeError(
                "the chunked engine formed this loss's gradients in its forward: they can be "
                "taken once (for retain_graph or double backward, use backend='reference')"
            )
        dh, dw, db = ctx.grads
        ctx.grads = None  # scaled in place: no second copy of the gradients

        def scaled(x):
            return None if x is None else x.mul_(grad.to(x.dtype))

        return scaled(dh), scaled(dw), scaled(db), None, None


@torch.compiler.disable
def precomputed_loss(engine: str, request: ForwardRequest, options: KernelOptions, token_loss, token_weight):
    """(loss, RowStats) of ``engine.loss_and_grads``, differentiable to first order (the
    gradients come from the forward; a double backward is not supported on this path)."""
    hidden, weight, bias = request.hidden, request.weight, request.bias
    need = Needs(hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    with torch.no_grad():  # the head inside differentiates itself (enable_grad)
        loss, rows, grads = get_engine(engine).loss_and_grads(request, options, token_loss, token_weight, need)
    return _PrecomputedGrads.apply(hidden, weight, bias, loss, tuple(grads)), rows
