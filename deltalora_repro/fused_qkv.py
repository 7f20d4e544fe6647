"""GPT-2's fused q/k/v projection, split into three modules for PEFT and fused back for export.

GPT-2 computes q, k and v with one Conv1D `c_attn` of 3*hidden output columns (q, then k, then
v), and its attention calls `self.c_attn(hidden).split(hidden_size, dim=2)`. PEFT adapts whole
modules, so an adapter on `c_attn` changes q, k and v through one shared A, where the paper adapts
Wq and Wv only. `split_fused_qkv` puts in place of each `c_attn` a module of the same name whose
forward returns the concatenation of three Conv1D children `q`, `k`, `v`: the attention code runs
unchanged, and PEFT can target `c_attn.q` and `c_attn.v` alone. The children stay Conv1D (weight
stored in x out, the same addmm) so the arithmetic is that of the fused layer, column block by
column block. `fuse_qkv` undoes it after the adapters are merged, so that an exported model is a
plain GPT-2.

Neither transformers nor PEFT offers this (PEFT matches targets by module name only), hence by
hand. Only PEFT-based methods split: the toolkit's own q/v-slice adapters (adapters.py) work on
the fused projection directly.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.pytorch_utils import Conv1D

from .adapters import family_of
from .errors import ConfigError

PROJECTIONS = ("q", "k", "v")
# PEFT target names of the split modules that hold Wq and Wv (matched as module-name suffixes).
GPT2_QV_TARGETS = ["c_attn.q", "c_attn.v"]


class SplitQKV(nn.Module):
    """Drop-in for GPT-2's fused c_attn: q, k, v as separate Conv1D, outputs concatenated."""

    def __init__(self, q: Conv1D, k: Conv1D, v: Conv1D):
        super().__init__()
        self.q, self.k, self.v = q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def _conv1d_from(weight: torch.Tensor, bias: torch.Tensor) -> Conv1D:
    """A Conv1D holding copies of the given (in x out) weight and bias, on their device/dtype."""
    nx, nf = weight.shape
    with torch.device("meta"):      # no random init (and no draw from the RNG) to overwrite
        layer = Conv1D(nf, nx)
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return layer


def _self_attentions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every GPT-2 attention block's fused q/k/v projection."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, GPT2Attention):
            continue
        if module.is_cross_attention:
            # Cross-attention fuses only k and v (q_attn is separate): a different layout.
            raise ConfigError(f"{name}: GPT-2 cross-attention is not supported by the q/k/v split")
        out.append((name, module))
    return out


@torch.no_grad()
def split_fused_qkv(model: nn.Module) -> list[str]:
    """Replace every GPT-2 `c_attn` by a SplitQKV in place; return the PEFT target names of Wq, Wv."""
    if family_of(model) != "gpt2":
        raise ConfigError(f"only GPT-2 has a fused q/k/v projection to split, not "
                          f"{model.config.model_type!r}")
    blocks = _self_attentions(model)
    if not blocks:
        raise ConfigError(f"found no GPT-2 attention block in {type(model).__name__}")
    for name, attn in blocks:
        fused = attn.c_attn
        if isinstance(fused, SplitQKV):
            continue
        if not isinstance(fused, Conv1D) or fused.nf != 3 * attn.split_size:
            raise ConfigError(f"{name}.c_attn is a {type(fused).__name__} with "
                              f"{getattr(fused, 'nf', '?')} outputs; expected a Conv1D of "
                              f"3 x {attn.split_size} (q, k, v)")
        h = attn.split_size
        parts = [_conv1d_from(fused.weight[:, i * h:(i + 1) * h], fused.bias[i * h:(i + 1) * h])
                 for i in range(3)]
        attn.c_attn = SplitQKV(*parts)
    return list(GPT2_QV_TARGETS)


@torch.no_grad()
def fuse_qkv(model: nn.Module) -> nn.Module:
    """Put a plain fused Conv1D back in place of every SplitQKV (after adapters are merged)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, SplitQKV):
            continue
        parts = [getattr(module, p) for p in PROJECTIONS]
        if not all(type(p) is Conv1D for p in parts):
            raise ConfigError(f"{name}: merge the adapters into q, k, v before fusing them "
                              f"(found {[type(p).__name__ for p in parts]})")
        fused = _conv1d_from(torch.cat([p.weight for p in parts], dim=1),
                             torch.cat([p.bias for p in parts], dim=0))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fused)
    return model
