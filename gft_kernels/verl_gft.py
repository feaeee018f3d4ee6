"""The old home of the verl integration: ``gft_train.integrations.verl`` (kept so that
``gft_kernels.verl_gft`` imports, and verl installs whose plugin entry point names it, still work)."""

from gft_train.integrations.verl import (  # noqa: F401
    DEFAULT_TAU,
    gft_policy_loss,
    install_fused_kernel,
    linear_logprob_entropy,
    register_gft_policy_loss,
)

__all__ = [
    "DEFAULT_TAU",
    "gft_policy_loss",
    "install_fused_kernel",
    "linear_logprob_entropy",
    "register_gft_policy_loss",
]
