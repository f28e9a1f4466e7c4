"""Progress display: Lightning's rich progress bar, with the stage of the current step.

A training step has three stages (rollout, teacher, update); the description of the train
bar shows which one is running, next to Lightning's running metrics.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar

STAGES = ("rollout", "teacher", "update", "eval")


class StageProgressBar(RichProgressBar):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = "start"

    def _get_train_description(self, current_epoch: int) -> str:
        return f"step [{self.stage}]"

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        task = getattr(self, "train_progress_bar_id", None)
        if self.progress is not None and task is not None and not self.is_disabled:
            self.progress.update(task, description=self._get_train_description(0))
            self.refresh()


def set_stage(trainer, stage: str) -> None:
    """Tell the progress bar (if it shows stages) which part of the step is running."""
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    if bar is not None and hasattr(bar, "set_stage"):
        bar.set_stage(stage)
