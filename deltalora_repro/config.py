"""The package's Hydra configs, composed outside a Hydra application (the benchmark, the tables'
protocol check, tests): the same files and defaults as `python -m deltalora_repro`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from . import records

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Resolvers of the config files, registered wherever a config is composed (`python -m
# deltalora_repro` imports this module too). deltalora_run_id: a fresh run id each time Hydra
# resolves a run folder (hydra.run.dir, hydra.sweep.subdir); the run takes its id back from the
# folder's name.
if not OmegaConf.has_resolver("deltalora_run_id"):
    OmegaConf.register_new_resolver("deltalora_run_id", records.new_run_id)


def _gpu_count() -> int:
    """GPUs of this machine, 1 without any (launch=gpus: jobs at once). Counted without torch,
    which the launching process does not load: CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(1, len([d for d in visible.split(",") if d.strip()]))
    import shutil
    import subprocess
    if shutil.which("nvidia-smi") is None:
        return 1
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return max(1, sum(line.startswith("GPU ") for line in done.stdout.splitlines()))


def _job_device() -> str:
    """launch=gpus: this sweep job's GPU, job number mod the GPUs (resolved in the job's own
    process); the CPU on a machine without GPUs."""
    import torch
    from hydra.core.hydra_config import HydraConfig
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{HydraConfig.get().job.num % torch.cuda.device_count()}"


for _name, _fn in (("deltalora_gpu_count", _gpu_count), ("deltalora_job_device", _job_device)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


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
