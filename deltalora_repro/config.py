"""The package's Hydra configs, composed outside a Hydra application (the benchmark, the tables'
protocol check, tests): the same files and defaults as `python -m deltalora_repro`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def compose(*overrides: str) -> Any:
    """The composed config for these command-line overrides (not resolved: interpolations stay
    live, as in a run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))
