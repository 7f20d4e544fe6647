"""Checkpoints and resume: a run stopped by SIGTERM or killed ends, once resumed, exactly where an
uninterrupted run ends; damaged, foreign or mismatched checkpoints are refused before the model
loads; checkpoints hold no pickle."""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from deltalora_repro import checkpoint
from deltalora_repro import build as build_module
from deltalora_repro.errors import ConfigError
from deltalora_repro.run import run
from deltalora_repro.train import TrainingInterrupted

from .conftest import GLUE, ROOT, SMALL, make_cfg, needs_glue, signal_at

pytestmark = needs_glue

# 48 examples in batches of 8: 6 optimizer steps per epoch, 12 in the run.
STEPS_PER_EPOCH, EPOCHS = 6, 2
RNG = random.Random(20240917)      # the interrupted step is drawn, with a fixed seed


def cfg_of(tmp_path, *extra):
    return make_cfg("model=tiny-roberta", *SMALL, "train.checkpoint=true",
                    f"train.epochs={EPOCHS}", *extra, tmp_path=tmp_path)


def sigterm_at(monkeypatch, step: int) -> None:
    """Deliver a real SIGTERM to this process right after optimizer step `step`."""
    signal_at(monkeypatch, step, signal.SIGTERM)


def record_of(tmp_path) -> dict:
    (path,) = (tmp_path / "results" / "records").rglob("*.json")
    return json.loads(path.read_text())


def assert_same_weights(a_dir, b_dir):
    a, b = load_file(str(a_dir / "weights.safetensors")), load_file(str(b_dir / "weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


METHODS = {
    "delta-lora-explicit": ("method=delta-lora", "method.start_steps=2", "method.update=explicit"),
    "delta-lora-deferred": ("method=delta-lora", "method.start_steps=2", "method.update=deferred"),
    "adalora": ("method=adalora",),
}


@pytest.mark.parametrize("name", [
    "delta-lora-explicit",
    pytest.param("delta-lora-deferred", marks=pytest.mark.slow),
    pytest.param("adalora", marks=pytest.mark.slow),
])
def test_sigterm_mid_epoch_then_resume_is_bit_identical(tmp_path, monkeypatch, name):
    args = METHODS[name]
    # A step inside an epoch (not its last): the resume must redraw that epoch's order and skip
    # the steps already done.
    step = RNG.choice([s for s in range(1, STEPS_PER_EPOCH * EPOCHS) if s % STEPS_PER_EPOCH])
    straight = run(cfg_of(tmp_path / "a", *args))

    with monkeypatch.context() as m:
        sigterm_at(m, step)
        with pytest.raises(TrainingInterrupted) as info:
            run(cfg_of(tmp_path / "b", *args))
    assert info.value.exit_code == 143 and info.value.step == step
    stopped = record_of(tmp_path / "b")
    assert stopped["status"] == "interrupted"
    assert stopped["checkpoint"]["step"] == step
    # The handler is gone once run() returns: SIGTERM is back to its default.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    resumed = run(cfg_of(tmp_path / "c", *args, f"resume={tmp_path / 'b' / 'out'}"))
    assert resumed["resumed_from"]["step"] == step
    assert resumed["resumed_from"]["position"] == step % STEPS_PER_EPOCH
    assert resumed["resumed_from"]["epoch"] == step // STEPS_PER_EPOCH
    assert resumed["metrics"]["evals"] == straight["metrics"]["evals"]
    assert_same_weights(tmp_path / "a" / "out", tmp_path / "c" / "out")


def test_checkpoint_every_and_files_hold_no_pickle(tmp_path, monkeypatch):
    """train.checkpoint_every=4 writes at steps 4 and 8 (and epoch ends 6, 12); the files are one
    JSON document and one safetensors file; resuming loads with every unpickler disabled."""
    written = []
    original = checkpoint.save

    def spy(state, directory, info):
        written.append(state["step"])
        return original(state, directory, info)
    monkeypatch.setattr(checkpoint, "save", spy)
    sigterm_at(monkeypatch, 7)
    with pytest.raises(TrainingInterrupted):
        run(cfg_of(tmp_path / "b", "method=delta-lora", "train.checkpoint_every=4"))
    assert written == [4, 6, 7]
    out = tmp_path / "b" / "out"
    files = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint"))
    assert len(files) == 2 and files[0] == "checkpoint-00000007-" + files[0][20:]
    assert files[0].endswith(".safetensors") and files[1] == "checkpoint.json"
    doc = json.loads((out / "checkpoint.json").read_text())
    assert doc["state"]["step"] == 7 and doc["state"]["position"] == 1
    assert doc["config"]["method"]["name"] == "delta-lora"
    raw = (out / files[0]).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])         # the safetensors layout, not a pickle
    assert any(k.startswith("/model/") for k in header)
    assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[:2]   # zip / pickle magic

    def refuse(*a, **k):
        raise AssertionError("a checkpoint must not be unpickled")
    monkeypatch.undo()
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    resumed = run(cfg_of(tmp_path / "c", "method=delta-lora", f"resume={out}"))
    assert resumed["status"] == "completed" and resumed["resumed_from"]["step"] == 7


