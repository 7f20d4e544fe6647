"""Low-rank adapters on Wq and Wv, shared by LoRA, Delta-LoRA and DyLoRA.

Written by hand rather than taken from PEFT because the paper's setting needs three things PEFT's
LoRA does not do: (1) GPT-2's fused `c_attn` gets separate rank-r factors on its q and v column
slices with k untouched (PEFT adapts q, k and v with one shared A); (2) Delta-LoRA updates the
frozen W in place from the factors' change, which needs direct access to W's q/v slices;
(3) DyLoRA's per-step rank. Keeping LoRA and Delta-LoRA on one module also makes their cost
comparison exact: Delta-LoRA is LoRA plus one update call per optimizer step.

Notation (PEFT's lora_A / lora_B): W is out x in, A is r x in, B is out x r, s = alpha / r,
h = W x + s * B A x.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import sharding
from .errors import ConfigError
from .families import family_spec


@dataclass(frozen=True)
class Site:
    """One adapted weight: a module and the output columns of it that are Wq or Wv."""

    module_name: str
    proj: str  # "q" or "v"
    start: int
    stop: int


def family_of(model: nn.Module) -> str:
    """The model's family (its model_type), or a ConfigError naming the supported ones."""
    return family_spec(model).model_type


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):
        return module.nf
    raise ConfigError(f"cannot adapt a {type(module).__name__}: only Linear and Conv1D")


def find_sites(model: nn.Module) -> list[Site]:
    """Every Wq and Wv of every attention block, in module order."""
    sites = []
    targets = family_spec(model).qv
    for name, module in model.named_modules():
        for target in targets:
            if not re.search(rf"(^|\.){re.escape(target.suffix)}$", name):
                continue
            out = _out_features(module)
            if target.part is None:
                sites.append(Site(name, target.proj, 0, out))
            else:
                index, parts = target.part
                width = out // parts
                sites.append(Site(name, target.proj, index * width, (index + 1) * width))
    if not sites:
        raise ConfigError(f"found no Wq/Wv modules in {type(model).__name__}")
    return sites


def weight_slice(module: nn.Module, site: Site) -> torch.Tensor:
    """A view of the site's weight in (out, in) orientation (Conv1D stores (in, out))."""
    base = module.base if isinstance(module, LoRALayer) else module
    if isinstance(base, Conv1D):
        return base.weight[:, site.start:site.stop].t()
    return base.weight[site.start:site.stop]


