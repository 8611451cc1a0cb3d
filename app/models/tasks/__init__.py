"""The tasks a model may have (``task`` in its manifest), one module each."""

from __future__ import annotations

from app.models.tasks.base import ModelTask
from app.models.tasks.classification import Classification
from app.models.tasks.detection import Detection
from app.models.tasks.segmentation import Segmentation

TASKS: dict[str, ModelTask] = {
    task.name: task for task in (Classification(), Detection(), Segmentation())
}


def task_of(name: str) -> ModelTask:
    """The task called ``name`` (the manifest has checked it is one)."""
    return TASKS[name]


__all__ = ["TASKS", "ModelTask", "task_of"]
