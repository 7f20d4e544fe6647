"""build(cfg): the one place a composed config becomes task, model, tokenizer and method.

The run, export, Figure 3, the benchmark and the tests all build through here, in the same order
(seed, task, its data, the backbone, the method applied), so what they build cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .methods import Method, build_method
from .models import head_prefixes, load_backbone
from .tasks import Task, build_task
from .train import total_steps as count_steps


@dataclass
class Built:
    task: Task
    model: nn.Module              # the method applied; on the CPU until the caller moves it
    tokenizer: Any
    method: Method
    heads: list[str]              # parameter prefixes of a new task head (trained by every method)
    total_steps: int
    overrides_applied: dict       # model config attributes the task set (e.g. dropouts)


def backbone(cfg: Any, task: Task) -> tuple[nn.Module, Any, dict]:
    """The pretrained model (or the seeded random init of a tiny one) the run starts from, with
    the task's head and config overrides: (model, tokenizer, overrides applied)."""
    return load_backbone(cfg.model, task.head, seed=cfg.seed,
                         overrides=cfg.task.get("model_overrides"), **task.model_kwargs())


def build(cfg: Any, *, data: bool = True, total_steps: int | None = None,
          task: Task | None = None, model: tuple[nn.Module, Any, dict] | None = None) -> Built:
    """Everything a run trains, from its composed config.

    data=False builds without reading the task's data (export and Figure 3 rebuild a finished run:
    its step count comes from its record, `total_steps`). `task` and `model` stand in for the
    configured ones (the benchmark: synthetic batches on a random-init model of a real shape)."""
    torch.manual_seed(cfg.seed)
    task = task if task is not None else build_task(cfg.task, cfg.data_dir)
    if data:
        task.load()                              # missing data fails here, before the model
    net, tokenizer, applied = model if model is not None else backbone(cfg, task)
    if data:
        task.prepare(tokenizer)
    if total_steps is None:
        if not data:
            raise ValueError("build(data=False) needs total_steps (the run record's)")
        total_steps = count_steps(cfg.train, len(task.train_examples()))
    method = build_method(cfg.method, total_steps)
    heads = head_prefixes(net) if task.head == "classification" else []
    net = method.apply(net, heads)
    return Built(task, net, tokenizer, method, heads, total_steps, applied)
