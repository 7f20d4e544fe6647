"""Shared helpers: compose the real Hydra config and shrink it to a CPU-sized run."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from deltalora_repro.build import build as build_run
from deltalora_repro.config import compose
from deltalora_repro.train import Trainer
from deltalora_repro.world import World

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "deltalora_repro" / "configs"
# The shared data beside the checkout; DELTALORA_TEST_DATA points elsewhere (e.g. the GPU machine).
DATA = Path(os.environ.get("DELTALORA_TEST_DATA", ROOT.parent / "shared" / "data")).resolve()
GLUE = DATA / "glue"

def java_available() -> bool:
    """A Java runtime for the METEOR / PTB-tokenizer jars."""
    from deltalora_repro.metrics import java
    try:
        java.java_executable()
    except java.MetricToolError:
        return False
    return True


needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason=f"GLUE data not found at {GLUE}")


def child_env(**extra: str) -> dict:
    """The environment of a command a test starts: this checkout first on the import path, and
    whatever path the test run itself has after it (a machine whose packages sit in a folder of
    their own keeps them)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}


def signal_at(monkeypatch, step: int, signum: int) -> None:
    """Deliver a real signal to this process right after optimizer step `step` (a scheduler's
    notice arriving mid-run)."""
    from deltalora_repro import train
    original = train.Trainer.train_step

    def train_step(self, micro_batches):
        loss = original(self, micro_batches)
        if self.step == step:
            os.kill(os.getpid(), signum)
        return loss
    monkeypatch.setattr(train.Trainer, "train_step", train_step)


def make_cfg(*overrides: str, tmp_path: Path | None = None):
    """The composed config, as the command line would build it, plus the given overrides."""
    cfg = compose(*overrides)
    with open_dict(cfg):
        if tmp_path is not None:
            cfg.output_dir = str(tmp_path / "out")
            cfg.results_dir = str(tmp_path / "results")
        cfg.experiment_name = None
    return cfg


SMALL = ["data_dir=" + str(GLUE), "task=glue/rte", "task.train_max_examples=48",
         "task.eval_max_examples=32", "task.max_length=48", "train.batch_size=8", "device=cpu",
         "train.log_every=1000", "train.epochs=1", "train.checkpoint=false"]


def build(cfg, device: str = "cpu", precision: str = "fp32"):
    """(task, model, method, trainer) for a config, built by the run's own build()."""
    b = build_run(cfg)
    model = b.model.to(device)
    tcfg = OmegaConf.merge(cfg.train, {"precision": precision})
    trainer = Trainer(model, b.method, b.task, tcfg, World.single(device), cfg.seed, b.total_steps)
    return b.task, model, b.method, trainer
