"""Sweeps through Hydra's launcher plugins: launch=gpus runs a sweep's jobs side by side (the
joblib launcher, each job a process of its own, job k on GPU k mod N)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from deltalora_repro.config import compose

from .conftest import GLUE, ROOT, needs_glue

TINY = ["model=tiny-roberta", "task=glue/rte", f"data_dir={GLUE}", "task.train_max_examples=24",
        "task.eval_max_examples=16", "task.max_length=48", "train.batch_size=8", "train.epochs=1",
        "train.checkpoint=false", "train.progress=false", "train.tensorboard=false",
        "method=lora", "save_weights=false"]


def test_launch_gpus_composes_the_joblib_launcher_with_one_job_per_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    cfg = compose("launch=gpus", hydra_node=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert launcher.n_jobs == 3 and launcher.backend == "loky"
    assert cfg._get_node("device")._value() == "${deltalora_job_device:}"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert compose("launch=gpus", hydra_node=True).hydra.launcher.n_jobs == 1


def _sweep(tmp_path: Path, name: str, *extra: str) -> tuple[list[dict], str]:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "deltalora_repro", "-m", *TINY, "device=cpu", "seed=0,1",
           f"results_dir={out / 'results'}", f"hydra.sweep.dir={out / 'multirun'}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    records = [json.loads(p.read_text()) for p in (out / "results").rglob("records/**/*.json")]
    return sorted(records, key=lambda r: r["seed"]), done.stdout + done.stderr


@needs_glue
def test_a_sweep_through_the_joblib_launcher_runs_its_jobs_side_by_side(tmp_path):
    side_by_side, log = _sweep(tmp_path, "joblib", "launch=gpus", "hydra.launcher.n_jobs=2")
    one_by_one, basic_log = _sweep(tmp_path, "basic")
    assert "Joblib.Parallel(n_jobs=2" in log and "Joblib" not in basic_log
    assert [r["seed"] for r in side_by_side] == [0, 1] and all(r["status"] == "completed"
                                                             for r in side_by_side)
    # The launcher changes where jobs run, not what they compute.
    for x, y in zip(side_by_side, one_by_one, strict=True):
        assert x["metrics"]["final"] == y["metrics"]["final"]
