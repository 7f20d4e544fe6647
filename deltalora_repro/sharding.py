"""Sharded training (train.fsdp=true): PyTorch's FSDP2 (`fully_shard`) over the run's processes.

Every repeated transformer block, then the root, becomes one FSDP unit: each process keeps 1/N of
every parameter (a DTensor sharded on dim 0), the optimizer state of that shard only, and gathers a
block's full weights just for its forward and backward. Parameters stay fp32 (Delta-LoRA's W must:
tiny updates vanish in bf16); bf16 runs keep using autocast.

What changes against plain data parallelism, and where it is handled:
- gradients: FSDP reduce-scatters them. The loss weights already make each process's gradient a
  share of the global batch's mean (train.Trainer.step_batches), so the reduction must SUM, not
  average: gradient divide factor 1 and plain sum collectives (`shard`). The Trainer's own flat
  all-reduce then carries only the loss and any parameter left unsharded (`unsharded`).
- Delta-LoRA runs in its deferred form (adapters.DeltaUpdater.use_deferred): W is not written
  during training, so no W traffic and no per-step gather of the factors; the snapshot (A_K, B_K)
  is taken from the full factors (`full`, a collective every process calls at the same step), and
  at the end every process writes its own rows of W (`addmm_local_`).
- checkpoints: torch.distributed.checkpoint (DCP) writes every process's shards of the model and
  optimizer into one folder (`save_checkpoint`); the rest of the trainer state goes through
  checkpoint.save as before. DCP keeps its metadata (and non-tensor values such as the
  optimizer's param_groups) as pickles; these are read only from a folder that checkpoint.json,
  written by this run's code, names.
- the final weights: gathered to the main process as a full CPU state dict (`full_state_dict`).
- evaluation and decoding: every forward all-gathers, so every process makes the same forward
  calls (run.py runs the test in every process under FSDP; only the main one writes).
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

SHARDS_SUFFIX = ".shards"


def enabled(cfg: Any) -> bool:
    """train.fsdp, checked: true or false."""
    value = cfg.get("fsdp", False)
    if not isinstance(value, bool):
        raise ConfigError(f"train.fsdp must be true or false, got {value!r}")
    return value


def check_config(cfg: Any) -> None:
    """Before anything loads: what FSDP cannot be combined with, when the user asked for it.

    The CUDA-graph step records the optimizer step once and replays it, but FSDP's all-gathers and
    reduce-scatters run on their own streams with lazily allocated buffers that a recording does
    not capture safely; compiled blocks would trace through FSDP's hooks (not validated here).
    Under `auto` both simply stay off (fastpath.resolve records the choice)."""
    if not enabled(cfg):
        return
    if cfg.get("cuda_graph", False) is True:
        raise ConfigError("train.fsdp=true cannot be used with train.cuda_graph=true: the "
                          "CUDA-graph step does not record FSDP's all-gathers and reduce-scatters "
                          "(use train.cuda_graph=auto or false)")
    choice = cfg.get("compile", False)
    if str(choice).lower() in ("true", "model", "blocks"):
        raise ConfigError(f"train.fsdp=true cannot be used with train.compile={choice}: compiling "
                          "through FSDP's hooks is not supported here (use train.compile=auto "
                          "or false)")


# -- DTensor helpers (plain tensors pass through) -----------------------------------------------
def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a collective for a DTensor (every process must call it, in the same
    order), the tensor itself otherwise."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a DTensor (a view of its storage), the tensor itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def unsharded(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters FSDP does not manage (their gradients still need the Trainer's all-reduce)."""
    return [p for p in params if not is_sharded(p)]


def model_is_sharded(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


# -- sharding the model ---------------------------------------------------------------------------
def shard(model: nn.Module, world: Any) -> int:
    """fully_shard every repeated transformer block, then the root; returns the number of blocks.

    The model must already be on its device. Gradients are summed over the processes (divide
    factor 1, sum-only collectives: gloo has no pre-multiplied sum)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .fastpath import repeated_blocks

    if world.size > 1:
        mesh = init_device_mesh(world.device.type, (world.size,))
    else:
        # One process (tests): FSDP needs a process group all the same.
        import torch.distributed as dist
        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + secrets.randbelow(1000)))
            dist.init_process_group("nccl" if world.device.type == "cuda" else "gloo",
                                    rank=0, world_size=1)
        mesh = init_device_mesh(world.device.type, (1,))
    blocks = repeated_blocks(model)
    if not blocks:
        raise ConfigError(f"train.fsdp: {type(model).__name__} has no repeated blocks (no "
                          "ModuleList of same-class layers) to shard one by one")
    units = []
    for block in blocks:
        fully_shard(block, mesh=mesh)
        units.append(block)
    fully_shard(model, mesh=mesh)
    units.append(model)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    log.info("train.fsdp: %d blocks and the root sharded over %d processes", len(blocks),
             world.size)
    return len(blocks)


# -- Delta-LoRA's final write into a sharded W ---------------------------------------------------
def _shard_rows(weight: torch.Tensor) -> tuple[int, int]:
    """Global row range [start, stop) of dim 0 that this process's shard of `weight` holds."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    if tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"expected a weight sharded on dim 0, got {weight.placements}")
    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh,
                                                          weight.placements)
    return offset[0], offset[0] + shape[0]


