"""Tasks: each folder holds one kind of problem (its data, models, loss and metrics) behind the
interface of `denoiserep.tasks.base.Task`. Adding a task = one folder + one line in `TASKS`."""

from __future__ import annotations

import importlib

# --task name -> "module:class", imported on first use (a task's imports can be heavy).
TASKS = {
    "classification": "denoiserep.tasks.classification:ClassificationTask",
    "reid": "denoiserep.tasks.reid:ReidTask",
    "segmentation": "denoiserep.tasks.segmentation:SegmentationTask",
    "detection": "denoiserep.tasks.detection:DetectionTask",
}


def task_class(name: str) -> type:
    """The task class registered as ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    module, _, attribute = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def create_task(cfg):
    """The task object for ``cfg.task`` (data loaded, models buildable)."""
    return task_class(cfg.task)(cfg)
