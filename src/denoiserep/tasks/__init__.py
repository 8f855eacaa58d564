"""Tasks: what the generic pipeline needs to know about a kind of problem."""

from __future__ import annotations


def create_task(cfg):
    """The task object for ``cfg.task`` (data loaded, models buildable)."""
    if cfg.task == "classification":
        from .classification import ClassificationTask

        return ClassificationTask(cfg)
    if cfg.task == "reid":
        from .reid import ReidTask

        return ReidTask(cfg)
    raise ValueError(f"unknown task {cfg.task!r}; choose classification or reid")
