"""Task families, registered by name (`family:` in a task config); base.py has the interface."""
from __future__ import annotations

from typing import Any

from . import glue, nlg, xsum  # noqa: F401  (registration side effect)
from .base import TASKS, Task


def task_class(family: str) -> type[Task]:
    return TASKS.lookup(family)


def build_task(cfg: Any, data_dir: str | None) -> Task:
    return task_class(cfg.family)(cfg, data_dir)


__all__ = ["TASKS", "Task", "build_task", "task_class"]
