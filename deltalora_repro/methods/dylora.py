"""DyLoRA (Valipour et al., 2023) in its official "frozen" mode.

Each optimizer step samples b uniformly from 1..r; the branch uses the first b rows of A and
columns of B with scaling alpha / b, and only the b-th row/column receives gradient. Evaluation
uses the full rank by default; `method.eval_all_ranks=true` also evaluates every rank 1..r.
"""
from __future__ import annotations

import torch
from torch import nn

from ..adapters import inject_lora, lora_layers
from .base import Method, register, set_trainable
from .lora import LoRA


@register("dylora")
class DyLoRA(Method):
    config_checks = LoRA.config_checks      # rank, alpha, lora_dropout: as LoRA's
    def apply(self, model: nn.Module, head_names: list[str]) -> nn.Module:
        set_trainable(model, prefixes=head_names)
        inject_lora(model, self.cfg.rank, self.cfg.alpha, self.cfg.lora_dropout)
        self.layers = lora_layers(model)
        # Its own generator: the rank draws depend on the seed only, not on other random use.
        self.generator = torch.Generator().manual_seed(int(self.cfg.get("rank_seed", 0)))
        self.sampled: list[int] = []
        return model

    def set_rank(self, rank: int, frozen: bool) -> None:
        for layer in self.layers:
            layer.active_rank = rank
            layer.frozen_lower_ranks = frozen

    def on_step_start(self, step: int) -> None:
        b = int(torch.randint(1, self.cfg.rank + 1, (1,), generator=self.generator))
        self.sampled.append(b)
        self.set_rank(b, frozen=True)

    def eval_settings(self):
        full = ("", lambda: self.set_rank(self.cfg.rank, frozen=False))
        if not self.cfg.get("eval_all_ranks", False):
            return [full]
        return [full] + [(f"rank{b}", lambda b=b: self.set_rank(b, frozen=False))
                         for b in range(1, self.cfg.rank + 1)]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "sampled": list(self.sampled)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.sampled = list(state["sampled"])
