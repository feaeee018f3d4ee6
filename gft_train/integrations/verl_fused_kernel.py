"""Importing this module makes verl's fused-kernel forward use gft_kernels' op.

For verl's ``actor_rollout_ref.model.external_lib`` (imported in every worker), with
``actor_rollout_ref.model.use_fused_kernels=True`` and
``actor_rollout_ref.model.fused_kernel_options.impl_backend=triton``.
See ``gft_train.integrations.verl.install_fused_kernel``.
"""

from .verl import install_fused_kernel

install_fused_kernel()
