"""The readable specification: materialized logits, autograd, float64-capable.

This is the ``[N x V]`` computation the fused backends exist to avoid; it is the ground truth
they are tested against (run in float64) and ``backend="reference"`` of the public API.

In half precision it is also "naive PyTorch" as a careful user writes it: the logits product
in the input dtype (fp32 accumulation inside the matmul, one rounding), then log-softmax in
fp32. Its error in bf16/fp16 is the budget the fused kernels must stay within.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .engine import (
    BackwardRequest,
    Capabilities,
    ForwardRequest,
    Grads,
    KernelOptions,
    RowPartials,
    RowStats,
    register_engine,
)


def reference_logprobs(
    hidden: Tensor,  # [N, H]
    weight: Tensor,  # [V, H]
    bias: Tensor | None,  # [V]
    targets: Tensor,  # [N] int64, in [0, V) (ignored rows already replaced by 0)
    valid: Tensor,  # [N] bool
    temperature: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token (logp, entropy, target_is_max), ``[N]``; logp and entropy carry the autograd graph."""
    logits = F.linear(hidden, weight, bias)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    z = logits / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logprobs = z.log_softmax(dim=-1)
    logp = logprobs.gather(1, targets[:, None]).squeeze(1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    with torch.no_grad():
        target_is_max = (z.gather(1, targets[:, None]).squeeze(1) >= z.amax(dim=-1)) & valid
    return logp, entropy, target_is_max


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, options: KernelOptions) -> Tensor:
    """z = softcap((h W^T + b) / T), materialized, fp32 (float64 for float64 inputs)."""
    z = F.linear(hidden, weight, bias)
    z = z.to(torch.float64 if z.dtype == torch.float64 else torch.float32) / options.temperature
    if options.softcap is not None:
        z = options.softcap * torch.tanh(z / options.softcap)
    return z


class ReferenceEngine:
    """The engine contract (``engine.py``) by materialized logits and autograd: a whole engine
    in one file, and a check on the others (tests/kernels/test_engines.py runs it through the same op).
    ``gft_loss(backend="reference")`` itself differentiates ``reference_logprobs`` directly (a
    double backward works there)."""

    name = "reference"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    launch_options = None
    capabilities = Capabilities(autograd_rows=True, description="the reference engine")

    def rows(self, request: ForwardRequest, options: KernelOptions) -> RowStats:
        """Per-row logp and entropy through autograd on the materialized logits (a double
        backward works); the other fields are None."""
        hidden, weight, bias, targets, valid = request
        logp, entropy, is_max = reference_logprobs(
            hidden, weight, bias, targets, valid, options.temperature, options.softcap
        )
        return RowStats(logp, None, None, None, entropy, is_max)

    def supports(self, hidden: Tensor, options: KernelOptions) -> str | None:
        if options.outside:
            return (
                "vocab_parallel_group needs an engine that takes a vocabulary shard; backend='reference' "
                "materializes the full logits"
            )
        return None

    def partials(self, request: ForwardRequest, options: KernelOptions) -> RowPartials:
        hidden, weight, bias, targets, valid = request
        with torch.no_grad():
            z = _logits(hidden, weight, bias, options)
            m = z.amax(dim=-1)
            e = torch.exp(z - m[:, None])
            e_t = e.gather(1, targets[:, None]).squeeze(1)
            keep = valid.to(z.dtype)
            rows = [m, e.sum(-1) - e_t, z.gather(1, targets[:, None]).squeeze(1)]
            if options.with_entropy:
                rows += [e.sum(-1), (e * (z - m[:, None])).sum(-1)]
            return RowPartials(*((x * keep)[None] for x in rows))

    def backward(self, request: BackwardRequest, options: KernelOptions) -> Grads:
        """The logits' gradient written out (an op's backward runs below autograd):
        dL/dz = g (onehot - p) - g_H p (log p + H), then through the softcap and temperature."""
        hidden, weight, bias, targets, _ = request.inputs
        z = _logits(hidden, weight, bias, options)
        cap = None if options.softcap is None else 1.0 - (z / options.softcap).square()
        logprobs = z.log_softmax(-1)
        p = logprobs.exp()
        dz = -p * request.g[:, None]
        dz.scatter_add_(1, targets[:, None], request.g[:, None])
        if request.g_entropy is not None:
            entropy = -(p * logprobs).sum(-1, keepdim=True)
            dz -= request.g_entropy[:, None] * p * (logprobs + entropy)
        if cap is not None:
            dz *= cap
        dz = (dz / options.temperature).to(hidden.dtype)
        need = request.need
        return Grads(
            dz @ weight if need.dhidden else None,
            dz.t() @ hidden if need.dweight else None,
            dz.sum(0) if need.dbias else None,
        )


ENGINE = register_engine(ReferenceEngine())
