"""Which process this is and how many take part: the one object that knows.

Every part of a run that will differ between one process and many (which device, who writes
files, how batches, evaluation and decoding are shared) reads it from here, handed down from the
start of the run. One process today: `World.single(device)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int                 # this process among all of them (0 .. size - 1)
    size: int                 # processes taking part
    local_rank: int           # this process among those on its machine (picks its GPU)
    device: torch.device

    @property
    def is_main(self) -> bool:
        """The process that writes the run's folder, record and checkpoints."""
        return self.rank == 0

    @classmethod
    def single(cls, device: torch.device | str) -> "World":
        return cls(rank=0, size=1, local_rank=0, device=torch.device(device))

    def describe(self) -> dict:
        """For the run record."""
        return {"rank": self.rank, "size": self.size, "device": str(self.device)}
