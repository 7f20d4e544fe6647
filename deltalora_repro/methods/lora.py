"""LoRA (Hu et al., 2022) and Delta-LoRA (Algorithm 1 of the paper) on Wq and Wv."""
from __future__ import annotations

import warnings

from torch import nn

from ..adapters import DeltaUpdater, inject_lora
from .base import Method, register, set_trainable


@register("lora")
class LoRA(Method):
    graph_safe = True

    def apply(self, model: nn.Module, head_names: list[str]) -> nn.Module:
        set_trainable(model, prefixes=head_names)
        self.sites = inject_lora(model, self.cfg.rank, self.cfg.alpha, self.cfg.lora_dropout)
        return model


@register("delta-lora")
class DeltaLoRA(LoRA):
    """LoRA plus the in-place update of the frozen W by the change of B A each optimizer step.

    W keeps requires_grad = False: it has no gradient and no optimizer state (Sec. 4.1).
    """

    def apply(self, model: nn.Module, head_names: list[str]) -> nn.Module:
        if self.cfg.lora_dropout > 0:
            # Sec. 4.2 removes the branch dropout so that dL/dW equals dL/d(sBA); keeping it is
            # only the paper's "Delta-LoRA + LoRA module" ablation (Table 5).
            warnings.warn(f"delta-lora with lora_dropout={self.cfg.lora_dropout}: this is the "
                          "Table 5 ablation, not the paper's method", stacklevel=2)
        super().apply(model, head_names)
        self.updater = DeltaUpdater(self.sites, self.cfg.update_ratio, self.cfg.start_steps)
        return model

    def on_train_start(self, device, train_cfg, graphs=None) -> None:
        if device.type == "cuda" and train_cfg.get("graph_update", True):
            self.updater.capture_cuda_graphs(*(graphs or ()))

    def after_optimizer_step(self, step: int) -> None:
        self.updater.step(step)

    def extra_updated(self) -> int:
        return self.updater.numel_updated()

    def changed_base_params(self, model: nn.Module) -> list[str]:
        names = {id(p): n for n, p in model.named_parameters()}
        return sorted({names[id(layer.base.weight)] for layer, *_ in self.sites})
