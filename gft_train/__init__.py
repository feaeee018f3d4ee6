"""gft_train: a thin Group Fine-Tuning driver on accelerate.

prompts (JSONL/Parquet) -> groups (expert / teacher / self responses) -> rewards -> advantages
-> batches -> training with ``gft_kernels.gft_loss`` on the model's hidden states -> checkpoints.
"""

from gft_kernels import __version__  # one version number for the project (pyproject reads it there)

from .groups import Group, Response, group_advantages
from .lm import causal_lm_gft_loss

__all__ = ["Group", "Response", "group_advantages", "causal_lm_gft_loss", "__version__"]
