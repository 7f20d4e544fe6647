"""AdaLoRA (Zhang et al., 2022) through PEFT.

Two things PEFT leaves to the caller, both easy to miss: `update_and_allocate(step)` must run
after every optimizer step (before gradients are cleared) or AdaLoRA silently trains as plain
LoRA; and PEFT adds the orthogonal regulariser only when the wrapped model computes its own loss,
so for a task that computes its loss (all of ours do) the term is added here.
"""
from __future__ import annotations

import torch
from peft import AdaLoraConfig, get_peft_model
from torch import nn

from ..adapters import family_of, find_sites
from ..errors import ConfigError
from .base import Method, register


@register("adalora")
class AdaLoRA(Method):
    def apply(self, model: nn.Module, head_names: list[str]) -> nn.Module:
        cfg = self.cfg
        family = family_of(model)
        # PEFT matches target names as module-name suffixes. On GPT-2 this adapts the whole fused
        # c_attn (q, k and v): PEFT cannot put AdaLoRA on column slices (recorded in the run).
        targets = sorted({s.module_name.rsplit(".", 1)[-1] for s in find_sites(model)})
        tfinal = cfg.tfinal if cfg.tfinal is not None else max(1, self.total_steps // 5)
        tinit = cfg.tinit if cfg.tinit is not None else max(0, self.total_steps // 10)
        if tinit + tfinal >= self.total_steps:
            tinit, tfinal = 0, max(1, self.total_steps // 2)
        if self.total_steps - tfinal < 2:
            # PEFT fixes the final budget at step total - tfinal from the importance scores of the
            # steps before it; with none, it fails deep inside with a KeyError.
            raise ConfigError(
                f"adalora needs at least one optimizer step before its final budget is fixed: "
                f"{self.total_steps} steps in all with method.tfinal={tfinal} leaves none; "
                "train for more steps (3 at least) or lower method.tfinal")
        self.peft_config = AdaLoraConfig(
            init_r=cfg.rank, target_r=cfg.target_rank, lora_alpha=cfg.alpha,
            lora_dropout=cfg.lora_dropout, target_modules=targets,
            # GPT-2's Conv1D stores W transposed.
            fan_in_fan_out=family == "gpt2",
            tinit=tinit, tfinal=tfinal, deltaT=cfg.delta_t, beta1=cfg.beta1, beta2=cfg.beta2,
            orth_reg_weight=cfg.orth_reg_weight, total_step=self.total_steps,
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
        return self.cfg.orth_reg_weight * torch.stack(terms).mean()

    def after_optimizer_step(self, step: int) -> None:
        self.model.base_model.update_and_allocate(step)

    def total_rank(self) -> int:
        """Ranks the allocator keeps across all adapted modules (init_r each before pruning)."""
        pattern = self.model.peft_config["default"].rank_pattern
        if pattern:
            return int(sum(int(torch.as_tensor(v).sum()) for v in pattern.values()))
        return sum(p.shape[0] for n, p in self.model.named_parameters() if "lora_E" in n)

    def state_dict(self) -> dict:
        alloc = self.model.base_model.rankallocator
        return {"ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc,
                "rank_pattern": self.peft_config.rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        alloc = self.model.base_model.rankallocator
        alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = (
            state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"])
        self.model.peft_config["default"].rank_pattern = state["rank_pattern"]
