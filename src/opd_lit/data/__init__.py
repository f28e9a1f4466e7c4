"""Prompt data and the rollout DataModule."""

from opd_lit.data.datamodule import RolloutDataModule, RolloutSpec, StepBatchSampler
from opd_lit.data.prompts import DataConfigError, PromptSpec, load_prompt_records

__all__ = [
    "DataConfigError",
    "PromptSpec",
    "RolloutDataModule",
    "RolloutSpec",
    "StepBatchSampler",
    "load_prompt_records",
]
