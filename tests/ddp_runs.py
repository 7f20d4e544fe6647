"""Runs the same tiny jobs in every process of a torchrun launch (or in one process), for
tests/test_distributed.py:  torchrun --nproc_per_node N tests/ddp_runs.py OUT NAME=OVERRIDES ...

Each NAME=OVERRIDES (overrides joined by '|') is one run, written under OUT/NAME. Not a test file:
the tests launch it."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deltalora_repro.config import compose  # noqa: E402
from deltalora_repro.run import run  # noqa: E402


def main(out: str, jobs: list[str]) -> None:
    for job in jobs:
        name, _, overrides = job.partition("=")
        # -- interrupted runs (tests/test_fsdp.py) ---------------------------------------------
        # A job named NAME@STEP gets a real SIGTERM in every process after optimizer step STEP
        # and stops there with a checkpoint (written into OUT/NAME, which a later job resumes).
        name, _, stop = name.partition("@")
        cfg = compose(*overrides.split("|"), f"output_dir={out}/{name}",
                      f"results_dir={out}/{name}-results")
        if stop:
            _run_until_sigterm(cfg, int(stop))
            continue
        run(cfg)


def _run_until_sigterm(cfg, step: int) -> None:
    import os
    import signal

    from deltalora_repro import train
    from deltalora_repro.train import TrainingInterrupted

    original = train.Trainer.train_step

    def train_step(self, micro_batches):
        loss = original(self, micro_batches)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss
    train.Trainer.train_step = train_step
    try:
        run(cfg)
    except TrainingInterrupted:
        pass
    else:
        raise RuntimeError(f"the run was not interrupted after step {step}")
    finally:
        train.Trainer.train_step = original


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
