"""The small interface every fine-tuning method implements, and the registry of methods.

The training loop calls only these hooks; per-method behaviour lives here, never in the loop.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..registry import Registry


class Method:
    """One fine-tuning method. Subclasses override the hooks they need."""

    name = ""
    # True when every step runs the same device computation, so a step can be recorded once as a
    # CUDA graph and replayed (train.cuda_graph). Host-side per-step decisions (DyLoRA's sampled
    # rank, AdaLoRA's budget schedule) rule it out.
    graph_safe = False

    # How the method's changes to frozen weights reach them, when it has a choice (Delta-LoRA's
    # explicit or deferred update): settled at on_train_start and written into the run record.
    update_mode: str | None = None

    def __init__(self, cfg: Any, total_steps: int):
        self.cfg = cfg
        self.total_steps = total_steps

    @classmethod
    def config_checks(cls, cfg: Any) -> list[tuple[str, Any, Callable[[Any], bool], str]]:
        """Checks of this method's config keys that need nothing loaded, as (key, value, ok,
        what a valid value is); run.validate applies them with every other config check."""
        return []

    # -- building -------------------------------------------------------------------------------
    def apply(self, model: nn.Module, head_names: list[str]) -> nn.Module:
        """Freeze/unfreeze parameters and insert modules; return the model to train."""
        raise NotImplementedError

    def on_train_start(self, world: Any, fast: Any, graphs=None) -> None:
        """Once the model is on its device, before the first step. `world`: the processes and
        this one's device (world.World); `fast`: the run's resolved fast path
        (fastpath.FastPath); `graphs`: (stream, memory pool) of the CUDA-graph step, for a method
        recording graphs of its own."""

    # -- around each optimizer step ---------------------------------------------------------------
    def on_step_start(self, step: int) -> None:
        """Before the first micro-batch of optimizer step `step` (0-based)."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to whatever loss the task computes (AdaLoRA's orthogonal regulariser)."""
        return None

    def after_optimizer_step(self, step: int) -> None:
        """After optimizer step number `step` (1-based) and before gradients are cleared."""

    def on_train_end(self) -> None:
        """After the last step, before the trained model is evaluated or saved."""

    def graph_phase(self) -> Any:
        """Part of a recorded step's key: a method whose step computation changes at known
        points (Delta-LoRA's deferred update, from step K) returns a new value from then on and
        the step is recorded again."""
        return None

    # -- bookkeeping ------------------------------------------------------------------------------
    def record_fields(self) -> dict:
        """Settings the method derived for this run (not in the config as such), for the record."""
        return {}

    def run_warnings(self) -> list[str]:
        """Settings that make this run not what its method name promises (e.g. Delta-LoRA whose
        start step comes after the last step): logged loudly and kept in the run record."""
        return []

    def extra_updated(self) -> int:
        """Elements of frozen (gradient-free) weights the method changes, e.g. Delta-LoRA's W."""
        return 0

    def trainable_numel(self, model: nn.Module) -> int:
        """Elements that receive gradient updates (a method may train only part of a tensor)."""
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def changed_base_params(self, model: nn.Module) -> list[str]:
        """Names of pretrained parameters whose values change in training (saved with the run)."""
        return []

    def eval_settings(self) -> list[tuple[str, Callable[[], None]]]:
        """Named model settings to evaluate under; the first is the one reported."""
        return [("", lambda: None)]

    def state_dict(self) -> dict:
        """The method's own state for an exact resume (besides the model's and the optimizer's):
        nested dicts/lists/tuples of tensors, numbers, strings and None. Checkpoints store the
        tensors in safetensors and the rest as JSON (no pickle), so nothing else may appear."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned (tensors come back on the CPU, or on this run's
        GPU when they were written from one)."""


METHODS: Registry[Method] = Registry("method", "name")
register = METHODS.register


def build_method(cfg: Any, total_steps: int) -> Method:
    return METHODS.lookup(cfg.name)(cfg, total_steps)


def set_trainable(model: nn.Module, names: set[str] | None = None, prefixes: list[str] = ()) -> None:
    """requires_grad = True exactly for the named parameters and those under the prefixes."""
    for n, p in model.named_parameters():
        p.requires_grad_((names is not None and n in names) or any(n.startswith(x) for x in prefixes))