def test_resume_with_changed_settings_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    run(cfg_of(tmp_path / "a", "method=lora", "train.epochs=1"))
    out = tmp_path / "a" / "out"

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded")
    with monkeypatch.context() as m:
        m.setattr(build_module, "load_backbone", no_model)
        with pytest.raises(ConfigError) as info:
            run(cfg_of(tmp_path / "b", "method=lora", "train.epochs=3", "train.lr=1e-3", "seed=1",
                       f"resume={out}"))
        message = str(info.value)
        assert "\n" not in message
        # RTE's paper lr is 4e-4 (configs/task/glue/rte.yaml).
        for part in ("train.lr: checkpoint 0.0004, now 0.001", "seed: checkpoint 0, now 1",
                     "train.epochs: checkpoint 1, now 3"):
            assert part in message, message
        with pytest.raises(ConfigError, match=r"model\.name: checkpoint 'tiny-roberta', now 'tiny-gpt2'"):
            run(make_cfg("model=tiny-gpt2", *SMALL, "train.epochs=1", "method=lora",
                         f"resume={out}", tmp_path=tmp_path / "c"))
        with pytest.raises(ConfigError, match=r"method\.name: checkpoint 'lora', now 'delta-lora'"):
            run(cfg_of(tmp_path / "d", "method=delta-lora", "train.epochs=1", f"resume={out}"))
    # Allowed: the evaluation batch size (and locations, logging); kept in the record.
    resumed = run(cfg_of(tmp_path / "e", "method=lora", "train.epochs=1",
                         "train.eval_batch_size=7", f"resume={out}"))
    assert resumed["resumed_from"]["config_changes"]["train.eval_batch_size"] == \
        {"checkpoint": 256, "now": 7}


def _damage(out, how):
    index = out / "checkpoint.json"
    (tensors,) = out.glob("checkpoint-*.safetensors")
    if how == "json-random":
        index.write_bytes(random.Random(1).randbytes(4000))
    elif how == "json-truncated":
        index.write_bytes(index.read_bytes()[:1000])
    elif how == "tensors-truncated":
        tensors.write_bytes(tensors.read_bytes()[:50_000])
    elif how == "tensors-random":          # the same size, so only the header can tell
        tensors.write_bytes(random.Random(2).randbytes(tensors.stat().st_size))
    elif how == "pickle":                   # an older checkpoint.pt, which is never unpickled
        index.unlink()
        (out / "checkpoint.pt").write_bytes(pickle.dumps({"step": 1}))


DAMAGE = {"json-random": "not JSON", "json-truncated": "not JSON",
          "tensors-truncated": "truncated or overwritten",
          "tensors-random": "is not a safetensors file", "pickle": "is a pickle"}


def test_damaged_checkpoints_are_one_line_errors_before_the_model_loads(tmp_path, monkeypatch):
    run(cfg_of(tmp_path / "a", "method=lora", "train.epochs=1"))
    pristine = {p.name: p.read_bytes() for p in (tmp_path / "a" / "out").iterdir()
                if p.is_file()}              # not the tensorboard/ folder
    monkeypatch.setattr(build_module, "load_backbone",
                        lambda *a, **k: pytest.fail("the model must not be loaded"))
    for how, expected in DAMAGE.items():
        out = tmp_path / how
        out.mkdir()
        for name, data in pristine.items():
            (out / name).write_bytes(data)
        _damage(out, how)
        with pytest.raises(ConfigError) as info:
            run(cfg_of(tmp_path / f"r-{how}", "method=lora", "train.epochs=1", f"resume={out}"))
        assert expected in str(info.value) and "\n" not in str(info.value), (how, info.value)


def test_cli_random_checkpoint_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "checkpoint.json").write_bytes(random.Random(3).randbytes(3000))
    out = _cli(tmp_path, "method=lora", f"resume={bad}")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "not JSON" in out.stderr


