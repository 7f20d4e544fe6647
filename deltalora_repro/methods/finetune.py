"""Full fine-tuning and the paper's two restricted variants (Tables 1-4).

ft          all parameters (Full Fine-Tuning)
ft-noembed  all but the token-embedding matrix (Fine-Tuning†; in GPT-2 it is tied to the LM head)
ft-qv       only Wq and Wv of every attention block (Fine-Tuning‡), plus a task's new head
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters import find_sites
from .base import Method, register, set_trainable


@register("ft")
class FullFineTuning(Method):
    graph_safe = True

    def apply(self, model: nn.Module, head_names: list[str]) -> nn.Module:
        set_trainable(model, prefixes=[""])
        return model

    def changed_base_params(self, model: nn.Module) -> list[str]:
        return [n for n, p in model.named_parameters() if p.requires_grad]


@register("ft-noembed")
class FineTuningNoEmbed(FullFineTuning):
    def apply(self, model: nn.Module, head_names: list[str]) -> nn.Module:
        super().apply(model, head_names)
        model.get_input_embeddings().weight.requires_grad_(False)
        return model


@register("ft-qv")
class FineTuningQV(Method):
    """Only Wq and Wv learn. In a fused projection (GPT-2's c_attn) the k columns must not move:
    their gradient is masked, and after each step they are restored, because AdamW's decoupled
    weight decay would otherwise shrink them even with a zero gradient."""

    graph_safe = True

    def apply(self, model: nn.Module, head_names: list[str]) -> nn.Module:
        set_trainable(model, prefixes=head_names)
        self._heads = list(head_names)
        self._frozen: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
        by_module: dict[str, list] = {}
        for site in find_sites(model):
            by_module.setdefault(site.module_name, []).append(site)
        self._qv_numel = 0
        for name, sites in by_module.items():
            module = model.get_submodule(name)
            weight = module.weight
            weight.requires_grad_(True)
            # Output features are dim 1 of a Conv1D weight (in, out), dim 0 of a Linear's (out, in).
            out_dim = 1 if isinstance(module, Conv1D) else 0
            covered = sum(s.stop - s.start for s in sites)
            self._qv_numel += covered * weight.shape[1 - out_dim]
            if covered < weight.shape[out_dim]:
                keep = torch.zeros(weight.shape[out_dim], dtype=torch.bool, device=weight.device)
                for s in sites:
                    keep[s.start:s.stop] = True
                shape = (1, -1) if out_dim == 1 else (-1, 1)
                holder = {"mask": keep.view(shape)}   # moved to the weight's device at start
                weight.register_hook(lambda g, h=holder: g * h["mask"].to(g.dtype))
                frozen = (~keep).nonzero().flatten()
                saved = weight.detach().index_select(out_dim, frozen).clone()
                self._frozen.append((weight, out_dim, frozen, saved, holder))
        return model

    def on_train_start(self, world, fast, graphs=None) -> None:
        # apply() runs before the model moves to its device; bring the masks and saved columns.
        self._frozen = [(w, dim, index.to(w.device), saved.to(w.device), holder)
                        for w, dim, index, saved, holder in self._frozen]
        for w, *_, holder in self._frozen:
            holder["mask"] = holder["mask"].to(w.device)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        for weight, dim, index, saved, _ in self._frozen:
            weight.index_copy_(dim, index, saved)

    def trainable_numel(self, model: nn.Module) -> int:
        heads = sum(p.numel() for n, p in model.named_parameters()
                    if p.requires_grad and any(n.startswith(h) for h in self._heads))
        return self._qv_numel + heads

    def changed_base_params(self, model: nn.Module) -> list[str]:
        return [n for n, p in model.named_parameters() if p.requires_grad]
