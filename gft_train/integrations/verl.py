"""GFT in verl: a registered policy loss and a fused log-prob + entropy op.

It imports torch, verl and gft_kernels only: the verl environment may lack the trainer's other
dependencies.

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

**The fused op.** ``linear_logprob_entropy`` and ``install_fused_kernel`` are
``gft_kernels.integrations.verl``'s (``gft_kernels.logprobs`` in the place of verl's Triton
``linear_cross_entropy``), re-exported here; importing ``gft_train.integrations.verl_fused_kernel``
or ``gft_kernels.verl_fused_kernel`` (verl's ``external_lib``) installs it.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from gft_kernels.head import dcr_coefficient
from gft_kernels.integrations.verl import install_fused_kernel, linear_logprob_entropy  # noqa: F401  (re-exported)
from gft_kernels.options import check_tau

DEFAULT_TAU = 0.7


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
