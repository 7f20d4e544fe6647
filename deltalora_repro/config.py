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


def claim_gpu(count: int, preferred: int, lock_dir: Path, ids: list[str] | None = None) -> int:
    """Claim one of `count` GPUs for this process, for as long as it lives; return its index.

    launch=gpus runs N jobs at a time on N GPUs, but a free worker takes the next job whatever
    GPU the job's number would give, so `job number mod N` can put two jobs on one GPU while
    another idles. Instead each job process takes an exclusive lock (fcntl.flock, freed by the OS
    when the process ends, even killed) on the first free GPU, starting at `preferred`; the
    launcher's worker processes are reused, and one keeps its GPU for its next job. With every
    GPU taken (more jobs at once than GPUs, hydra.launcher.n_jobs, or another sweep of this user
    on the same GPUs) the job shares the preferred GPU, unlocked, and says so: never a wait on a
    worker that holds its lock until the sweep ends. `ids` name the lock files (the GPUs' UUIDs:
    sweeps with different CUDA_VISIBLE_DEVICES still meet)."""
    import fcntl
    import logging
    global _CLAIMED
    if _CLAIMED is not None:
        return _CLAIMED[0]
    ids = ids or [str(i) for i in range(count)]
    lock_dir.mkdir(parents=True, exist_ok=True)
    for i in [(preferred + k) % count for k in range(count)]:
        f = open(lock_dir / f"gpu-{ids[i]}.lock", "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        _CLAIMED = (i, f)
        return i
    logging.getLogger(__name__).warning(
        "launch=gpus: all %d GPUs are held by other jobs (more jobs at once than GPUs, or another "
        "sweep); this job shares GPU %d", count, preferred)
    _CLAIMED = (preferred, None)
    return preferred


_CLAIMED: tuple[int, Any] | None = None   # (GPU index, its open lock file or None) of this process


def _job_device() -> str:
    """launch=gpus: this sweep job's GPU (resolved in the job's own process): a free one, claimed
    for the process (claim_gpu), starting at job number mod the GPUs; the CPU on a machine
    without GPUs."""
    import tempfile

    import torch
    from hydra.core.hydra_config import HydraConfig
    if not torch.cuda.is_available():
        return "cpu"
    count = torch.cuda.device_count()
    ids = [str(getattr(torch.cuda.get_device_properties(i), "uuid", i)) for i in range(count)]
    lock_dir = Path(os.environ.get("DELTALORA_GPU_LOCKS",
                                   Path(tempfile.gettempdir()) / f"deltalora-gpus-{os.getuid()}"))
    return f"cuda:{claim_gpu(count, HydraConfig.get().job.num % count, lock_dir, ids)}"


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
