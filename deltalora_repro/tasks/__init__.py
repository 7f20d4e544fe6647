"""Task families, registered by name (`family:` in a task config); base.py has the interface."""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from . import glue, nlg, xsum  # noqa: F401  (registration side effect)
from .base import TASKS, Task


def task_class(family: str) -> type[Task]:
    if family not in TASKS:
        raise ConfigError(f"task family {family!r} is not available; valid: {sorted(TASKS)}")
    return TASKS[family]


def build_task(cfg: Any, data_dir: str | None) -> Task:
    return task_class(cfg.family)(cfg, data_dir)


__all__ = ["TASKS", "Task", "build_task", "task_class"]
