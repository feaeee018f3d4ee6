"""The old name of ``gft_train.integrations.verl_fused_kernel``: importing it makes verl's
fused-kernel forward use gft_kernels' op (for ``actor_rollout_ref.model.external_lib``)."""

from gft_train.integrations import verl_fused_kernel  # noqa: F401
