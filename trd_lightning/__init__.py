"""trd_lightning: on-policy distillation that fixes the prefix (Trajectory-Refined Distillation)."""

from trd_lightning.data import PromptDataModule
from trd_lightning.module import DistillationModule
from trd_lightning.rollout import Rollout, Sampling

__all__ = ["DistillationModule", "PromptDataModule", "Rollout", "Sampling"]
__version__ = "0.1.0"
