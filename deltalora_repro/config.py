"""The package's Hydra configs, composed outside a Hydra application (the benchmark, the tables'
protocol check, tests): the same files and defaults as `python -m deltalora_repro`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def compose(*overrides: str, hydra_node: bool = False) -> Any:
    """The config a run with these command-line overrides composes (not resolved: interpolations
    stay live, as in a run). hydra_node: keep the `hydra` node (an experiment's sweep)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    # May be asked for inside a running Hydra app (tables rendered from a sweep's callback, a
    # test): compose in a fresh instance and put the caller's back afterwards.
    outer = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides), return_hydra_config=hydra_node)
    finally:
        restore_gh_from_backup(outer)
