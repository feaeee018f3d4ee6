"""GFT in verl: a registered policy loss and a fused log-prob + entropy op.

(This module was ``gft_kernels.verl_gft``, which still imports it.) It imports torch, verl and
gft_kernels only: the verl environment may lack the trainer's other dependencies.

**The policy loss.** Importing this module registers ``gft`` in verl's policy-loss registry
(``verl.trainer.ppo.core_algos.register_policy_loss``), so ``actor.policy_loss.loss_mode=gft``
selects it. The package declares this module as a ``verl.plugins`` entry point, which verl
loads in every process when it is imported: installing ``gft`` next to verl is enough.
The loss per response token is ``-A * C(p) * log p`` (DCR: ``C = sg(p)`` below ``tau``, 1 at
or above), times verl's rollout importance weights when given, aggregated by verl's own
``agg_loss`` with the actor's ``loss_agg_mode`` and global batch information. ``tau`` is 0.7
(the paper's); ``register_gft_policy_loss(name, tau)`` registers other thresholds, and the
environment variable ``GFT_TAU`` overrides the default one. The old log-probs are not used:
GFT's loss has no importance ratio (as the authors' released verl code).

**The fused op.** ``linear_logprob_entropy(hidden, weight, labels, temperature, reduction)``
has the signature and outputs of verl's Triton ``linear_cross_entropy``
(``verl.utils.kernel.linear_cross_entropy``), which verl's fused-kernel forward
(``use_fused_kernels=True``, ``fused_kernel_options.impl_backend=triton``) calls with the
backbone's hidden states and the lm_head weight: per-token fp32 log-probs and entropies,
without the vocabulary logits. ``install_fused_kernel()`` (or importing
``gft_train.integrations.verl_fused_kernel``, or its old name ``gft_kernels.verl_fused_kernel``,
e.g. as ``actor_rollout_ref.model.external_lib``) puts it in that place. On CUDA it runs this library's Triton kernels, on a CPU the chunked engine.
Log-probs and entropies both carry gradients (verl's ``entropy_coeff`` works), computed by
recomputing the logits in the backward.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from gft_kernels.head import dcr_coefficient
from gft_kernels.options import check_tau
from gft_kernels.validation import check_backend

DEFAULT_TAU = 0.7


# ---- the fused log-prob + entropy op ----------------------------------------------------------


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
    the shape of ``labels``, and both carry gradients. ``dist_process_group`` (a vocabulary split
    across ranks) is not supported.
    """
    if dist_process_group is not None:
        raise NotImplementedError(
            "linear_logprob_entropy: a vocabulary split across ranks (dist_process_group) is not supported"
        )
    if reduction != "none":
        raise ValueError(
            f"linear_logprob_entropy: reduction must be 'none' (as verl's fused forward passes it), got {reduction!r}"
        )
    from gft_kernels import reference
    from gft_kernels.engine import ForwardRequest, KernelOptions
    from gft_kernels.fused import fused_logprobs
    from gft_kernels.options import LogitOptions

    temperature = LogitOptions.build(temperature).temperature
    shape = labels.shape
    if tuple(hidden.shape[:-1]) != tuple(shape):
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(shape)} do not match")
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden2d.numel() and hidden2d.stride(-1) != 1:
        hidden2d = hidden2d.contiguous()
    targets = labels.reshape(-1).to(torch.int64)
    valid = torch.ones_like(targets, dtype=torch.bool)
    # both outputs carry gradients: entropy is computed and differentiated
    options = KernelOptions(temperature=temperature, with_entropy=True, entropy_grad=True)
    backend = check_backend(backend, hidden2d, options)
    with torch.autocast(hidden.device.type, enabled=False):
        if hidden2d.shape[0] == 0:
            logp = (hidden2d.sum() * 0 + weight.sum() * 0).float().reshape(1)[:0]
            entropy = logp.detach()
        elif backend == "reference":
            logp, entropy, _ = reference.reference_logprobs(hidden2d, weight, bias, targets, valid, temperature, None)
        else:
            rows = fused_logprobs(backend, ForwardRequest(hidden2d, weight, bias, targets, valid), options)
            logp, entropy = rows.logp, rows.entropy
    return logp.float().reshape(shape), entropy.float().reshape(shape)


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


# ---- the policy loss ---------------------------------------------------------------------------


def gft_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Tensor | None = None,
    *,
    tau: float | None = None,
):
    """verl's policy-loss signature; returns ``(loss, metrics)``.

    ``loss_t = -A_t * C(p_t) * log p_t`` (times ``rollout_is_weights``), aggregated with
    ``verl.trainer.ppo.core_algos.agg_loss(loss, response_mask, loss_agg_mode,
    **config.global_batch_info)``. ``old_log_prob`` is unused (no importance ratio).
    """
    from verl.trainer.ppo.core_algos import agg_loss

    tau = check_tau(float(os.environ.get("GFT_TAU", DEFAULT_TAU)) if tau is None else tau)
    detached = log_prob.detach()
    if detached.dtype not in (torch.float32, torch.float64):
        detached = detached.float()  # p and the tau comparison never in 16 bits
    coef = dcr_coefficient(detached, tau).to(log_prob.dtype)
    pg_losses = -advantages * coef * log_prob
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    info = dict(getattr(config, "global_batch_info", None) or {}) if config is not None else {}
    loss = agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **info)
    with torch.no_grad():
        mask = response_mask.bool()
        n = mask.sum().clamp(min=1)
        p = detached.exp()
        metrics = {
            "actor/gft_rectified_frac": float(((p < tau) & mask).sum() / n),
            "actor/gft_mean_prob": float((p * mask).sum() / n),
        }
    return loss, metrics


def register_gft_policy_loss(name: str = "gft", tau: float | None = None):
    """Register ``gft_policy_loss`` under ``name`` with a fixed ``tau`` (None: ``GFT_TAU`` or 0.7)."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    if tau is not None:
        check_tau(tau)

    def loss_fn(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode="token-mean",
        config=None,
        rollout_is_weights=None,
    ):
        return gft_policy_loss(
            old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights, tau=tau
        )

    loss_fn.__name__ = f"gft_policy_loss_{name}"
    loss_fn.__doc__ = gft_policy_loss.__doc__
    register_policy_loss(name)(loss_fn)
    return loss_fn


try:  # registered on import (verl loads this module as a plugin); without verl, nothing to do
    import verl.trainer.ppo.core_algos  # noqa: F401
except ImportError:
    pass
else:
    register_gft_policy_loss("gft")
