"""A run whose loss becomes inf or NaN stops loudly: status diverged, a non-zero exit, a message
naming the steps, and its last checkpoint is the last good one (never one written after it)."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from deltalora_repro import checkpoint
from deltalora_repro import train as train_module
from deltalora_repro.run import run
from deltalora_repro.train import TrainingDiverged

from .conftest import GLUE, ROOT, SMALL, make_cfg, needs_glue

pytestmark = needs_glue


def cfg_of(tmp_path, *extra):
    return make_cfg("model=tiny-roberta", *SMALL, "train.checkpoint=true", "train.epochs=2",
                    "method=delta-lora", "method.start_steps=0", *extra, tmp_path=tmp_path)


def assert_good_checkpoint(out, step):
    ckpt = checkpoint.read(out)
    assert ckpt.step == step
    state = ckpt.load_state(torch.device("cpu"))
    floats = [t for t in state["model"].values() if t.is_floating_point()]
    assert floats and all(bool(torch.isfinite(t).all()) for t in floats)


def test_injected_inf_loss_is_diverged_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    # 6 steps per epoch; checkpoints (and flag readings) every 2 steps and at epoch ends.
    bad = random.Random(7).randint(3, 11)
    original = train_module.Trainer.train_step

    def train_step(self, micro_batches):
        if self.step + 1 == bad:            # this optimizer step's loss is inf
            loss_fn = self.loss_fn
            self.loss_fn = lambda model, batch: loss_fn(model, batch) * float("inf")
            try:
                return original(self, micro_batches)
            finally:
                self.loss_fn = loss_fn
        return original(self, micro_batches)
    monkeypatch.setattr(train_module.Trainer, "train_step", train_step)
    with pytest.raises(TrainingDiverged) as info:
        run(cfg_of(tmp_path, "train.checkpoint_every=2"))
    first, last = info.value.first_step, info.value.last_step
    # The flag is read at the first checkpoint point at or after the bad step.
    assert first <= bad <= last and last == bad + bad % 2 and last - first <= 1
    assert re.fullmatch(r"training diverged: the loss became non-finite "
                        r"(between optimizer steps \d+ and \d+|at optimizer step \d+)",
                        str(info.value))
    (path,) = (tmp_path / "results").rglob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "diverged" and str(info.value) == record["error"]
    good = bad - 1 - (bad - 1) % 2          # the last even step before the bad one
    assert record["last_good_checkpoint"]["step"] == good
    assert_good_checkpoint(tmp_path / "out", good)
    assert "metrics" not in record and not (tmp_path / "out" / "weights.safetensors").exists()


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    """A NaN in the weights with a finite loss (it shows only in the next step's loss): the
    checkpoint at that step is refused and the run is diverged."""
    original = train_module.Trainer.train_step

    def train_step(self, micro_batches):
        loss = original(self, micro_batches)
        if self.step == 4:
            with torch.no_grad():
                next(p for n, p in self.model.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
        return loss
    monkeypatch.setattr(train_module.Trainer, "train_step", train_step)
    with pytest.raises(TrainingDiverged, match=r"non-finite values in model/\S*lora_B\S* though the "
                                               r"loss was finite, between optimizer steps 3 and 4"):
        run(cfg_of(tmp_path, "train.checkpoint_every=2"))
    assert_good_checkpoint(tmp_path / "out", 2)


def test_cli_lr_1e30_exits_3_with_one_line(tmp_path):
    args = [a for a in SMALL if not a.startswith(("data_dir", "train.checkpoint"))]
    out = subprocess.run(
        [sys.executable, "-m", "deltalora_repro", "model=tiny-roberta", *args, f"data_dir={GLUE}",
         "method=delta-lora", "train.lr=1e30", "train.checkpoint=true", "train.checkpoint_every=1",
         f"output_dir={tmp_path / 'out'}", f"results_dir={tmp_path / 'res'}",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=300)
    assert out.returncode == 3, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged: the loss became non-finite" in errors[0]
    assert "Traceback" not in out.stderr
    (path,) = (tmp_path / "res").rglob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "diverged"
    step = record["last_good_checkpoint"]["step"]
    assert step < int(re.search(r"(\d+)$", errors[0]).group(1))
    assert_good_checkpoint(tmp_path / "out", step)
