"""AdaLoRA (Zhang et al., 2022) through PEFT.

Two things PEFT leaves to the caller, both easy to miss: `update_and_allocate(step)` must run
after every optimizer step (before gradients are cleared) or AdaLoRA silently trains as plain
LoRA; and PEFT adds the orthogonal regulariser only when the wrapped model computes its own loss,
so for a task that computes its loss (all of ours do) the term is added here.

The budget schedule (tinit, tfinal, deltaT, beta1, beta2, orthogonal weight) is the AdaLoRA
authors' own for each task: `method.schedule`, written by configs/paper/method/adalora/<task>.yaml.
Their step counts belong to their batch size and epochs, so tinit and tfinal carry over as
fractions of their run: tinit/T_ref and tfinal/T_ref of this run's optimizer steps, with
T_ref = epochs x ceil(train rows / batch size) as their scripts' trainers count it. A schedule
that does not fit the run is a ConfigError, never silently changed.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from omegaconf.errors import OmegaConfBaseException
from peft import AdaLoraConfig, get_peft_model
from torch import nn

from ..errors import ConfigError
from ..families import family_spec
from ..fused_qkv import split_fused_qkv
from .base import Method, register

log = logging.getLogger(__name__)


def _schedule(cfg: Any):
    try:
        return cfg.schedule
    except OmegaConfBaseException as e:
        raise ConfigError("adalora needs a budget schedule for the task (method.schedule: tinit, "
                          "tfinal, delta_t, beta1, beta2, orth_reg_weight and the authors' run "
                          "batch_size, epochs, train_size), written by "
                          "configs/paper/method/adalora/<task>.yaml; this task has none "
                          f"({str(e).splitlines()[0]})") from None


def reference_steps(schedule: Any) -> int:
    """Optimizer steps of the run the schedule was written for (its authors' script)."""
    return schedule.epochs * math.ceil(schedule.train_size / schedule.batch_size)


def _holds(ok, value) -> bool:
    try:
        return bool(ok(value))
    except TypeError:
        return False


def schedule_checks(cfg: Any) -> list[tuple[str, Any, Any, str]]:
    """Config-only checks of the schedule, in run.validate's (key, value, ok, want) form."""
    s = _schedule(cfg)

    def count(v):
        return isinstance(v, int) and v >= 0

    def positive(v):
        return isinstance(v, int) and v > 0

    checks = [(f"method.schedule.{k}", s[k], positive, "a positive integer")
              for k in ("batch_size", "epochs", "train_size", "delta_t")]
    checks += [(f"method.schedule.{k}", s[k], count, "an integer >= 0") for k in ("tinit", "tfinal")]
    checks += [(f"method.schedule.{k}", s[k], lambda v: 0 <= v < 1, "in [0, 1)") for k in ("beta1", "beta2")]
    checks.append(("method.schedule.orth_reg_weight", s.orth_reg_weight, lambda v: v >= 0, ">= 0"))
    checks += [(f"method.{k}", cfg[k], lambda v: v is None or count(v), "null or an integer >= 0")
               for k in ("tinit", "tfinal")]
    if all(_holds(ok, v) for _, v, ok, _ in checks):
        # The authors' trainer asserts the same of their own run (total steps > tinit + tfinal).
        ref = reference_steps(s)
        checks.append(("method.schedule.tinit + method.schedule.tfinal", s.tinit + s.tfinal,
                       lambda v: v < ref, f"< the {ref} steps of the run they were written for"))
    return checks


def budget_phases(cfg: Any, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) in optimizer steps of this run: method.tinit / method.tfinal when set,
    else the schedule's fractions of its own run applied to this one (rounded to a step)."""
    s = _schedule(cfg)
    ref = reference_steps(s)
    tinit = cfg.tinit if cfg.tinit is not None else round(total_steps * s.tinit / ref)
    tfinal = cfg.tfinal if cfg.tfinal is not None else round(total_steps * s.tfinal / ref)
    origin = (f"method.schedule: tinit {s.tinit} and tfinal {s.tfinal} of the {ref} steps of "
              f"{s.script}, scaled to this run")
    if cfg.tinit is not None or cfg.tfinal is not None:
        origin = f"method.tinit={cfg.tinit}, method.tfinal={cfg.tfinal}; null ones from " + origin
    if tinit + tfinal >= total_steps:
        raise ConfigError(
            f"adalora's budget schedule does not fit this run: tinit={tinit} + tfinal={tfinal} "
            f">= {total_steps} optimizer steps, which leaves no step for the budget to fall "
            f"({origin}); train for more steps or set method.tinit / method.tfinal")
    if total_steps - tfinal < 2:
        # PEFT fixes the final budget at step total - tfinal from the importance scores of the
        # steps before it; with none, it fails deep inside with a KeyError.
        raise ConfigError(
            f"adalora needs at least one optimizer step before its final budget is fixed: "
            f"{total_steps} steps in all with tinit={tinit}, tfinal={tfinal} leaves none "
            f"({origin}); train for more steps (3 at least) or lower method.tfinal")
    return tinit, tfinal


@register("adalora")
class AdaLoRA(Method):
    @classmethod
    def config_checks(cls, cfg: Any):
        from .lora import LoRA
        return LoRA.config_checks(cfg) + [
            ("method.target_rank", cfg.get("target_rank"),
             lambda v: isinstance(v, int) and 0 < v <= cfg.rank, f"in 1..{cfg.get('rank')}"),
            *schedule_checks(cfg)]            # the task's budget schedule

    def __init__(self, cfg: Any, total_steps: int):
        super().__init__(cfg, total_steps)
        self.schedule = _schedule(cfg)
        # Checked here, before the adapters are built: a misfit fails before any work on the model.
        self.tinit, self.tfinal = budget_phases(cfg, total_steps)

    def record_fields(self) -> dict:
        return {"tinit": self.tinit, "tfinal": self.tfinal, "reference_steps": reference_steps(self.schedule)}

    def apply(self, model: nn.Module, head_names: list[str]) -> nn.Module:
        cfg, s = self.cfg, self.schedule
        family = family_spec(model)
        # Wq and Wv alone (the paper's Sec. 5): a fused q/k/v projection (GPT-2's c_attn) is split
        # into q, k, v modules first, so that PEFT adapts q and v and leaves k as it is.
        if family.fused_qkv:
            split_fused_qkv(model)
        targets = list(family.peft_targets)
        log.info("adalora on %s: init rank %d -> target %d; tinit=%d, tfinal=%d of %d steps, "
                 "deltaT=%d", targets, cfg.rank, cfg.target_rank, self.tinit, self.tfinal,
                 self.total_steps, s.delta_t)
        self.peft_config = AdaLoraConfig(
            init_r=cfg.rank, target_r=cfg.target_rank, lora_alpha=cfg.alpha,
            lora_dropout=cfg.lora_dropout, target_modules=targets,
            # GPT-2's Conv1D stores W transposed.
            fan_in_fan_out=family.fan_in_fan_out,
            tinit=self.tinit, tfinal=self.tfinal, deltaT=s.delta_t, beta1=s.beta1, beta2=s.beta2,
            orth_reg_weight=s.orth_reg_weight, total_step=self.total_steps,
            modules_to_save=[h.rstrip(".") for h in head_names] or None,
        )
        for n, p in model.named_parameters():
            p.requires_grad_(False)
        self.model = get_peft_model(model, self.peft_config)
        return self.model

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        # PEFT's formula: mean over factor matrices of ||P P^T - I||_F (A) / ||P^T P - I||_F (B).
        terms = []
        for n, p in self.model.named_parameters():
            if ("lora_A" in n or "lora_B" in n) and p.requires_grad:
                cov = p @ p.T if "lora_A" in n else p.T @ p
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        return self.schedule.orth_reg_weight * torch.stack(terms).mean()

    def after_optimizer_step(self, step: int) -> None:
        # The AdaLoRA authors' trainer calls the allocator with the number of steps done before
        # this one (0 after the first step), and PEFT's schedule (tinit, tfinal, deltaT) counts
        # the same way; the loop's `step` is 1-based.
        self.model.base_model.update_and_allocate(step - 1)

    def state_dict(self) -> dict:
        alloc = self.model.base_model.rankallocator
        return {"ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc,
                "rank_pattern": self.peft_config.rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        alloc = self.model.base_model.rankallocator
        alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = (
            state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"])
        self.model.peft_config["default"].rank_pattern = state["rank_pattern"]
