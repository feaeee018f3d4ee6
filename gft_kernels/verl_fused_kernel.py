"""Importing this module makes verl's fused-kernel forward use gft_kernels' op (for verl's
``actor_rollout_ref.model.external_lib``; ``gft_train.integrations.verl_fused_kernel`` is the same).
See ``gft_kernels.integrations.verl.install_fused_kernel``."""

from .integrations.verl import install_fused_kernel

install_fused_kernel()