class LoRALayer(nn.Module):
    """A Linear or Conv1D plus rank-r branches on some of its output-column slices.

    The branch input is `dropout(x)`; Delta-LoRA sets the dropout to 0 (Sec. 4.2) so that the
    gradient the factors see equals the gradient W would see.
    """

    def __init__(self, base: nn.Module, slices: list[tuple[int, int]], rank: int, alpha: float,
                 dropout: float):
        super().__init__()
        self.base = base
        self.slices = slices
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        in_features = base.in_features if isinstance(base, nn.Linear) else base.weight.shape[0]
        w = base.weight
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.empty(rank, in_features, device=w.device, dtype=torch.float32))
            for _ in slices
        )
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(stop - start, rank, device=w.device, dtype=torch.float32))
            for start, stop in slices
        )
        for a in self.lora_A:
            # Kaiming-uniform A, zero B: the adapted model starts equal to the pretrained one.
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        # DyLoRA sets these; plain LoRA keeps the full rank.
        self.active_rank: int = rank
        self.frozen_lower_ranks = False
        # Delta-LoRA's deferred update (DeltaUpdater.use_deferred) sets 1 + lambda here once it
        # has begun; None: the branch is plain LoRA.
        self.deferred_coef: float | None = None
        # False only for the scaled-LoRA control (methods/lora.py ScaledLoRA): the same function,
        # with the factors' gradients those of the branch as it is, (1 + lambda) times larger.
        self.deferred_grad_rescale = True

    def factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scaling) of slice i at the active rank (DyLoRA truncates; scaling alpha/b)."""
        a, b, rank = self.lora_A[i], self.lora_B[i], self.active_rank
        if rank == self.rank and not self.frozen_lower_ranks:
            return a, b, self.scaling
        a, b = a[:rank], b[:, :rank]
        if self.frozen_lower_ranks and rank > 1:
            # DyLoRA's frozen mode: only the b-th row of A and column of B learn this step, for
            # every sampled b including b = r (the official `dynamic` module detaches the rows
            # before the sampled one whatever b is).
            a = torch.cat([a[:-1].detach(), a[-1:]], 0)
            b = torch.cat([b[:, :-1].detach(), b[:, -1:]], 1)
        return a, b, self.alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        xd = self.dropout(x)
        for i, (start, stop) in enumerate(self.slices):
            a, b, scaling = self.factors(i)
            if self.deferred_coef is not None:
                a, b, scaling = self._deferred_factors(i, a, b, scaling)
            delta = (xd @ a.t().to(xd.dtype)) @ b.t().to(xd.dtype)
            # The scaling rides on the add (one kernel, not two).
            if start == 0 and stop == out.shape[-1]:
                out = torch.add(out, delta, alpha=scaling)
            else:
                # In place on a slice of the base output: no copy of the other columns.
                out[..., start:stop].add_(delta, alpha=scaling)
        return out

    def _deferred_factors(self, i: int, a, b, scaling: float):
        """Factors whose product is W_t - W + s B A under the deferred update.

        Delta-LoRA's updates telescope: after step t >= K, W_t = W_K + lambda s (B_t A_t - B_K A_K),
        so the forward's weight W_t + s B_t A_t equals W_K + s (B_t A_t + lambda B_t A_t -
        lambda B_K A_K), with (A_K, B_K) the factors after step K (the prev_A/prev_B buffers):
        s [B_t, lambda B_t, -lambda B_K] [A_t; A_t; A_K], one rank-3r branch, so W is never
        written during training. The factors' gradients must stay those of s B_t A_t alone
        (dL/dW_t does not reach them, Algorithm 1): the middle block is detached, so only the
        first carries them; the input's gradient sees the whole weight, as with an updated W.
        Plain tensor operations, no autograd function: no Python backward per factor (host work,
        which an eager step such as FSDP's pays for).

        The scaled-LoRA control (deferred_grad_rescale False) keeps the factors' gradients of
        the branch as it is, s (1 + lambda) B_t A_t: [B_t, -(lambda / c) B_K] [A_t; A_K] at
        scale s c, c = 1 + lambda, rank 2r.
        """
        c = self.deferred_coef
        lam = c - 1.0
        prev_a, prev_b = getattr(self, f"prev_A{i}"), getattr(self, f"prev_B{i}")
        if not self.deferred_grad_rescale:
            return (torch.cat([a, prev_a], 0), torch.cat([b, prev_b * (-lam / c)], 1),
                    scaling * c)
        a = torch.cat([a, a.detach(), prev_a], 0)
        b = torch.cat([b, b.detach() * lam, prev_b * (-lam)], 1)
        return a, b, scaling

    def merged_weight_delta(self, i: int) -> torch.Tensor:
        """s * B A for slice i in (out, in) orientation, at full rank."""
        return self.scaling * (self.lora_B[i] @ self.lora_A[i])


def inject_lora(model: nn.Module, rank: int, alpha: float, dropout: float) -> list[tuple[LoRALayer, int, Site]]:
    """Wrap every Wq/Wv module; return (layer, slice index, site) for each adapted slice."""
    if rank <= 0:
        raise ConfigError(f"method.rank must be a positive integer, got {rank}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"method.lora_dropout must be in [0, 1), got {dropout}")
    by_module: dict[str, list[Site]] = {}
    for site in find_sites(model):
        by_module.setdefault(site.module_name, []).append(site)
    out = []
    for name, sites in by_module.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALayer(getattr(parent, child), [(s.start, s.stop) for s in sites], rank, alpha,
                          dropout)
        setattr(parent, child, layer)
        out.extend((layer, i, site) for i, site in enumerate(sites))
    return out


def lora_layers(model: nn.Module) -> list[LoRALayer]:
    return [m for m in model.modules() if isinstance(m, LoRALayer)]


class DeltaUpdater:
    """Algorithm 1, line "W <- W + lambda * s * (B_{t+1} A_{t+1} - B_t A_t)", for all sites at once.

    The delta has rank <= 2r: B1 A1 - B0 A0 = [B1, -B0] @ [A1; A0], so each W slice gets one
    in-place rank-2r GEMM (addmm_) and nothing of W's size is ever allocated. The only extra state
    is a copy of the factors as they were after the previous optimizer step (adapter-sized).
    Everything stays on the device: no host synchronisation, so the call can sit inside a
    captured or compiled step.
    """

    def __init__(self, layers: list[tuple[LoRALayer, int, Site]], update_ratio: float,
                 start_steps: int):
        if update_ratio < 0:
            raise ConfigError(f"method.update_ratio (lambda) must be >= 0, got {update_ratio}")
        if start_steps < 0:
            raise ConfigError(f"method.start_steps (K) must be >= 0, got {start_steps}")
        self.update_ratio = float(update_ratio)
        self.start_steps = int(start_steps)
        self.entries = []
        for layer, i, site in layers:
            w = weight_slice(layer, site)
            if w.dtype != torch.float32:
                raise ConfigError(
                    f"Delta-LoRA needs W in float32 (got {w.dtype} at {site.module_name}); "
                    "train in bf16 through autocast (train.precision=bf16), not by casting the model"
                )
            conv = isinstance(layer.base, Conv1D)
            # W itself is looked up at each use, not kept: train.fsdp replaces it by a sharded
            # parameter, and a kept reference would hold the whole W in every process.
            self.entries.append((layer, i, site, conv))
        # The factors after the previous optimizer step live as buffers of their layer, so they
        # follow the model across .to(device) and into its state_dict (exact resume).
        for layer, i, *_ in self.entries:
            layer.register_buffer(f"prev_A{i}", layer.lora_A[i].detach().clone())
            layer.register_buffer(f"prev_B{i}", layer.lora_B[i].detach().clone())

    @property
    def prev_a(self) -> list[torch.Tensor]:
        return [getattr(layer, f"prev_A{i}") for layer, i, *_ in self.entries]

    @property
    def prev_b(self) -> list[torch.Tensor]:
        return [getattr(layer, f"prev_B{i}") for layer, i, *_ in self.entries]

    def current(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # train.fsdp: the factors are sharded; gathered whole (every process calls this at the
        # same step: the deferred snapshot and the final write only).
        return ([sharding.full(layer.lora_A[i].detach()) for layer, i, *_ in self.entries],
                [sharding.full(layer.lora_B[i].detach()) for layer, i, *_ in self.entries])

    @torch.no_grad()
    def _apply(self, update: bool) -> None:
        cur_a, cur_b = self.current()
        if update:
            for (layer, _, site, conv), a1, b1, a0, b0 in zip(
                    self.entries, cur_a, cur_b, self.prev_a, self.prev_b):
                coef = self.update_ratio * layer.scaling
                left = torch.cat([b1, -b0], 1)      # out x 2r
                right = torch.cat([a1, a0], 0)      # 2r x in
                if sharding.is_sharded(layer.base.weight):
                    # train.fsdp (deferred form only): fully_shard replaced W by a sharded
                    # parameter; each process writes the rows it holds.
                    sharding.addmm_local_(layer.base.weight, site.start, site.stop, conv, left,
                                          right, coef)
                elif conv:  # Conv1D stores W transposed: update W[:, cols] with right^T @ left^T
                    layer.base.weight[:, site.start:site.stop].addmm_(right.t(), left.t(), alpha=coef)
                else:
                    layer.base.weight[site.start:site.stop].addmm_(left, right, alpha=coef)
        torch._foreach_copy_(self.prev_a, cur_a)
        torch._foreach_copy_(self.prev_b, cur_b)

    # -- deferred: the same updates, summed into the forward (LoRALayer._deferred_factors) --------
    deferred = False       # use_deferred() was called
    begun = False          # the snapshot (A_K, B_K) is taken and the branches carry the sum

    def use_deferred(self) -> None:
        """Apply the updates through the telescoped sum instead of writing W every step.

        W stays W_K during training and costs no memory traffic; `materialise()` writes
        W_T = W_K + lambda s (B_T A_T - B_K A_K) once, at the end (or whenever W is read).
        Needs the branch input to be the layer input (no branch dropout), because the sum stands
        for a change of W, which sees the undropped input."""
        for layer, *_ in self.entries:
            if not isinstance(layer.dropout, nn.Identity):
                raise ConfigError("method.update=deferred needs method.lora_dropout=0 (the deferred "
                                  "sum stands for a change of W, which sees the undropped input); "
                                  "use method.update=explicit for the Table 5 ablation")
        self.deferred = True

    def begin_if_due(self, optimizer_step: int) -> None:
        """Deferred mode: after step K (or at the start when K = 0), snapshot the factors and
        let every branch carry the sum from then on."""
        if not self.deferred or self.begun or self.update_ratio == 0.0 or \
                optimizer_step < self.start_steps:
            return
        cur_a, cur_b = self.current()
        torch._foreach_copy_(self.prev_a, cur_a)
        torch._foreach_copy_(self.prev_b, cur_b)
        for layer in {id(layer): layer for layer, *_ in self.entries}.values():
            layer.deferred_coef = 1.0 + self.update_ratio
        self.begun = True

    def set_begun(self, begun: bool) -> None:
        """Restore the deferred state from a checkpoint (the snapshot is in the model's buffers)."""
        self.begun = bool(begun)
        for layer, *_ in self.entries:
            layer.deferred_coef = 1.0 + self.update_ratio if begun else None

    @torch.no_grad()
    def materialise(self) -> None:
        """Deferred mode: write the summed updates into W and restart the sum from the current
        factors. The model computes the same function before and after (up to rounding)."""
        if self.deferred and self.begun:
            self._apply(True)

    def step(self, optimizer_step: int) -> None:
        """Call after optimizer step number `optimizer_step` (1-based) has updated A and B.

        The update applies when optimizer_step > K; with K = 0 it applies from the first step and
        the updates telescope to W_T - W_0 = lambda * s * B_T A_T.
        """
        if self.deferred:
            self.begin_if_due(optimizer_step)
            return
        update = optimizer_step > self.start_steps and self.update_ratio != 0.0
        if self._graphs is not None:
            self._graphs[update].replay()
        else:
            self._apply(update)

    _graphs: dict | None = None

    def capture_cuda_graphs(self, stream=None, pool=None) -> None:
        """Record the whole update (every layer) as one CUDA graph, replayed each step: one
        launch instead of ~3 per layer. Tensors keep their addresses (the optimizer updates A
        and B in place), so the replay reads the current values. `stream` and `pool`: the
        training step's capture stream and graph memory pool, so that the update costs no
        cuBLAS workspace or pool of its own (train.cuda_graph)."""
        stream = stream if stream is not None else torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Initialise cuBLAS outside capture, on throwaway tensors (W must not change here).
            scratch = self.prev_a[0].new_zeros(2, 2)
            scratch.addmm_(scratch, scratch)
        torch.cuda.current_stream().wait_stream(stream)
        graphs = {}
        for update in (False, True):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, stream=stream):
                self._apply(update)
            graphs[update] = g
        self._graphs = graphs

    def numel_updated(self) -> int:
        return sum((site.stop - site.start) * layer.lora_A[i].shape[1]
                   for layer, i, site, _ in self.entries)
