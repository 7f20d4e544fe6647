"""What a run shows while it runs: the TensorBoard log holds the same numbers as the run record and
the log lines, progress bars follow train.progress, and the training loop reads nothing back
from the device between log points."""
from __future__ import annotations

import logging
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deltalora_repro import train as train_module
from deltalora_repro.errors import ConfigError
from deltalora_repro.progress import progress_bars
from deltalora_repro.run import run

from .conftest import SMALL, build, make_cfg, needs_glue

pytestmark = needs_glue

LOG_LINE = re.compile(r"step (\d+)/\d+ epoch \d+ loss ([-\d.]+) lr ([-\d.e+]+)")


def small_cfg(tmp_path, *extra):
    return make_cfg("model=tiny-roberta", *SMALL, *extra, tmp_path=tmp_path)


def read_board(folder):
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_records_metrics_and_the_logged_losses(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="deltalora_repro.train")
    # 48 examples / batch 8 = 6 steps an epoch; a log point every 2 steps.
    record = run(small_cfg(tmp_path, "method=delta-lora", "train.epochs=2", "train.log_every=2"))
    board = read_board(tmp_path / "out" / "tensorboard")

    evals = record["metrics"]["evals"]
    assert [e["step"] for e in evals] == [6, 12]
    metric_keys = {k for e in evals for k in e if k not in ("epoch", "step")}
    assert metric_keys and {f"eval/{k}" for k in metric_keys} <= set(board)
    for key in metric_keys:
        # Event files store float32.
        assert board[f"eval/{key}"] == [(e["step"], pytest.approx(e[key], rel=1e-6)) for e in evals]

    logged = [LOG_LINE.search(r.getMessage()) for r in caplog.records]
    logged = [(int(m[1]), float(m[2]), float(m[3])) for m in logged if m]
    assert [s for s, _, _ in logged] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in board["train/loss"]] == [2, 4, 6, 8, 10, 12]
    for (step, loss, lr), (_, tb_loss), (_, tb_lr) in zip(logged, board["train/loss"], board["train/lr"]):
        assert round(tb_loss, 4) == pytest.approx(loss, abs=1e-4)     # the line prints %.4f
        assert tb_lr == pytest.approx(lr, rel=5e-3)                    # the line prints %.2e
    # tokens/s: tokens of the last log_every steps over their wall time; positive and finite.
    assert [s for s, _ in board["train/tokens_per_s"]] == [2, 4, 6, 8, 10, 12]
    assert all(0 < v < float("inf") for _, v in board["train/tokens_per_s"])


def test_tensorboard_off_writes_nothing(tmp_path):
    run(small_cfg(tmp_path, "train.tensorboard=false"))
    assert (tmp_path / "out" / "run.json").is_file()
    assert not (tmp_path / "out" / "tensorboard").exists()
    assert not list((tmp_path / "out").rglob("events.out.tfevents.*"))


