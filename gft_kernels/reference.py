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


def reference_logprobs(
    hidden: Tensor,          # [N, H]
    weight: Tensor,          # [V, H]
    bias: Tensor | None,     # [V]
    targets: Tensor,         # [N] int64, in [0, V) (ignored rows already replaced by 0)
    valid: Tensor,           # [N] bool
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
