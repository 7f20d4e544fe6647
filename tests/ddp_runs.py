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
        cfg = compose(*overrides.split("|"), f"output_dir={out}/{name}",
                      f"results_dir={out}/{name}-results")
        run(cfg)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
