"""Which process this is and how many take part: the one object that knows.

Every part of a run that differs between one process and many (which device, who writes files,
how batches, evaluation and decoding are shared, the gradient reduction) reads it from here,
handed down from the start of the run. One process: `World.single(device)`. Several: started by
`torchrun` or `accelerate launch`, which set RANK, WORLD_SIZE and LOCAL_RANK; `World.from_env`
joins their process group (NCCL on CUDA, gloo on CPU) through torch.distributed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu")
    return torch.device(name)


def _from_submitit() -> None:
    """A job that submitit started (launch=slurm) with several tasks, one process each: the
    variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), from
    the job's own (SLURM_PROCID, SLURM_NTASKS, ...), by submitit's helper. Each task keeps every
    GPU of its node visible and takes the one of its LOCAL_RANK."""
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment
    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


@dataclass(frozen=True)
class World:
    rank: int                 # this process among all of them (0 .. size - 1)
    size: int                 # processes taking part
    local_rank: int           # this process among those on its machine (picks its GPU)
    device: torch.device
    # Evaluation and decoding are shared out (take / merge). Off for a sharded model, whose every
    # forward is a collective: each process then computes every item, so that all make the same
    # forward calls in the same order (the same inputs and weights give the same early exits).
    split: bool = True

    @property
    def is_main(self) -> bool:
        """The process that writes the run's folder, record and checkpoints."""
        return self.rank == 0

    @classmethod
    def single(cls, device: torch.device | str) -> "World":
        return cls(rank=0, size=1, local_rank=0, device=torch.device(device))

    @classmethod
    def from_env(cls, device: str) -> "World":
        """One process, or this one of those torchrun / accelerate launched (WORLD_SIZE > 1): each
        takes the GPU of its LOCAL_RANK (device=auto or cuda) or the CPU (device=cpu)."""
        if "WORLD_SIZE" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR"):
            _from_submitit()
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls.single(pick_device(device))
        import torch.distributed as dist
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={device} with {size} processes: use device=auto or cuda (each "
                              "process takes the GPU of its LOCAL_RANK) or device=cpu")
        on_gpu = device != "cpu" and torch.cuda.is_available()
        if device == "cuda" and not on_gpu:
            raise ConfigError("device=cuda but no CUDA device is available; use device=cpu")
        where = torch.device("cuda", local) if on_gpu else torch.device("cpu")
        if on_gpu:
            torch.cuda.set_device(where)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if on_gpu else "gloo",
                                    device_id=where if on_gpu else None)
        return cls(rank=rank, size=size, local_rank=local, device=where)

    def describe(self) -> dict:
        """For the run record."""
        return {"size": self.size, "device": str(self.device),
                "backend": self._dist().get_backend() if self.size > 1 else None}

    # -- collectives (no-ops for one process) -----------------------------------------------------
    @staticmethod
    def _dist():
        import torch.distributed as dist
        return dist

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the processes, in place, as one flat buffer: one collective."""
        if self.size == 1 or not tensors:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
        flat = _flatten_dense_tensors(tensors)
        self._dist().all_reduce(flat)
        for t, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            t.copy_(reduced)

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Main process's values into every process's tensors (the same start everywhere)."""
        if self.size == 1:
            return
        for t in tensors:
            self._dist().broadcast(t.data, src=0)

    def share(self, obj: Any) -> Any:
        """The main process's `obj` (picklable), in every process."""
        if self.size == 1:
            return obj
        box = [obj]
        self._dist().broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, in every process."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        self._dist().all_gather_object(out, obj)
        return out

    def take(self, n: int) -> range:
        """This process's items of `n` equal-cost work items (evaluation batches, decoding
        chunks): every size-th one from its rank on. Taken round robin because the items come
        sorted by length (decoding), so each process gets a similar mix of long and short ones.
        The items are those one process makes, so each is computed exactly as one process
        computes it (same rows, same padding)."""
        return range(self.rank, n, self.size) if self.split else range(n)

    def merge(self, mine: dict[int, Any]) -> dict[int, Any]:
        """The results {item: value} of every process's items, in every process."""
        if self.size == 1 or not self.split:
            return dict(mine)
        out: dict[int, Any] = {}
        for part in self.gather(mine):
            out.update(part)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            self._dist().barrier()