def test_atomic_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A crash while the new tensors are written, or before checkpoint.json names them, leaves
    the previous checkpoint complete and loadable."""
    info = {"config": {}, "precision": "fp32"}
    checkpoint.save({"step": 1, "w": torch.ones(3)}, tmp_path, info)

    def crash(tensors, path):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError):
        checkpoint.save({"step": 2, "w": torch.full((3,), 2.0)}, tmp_path, info)
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint, "write_json_atomic",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        checkpoint.save({"step": 3, "w": torch.full((3,), 3.0)}, tmp_path, info)
    ckpt = checkpoint.read(tmp_path)
    assert ckpt.step == 1
    assert torch.equal(ckpt.load_state(torch.device("cpu"))["w"], torch.ones(3))


def test_state_round_trips_exactly():
    """Tuples, int-keyed dicts, tied tensors, RNG bytes and 0-dim tensors come back as they were."""
    w = torch.randn(4, 3)
    state = {"model": {"a.weight": w, "tied.weight": w}, "opt": {0: {"step": torch.tensor(5.0)}},
             "betas": (0.9, 0.999), "rng": torch.get_rng_state(), "none": None, "lst": [1, "x"]}
    tensors: dict = {}
    plain = checkpoint._encode(state, tensors, "", {})
    assert len(tensors) == 3                      # the tied weight is stored once
    back = checkpoint._decode(json.loads(json.dumps(plain)), tensors, torch.device("cpu"))
    assert back["betas"] == (0.9, 0.999) and list(back["opt"]) == [0]
    assert torch.equal(back["model"]["tied.weight"], w) and back["opt"][0]["step"].item() == 5.0
    assert torch.equal(back["rng"], state["rng"]) and back["lst"] == [1, "x"]
    with pytest.raises(TypeError, match="cannot checkpoint a object at /bad"):
        checkpoint._encode({"bad": object()}, {}, "", {})


def _cli(tmp_path, *args, popen=False):
    argv = [sys.executable, "-m", "deltalora_repro", "model=tiny-roberta", *SMALL[1:],
            f"data_dir={GLUE}", f"output_dir={tmp_path / 'out'}", f"results_dir={tmp_path / 'res'}",
            f"hydra.run.dir={tmp_path / 'hydra'}", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if popen:
        log = open(tmp_path / "log.txt", "w")
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _wait_for_checkpoint(proc, out, min_step, timeout=240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        index = out / "checkpoint.json"
        if index.is_file():
            try:
                if json.loads(index.read_text())["state"]["step"] >= min_step:
                    return
            except (json.JSONDecodeError, KeyError):
                pass
        assert proc.poll() is None, "the run ended before it was killed"
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no checkpoint in time")


LONG = ("method=delta-lora", "task.train_max_examples=2400", "train.log_every=1",
        "train.checkpoint=true", "train.checkpoint_every=5")


def test_kill_9_loses_at_most_checkpoint_every_steps(tmp_path):
    proc = _cli(tmp_path, *LONG, popen=True)
    _wait_for_checkpoint(proc, tmp_path / "out", 10)
    time.sleep(RNG.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    logged = [int(s) for s in re.findall(r"step (\d+)/\d+ epoch", (tmp_path / "log.txt").read_text())]
    ckpt = checkpoint.read(tmp_path / "out")
    assert 10 <= ckpt.step <= max(logged)
    assert max(logged) - ckpt.step <= 5, (max(logged), ckpt.step)
    state = ckpt.load_state(torch.device("cpu"))
    assert state["step"] == ckpt.step and state["position"] == ckpt.step  # epoch 1 has 300 steps
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


@pytest.mark.slow
def test_cli_sigterm_exits_143_and_resumes(tmp_path):
    proc = _cli(tmp_path, *LONG, "train.max_steps=40", popen=True)
    _wait_for_checkpoint(proc, tmp_path / "out", 5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    (record,) = (tmp_path / "res").rglob("*.json")
    record = json.loads(record.read_text())
    assert record["status"] == "interrupted"
    ckpt = checkpoint.read(tmp_path / "out")
    assert ckpt.step == record["checkpoint"]["step"] >= 5
    resumed = _cli(tmp_path / "r", *LONG, "train.max_steps=40", f"resume={tmp_path / 'out'}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("update", ["explicit", "deferred"])
def test_graph_path_sigterm_and_resume_on_gpu(tmp_path, monkeypatch, update):
    """The CUDA-graph step checkpoints capturable AdamW's device step and lr by value and resumes
    into device tensors; the resumed run ends where the straight one does."""
    args = ("method=delta-lora", "method.start_steps=2", f"method.update={update}", "device=cuda",
            "train.cuda_graph=true", "train.compile=false", "train.precision=fp32")
    straight = run(cfg_of(tmp_path / "a", *args))
    assert straight["fast_path"]["cuda_graph"]
    with monkeypatch.context() as m:
        sigterm_at(m, 7)
        with pytest.raises(TrainingInterrupted):
            run(cfg_of(tmp_path / "b", *args))
    doc = json.loads((tmp_path / "b" / "out" / "checkpoint.json").read_text())
    group = doc["state"]["optimizer"]["param_groups"][0]
    assert group["lr"]["device"] == "cuda" and group["capturable"] is True
    resumed = run(cfg_of(tmp_path / "c", *args, f"resume={tmp_path / 'b' / 'out'}"))
    assert resumed["fast_path"]["cuda_graph"] and resumed["resumed_from"]["step"] == 7
    assert resumed["metrics"]["evals"] == straight["metrics"]["evals"]
    a = load_file(str(tmp_path / "a" / "out" / "weights.safetensors"))
    c = load_file(str(tmp_path / "c" / "out" / "weights.safetensors"))
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-6, atol=1e-7, msg=k)