@torch.no_grad()
def addmm_local_(weight: torch.Tensor, start: int, stop: int, conv: bool, left: torch.Tensor,
                 right: torch.Tensor, coef: float) -> None:
    """W[start:stop] += coef * left @ right on this process's rows of a sharded W, no gather.

    `left` (out x 2r) and `right` (2r x in) are full; the W slice is rows start:stop of a Linear
    weight, or columns start:stop of a Conv1D weight (stored (in, out): the update is then
    right^T @ left^T on its columns). Each process writes only the rows it holds."""
    lo, hi = _shard_rows(weight)
    w = weight.to_local()
    if conv:
        # Rows of the stored (in, out) weight are input features: all sites cover them.
        if hi > lo:
            w[:, start:stop].addmm_(right[:, lo:hi].t(), left.t(), alpha=coef)
        return
    a, b = max(lo, start), min(hi, stop)
    if b > a:
        w[a - lo:b - lo].addmm_(left[a - start:b - start], right, alpha=coef)


# -- checks -------------------------------------------------------------------------------------------
@torch.no_grad()
def checksum(model: nn.Module, device: torch.device) -> float:
    """A position-weighted checksum of every parameter, gathered whole (the same number an
    unsharded model with these weights gives), plus every buffer, which each process keeps its
    own copy of (Delta-LoRA's snapshot): those are what can go out of step between processes."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    tensors = [full(p.detach()) for p in model.parameters()] + list(model.buffers())
    for i, t in enumerate(tensors):
        flat = t.detach().reshape(-1).double()
        total += (flat * torch.arange(1, flat.numel() + 1, device=flat.device,
                                      dtype=torch.float64)).sum() * (i + 1)
    return float(total)


def _first_nonfinite_local(tree: Any, path: str = "") -> str | None:
    if isinstance(tree, torch.Tensor):
        t = local(tree)
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return path or "/"
        return None
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for k, v in items:
        bad = _first_nonfinite_local(v, f"{path}/{k}")
        if bad is not None:
            return bad
    return None


# -- checkpoints ----------------------------------------------------------------------------------
def save_checkpoint(trainer: Any, directory: Path, info: dict, world: Any) -> Path | None:
    """Every process: write the model and optimizer shards with DCP into a new folder, then (main
    process) checkpoint.json and the rest of the trainer state; returns checkpoint.json's path
    on the main process, None elsewhere.

    Atomic as checkpoint.save: the shard folder is written under a temporary name, renamed once
    every process is done, then checkpoint.json (naming it) replaces the old one, and only then
    are older shard folders removed. Raises checkpoint.NonFiniteState in every process, writing
    nothing, when any process's shard holds inf or NaN."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from . import checkpoint

    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    bad = [b for b in world.gather(_first_nonfinite_local(state)) if b is not None]
    if bad:
        raise checkpoint.NonFiniteState(f"non-finite values in {bad[0].lstrip('/')}")
    name = world.share(f"checkpoint-{trainer.step:08d}-{secrets.token_hex(3)}{SHARDS_SUFFIX}")
    tmp = directory / f".{name}.tmp"
    if world.is_main:
        directory.mkdir(parents=True, exist_ok=True)
    world.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    world.barrier()                       # every process's shards are on disk
    index = None
    if world.is_main:
        os.replace(tmp, directory / name)
        index = checkpoint.save(trainer.state_dict(), directory,
                                {**info, "shards": {"dir": name, "processes": world.size}})
        for old in directory.glob(f"checkpoint-*{SHARDS_SUFFIX}"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        for old in directory.glob(f".checkpoint-*{SHARDS_SUFFIX}.tmp"):
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()                       # nobody goes on before checkpoint.json names the folder
    return index


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process: read its shards of the model and optimizer from a DCP folder. DCP reshards
    on load, so the folder may come from another number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)   # the layout to read into
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every process calls it; the main process gets the whole model's parameters on the CPU
    (names as in model.named_parameters()), the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
