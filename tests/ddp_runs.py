"""Runs the same tiny jobs in every process of a torchrun launch (or in one process), for
tests/test_distributed.py:  torchrun --nproc_per_node N tests/ddp_runs.py OUT NAME=OVERRIDES ...

Each NAME=OVERRIDES (overrides joined by '|') is one run, written under OUT/NAME. A NAME of the
form NAME@S is stopped by a SIGTERM to the main process after optimizer step S (as a scheduler's
notice would): the processes agree to stop, checkpoint and end. Not a test file: the tests launch
it."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import os  # noqa: E402
import signal  # noqa: E402

from deltalora_repro import train  # noqa: E402
from deltalora_repro.config import compose  # noqa: E402
from deltalora_repro.run import run  # noqa: E402

_train_step = train.Trainer.train_step


def main(out: str, jobs: list[str]) -> None:
    for job in jobs:
        name, _, overrides = job.partition("=")
        name, _, stop = name.partition("@")
        cfg = compose(*overrides.split("|"), f"output_dir={out}/{name}",
                      f"results_dir={out}/{name}-results")
        if not stop:
            run(cfg)
            continue

        def train_step(self, micro_batches, at=int(stop)):
            loss = _train_step(self, micro_batches)
            if self.step == at and self.world.is_main:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss
        train.Trainer.train_step = train_step
        try:
            run(cfg)
            raise SystemExit(f"{name}: the run was not stopped at step {stop}")
        except train.TrainingInterrupted:
            pass
        finally:
            train.Trainer.train_step = _train_step


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
