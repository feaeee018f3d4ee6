"""The old home of the TRL integration: ``gft_train.integrations.trl`` (kept so that
``from gft_train.trl_trainer import GFTTrainer`` still works)."""

from .integrations.trl import SOURCES, TESTED_TRL, GFTConfig, GFTTrainer, check_trl_version  # noqa: F401

__all__ = ["GFTConfig", "GFTTrainer", "SOURCES", "TESTED_TRL", "check_trl_version"]