def test_the_writer_is_closed_when_training_fails(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter
    closed = []
    real_close = SummaryWriter.close
    monkeypatch.setattr(SummaryWriter, "close", lambda self: (closed.append(self), real_close(self)))

    def broken_step(self, micro_batches):
        if self.step == 2:
            raise RuntimeError("boom")
        return real_step(self, micro_batches)

    real_step = train_module.Trainer.train_step
    monkeypatch.setattr(train_module.Trainer, "train_step", broken_step)
    with pytest.raises(RuntimeError, match="boom"):
        run(small_cfg(tmp_path, "train.log_every=1"))
    assert len(closed) == 1
    # What was logged before the failure is on disk and readable.
    assert [s for s, _ in read_board(tmp_path / "out" / "tensorboard")["train/loss"]] == [1, 2]


def test_a_resumed_run_continues_the_curves_without_the_lost_steps(tmp_path, monkeypatch):
    """Crash after step 8, resume in the same folder from the epoch-1 checkpoint (step 6): the
    log holds each step once, the same as a run straight through (resume is exact)."""
    args = ("method=delta-lora", "method.start_steps=2", "train.epochs=2", "train.log_every=1",
            "train.checkpoint=true")
    run(small_cfg(tmp_path / "a", *args))
    straight = read_board(tmp_path / "a" / "out" / "tensorboard")

    real_step = train_module.Trainer.train_step

    def crash_after_step_8(self, micro_batches):
        if self.step == 8:
            raise RuntimeError("simulated crash")
        return real_step(self, micro_batches)

    with monkeypatch.context() as m:
        m.setattr(train_module.Trainer, "train_step", crash_after_step_8)
        with pytest.raises(RuntimeError, match="simulated"):
            run(small_cfg(tmp_path / "b", *args))
    out = tmp_path / "b" / "out"
    assert [s for s, _ in read_board(out / "tensorboard")["train/loss"]] == list(range(1, 9))
    run(small_cfg(tmp_path / "b", *args, f"resume={out}"))
    resumed = read_board(out / "tensorboard")
    assert [s for s, _ in resumed["train/loss"]] == list(range(1, 13))
    for tag in ("train/loss", "train/lr", "eval/accuracy"):
        assert resumed[tag] == straight[tag], tag


@pytest.mark.parametrize("key, value", [("train.progress", "sometimes"),
                                        ("train.tensorboard", "maybe")])
def test_bad_switches_are_config_errors(tmp_path, key, value):
    with pytest.raises(ConfigError, match=re.escape(key)) as err:
        run(small_cfg(tmp_path, f"{key}={value}"))
    assert ("auto, true, false" if key == "train.progress" else "true or false") in str(err.value)
    assert not (tmp_path / "out").exists()          # refused before anything ran


def _fit_stderr(capsys, tmp_path, choice):
    cfg = small_cfg(tmp_path, "train.max_steps=3", "train.tensorboard=false")
    _, _, _, trainer = build(cfg)
    capsys.readouterr()
    with progress_bars(choice):
        trainer.fit()
    return capsys.readouterr().err


def test_progress_bars_only_on_a_terminal_or_when_forced(tmp_path, capsys):
    # Under pytest stderr is captured, not a terminal: auto shows nothing, as does false.
    for choice in ("auto", False):
        err = _fit_stderr(capsys, tmp_path / str(choice), choice)
        assert "train:" not in err and "step/s" not in err and "eval" not in err, err
    forced = _fit_stderr(capsys, tmp_path / "forced", True)
    assert "train:" in forced and "/3 [" in forced and "step/s" in forced   # optimizer steps
    assert "eval validation" in forced                                     # evaluation batches


def test_no_host_synchronisation_between_log_points(tmp_path, monkeypatch):
    """Every way of reading a tensor back to the host is counted during the training steps,
    except reading the collated batches (host tensors already) and AdamW's step counters (kept
    on the host by torch by design). Zero between log points; the log points themselves are
    seen, so the counter is not blind."""
    def count_reads(log_every):
        cfg = small_cfg(tmp_path / str(log_every), "method=delta-lora", "method.start_steps=0",
                        "train.max_steps=5", f"train.log_every={log_every}",
                        "train.tensorboard=false")
        task, _, _, trainer = build(cfg)
        host = set()                     # ids of tensors that live on the host by design
        keep = []                        # keep them alive, so their ids stay theirs
        collate = task.collate

        def marking_collate(examples):
            batch = collate(examples)
            keep.extend(batch.values())
            host.update(id(v) for v in batch.values())
            return batch

        monkeypatch.setattr(task, "collate", marking_collate)
        counting, reads = [False], []
        real_step = train_module.Trainer.train_step

        def step(self, micro_batches):
            counting[0] = True
            out = real_step(self, micro_batches)
            if self.step == self.total_steps:
                counting[0] = False      # the epoch end's evaluation reads back, as it should
            return out

        def optimizer_steps():
            return {id(s["step"]) for s in trainer.optimizer.state.values() if "step" in s}

        with monkeypatch.context() as m:
            m.setattr(train_module.Trainer, "train_step", step)
            for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
                real = getattr(torch.Tensor, name)

                def patched(self, *a, _real=real, _name=name, **k):
                    if counting[0] and id(self) not in host and id(self) not in optimizer_steps():
                        reads.append(_name)
                    return _real(self, *a, **k)

                m.setattr(torch.Tensor, name, patched)
            trainer.fit()
        assert trainer.step == 5
        return reads

    assert count_reads(log_every=100) == []
    # Log points at steps 2 and 4: the divergence flag and the mean loss are read there.
    at_log_points = count_reads(log_every=2)
    assert at_log_points.count("item") == 2 and at_log_points.count("__bool__") == 2, at_log_points
