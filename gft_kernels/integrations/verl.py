"""verl's fused-kernel forward on this library's op: per-token log-probs and entropies without
the vocabulary logits.

``linear_logprob_entropy(hidden, weight, labels, temperature, reduction)`` has the signature and
outputs of verl's Triton ``linear_cross_entropy`` (``verl.utils.kernel.linear_cross_entropy``),
which verl's fused-kernel forward (``use_fused_kernels=True``,
``fused_kernel_options.impl_backend=triton``) calls with the backbone's hidden states and the
lm_head weight; it is ``gft_kernels.logprobs(..., return_entropy=True)`` (the same engine
selection, the same backward). ``install_fused_kernel()`` (or importing
``gft_kernels.verl_fused_kernel`` / ``gft_train.integrations.verl_fused_kernel``, e.g. as
``actor_rollout_ref.model.external_lib``) puts it in that place.
"""

from __future__ import annotations

from torch import Tensor

from ..api import logprobs


def linear_logprob_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group=None,
    *,
    backend: str = "auto",
    bias: Tensor | None = None,
):
    """Per-token ``(log_probs, entropy)`` of ``labels`` under ``softmax(hidden @ weight.T / T)``.

    verl's ``linear_cross_entropy`` signature: ``hidden [..., H]``, ``weight [V, H]``, ``labels [...]``
    (every id valid), ``temperature`` a float, ``reduction`` ``"none"``. Both outputs are fp32 in
    the shape of ``labels`` (as verl's), and both carry gradients.
    ``dist_process_group`` (verl's vocabulary split) is refused: its layout is verl's, while
    ``gft_kernels.logprobs(..., vocab_parallel_group=...)`` takes this library's.
    """
    if dist_process_group is not None:
        raise NotImplementedError(
            "linear_logprob_entropy: verl's vocabulary split across ranks (dist_process_group) is not supported; "
            "gft_kernels.logprobs(..., vocab_parallel_group=...) takes a vocabulary-sharded head"
        )
    if reduction != "none":
        raise ValueError(
            f"linear_logprob_entropy: reduction must be 'none' (as verl's fused forward passes it), got {reduction!r}"
        )
    if tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match")
    out = logprobs(
        hidden, weight, labels.long(), bias=bias, temperature=temperature, return_entropy=True, backend=backend
    )
    return out.logp.float(), out.entropy.float()


def install_fused_kernel():
    """Make verl's fused-kernel forward (``impl_backend=triton``) call ``linear_logprob_entropy``.

    verl imports ``linear_cross_entropy`` from ``verl.utils.kernel.linear_cross_entropy`` on
    every forward, so replacing that module attribute is enough (in each worker process).
    Returns the function it replaced.
    """
    import verl.utils.kernel.linear_cross_entropy as lce

    previous = lce.__dict__.get("_gft_previous", lce.linear_cross_entropy)
    lce._gft_previous = previous
    lce.linear_cross_entropy = linear_logprob_entropy
    return previous
