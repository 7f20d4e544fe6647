"""Sweeps through Hydra's launcher plugins: launch=gpus runs a sweep's jobs side by side (the
joblib launcher, each job a process of its own, on a GPU no other job holds)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltalora_repro.config import compose

from .conftest import GLUE, child_env, needs_glue, signal_at

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


CLAIM = """
import logging, sys
from pathlib import Path
from deltalora_repro.config import claim_gpu
logging.basicConfig(level=logging.WARNING)
got = claim_gpu(2, int(sys.argv[1]), Path(sys.argv[2]))
assert claim_gpu(2, 1 - got, Path(sys.argv[2])) == got      # a process keeps its GPU
print(got, flush=True)
sys.stdin.readline()                                           # hold it until told
"""


def test_sweep_jobs_claim_a_free_gpu_each_and_share_only_when_all_are_held(tmp_path):
    """Job numbers 0 and 2 both map to GPU 0 under `mod N`; with GPU 0 held the second job gets
    GPU 1. With both held a third shares its preferred GPU and says so (no wait). A holder that
    ends frees its GPU for the next job."""
    def start(preferred: int):
        proc = subprocess.Popen([sys.executable, "-c", CLAIM, str(preferred), str(tmp_path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=child_env())
        return proc, int(proc.stdout.readline())

    def end(proc) -> str:
        _, err = proc.communicate("\n", timeout=60)
        assert proc.returncode == 0, err
        return err

    first, a = start(0)
    second, b = start(0)                    # prefers GPU 0, which `first` holds
    assert (a, b) == (0, 1)
    third, c = start(0)                     # both held
    assert c == 0 and "all 2 GPUs are held by other jobs" in end(third)
    assert "held" not in end(first)
    fourth, d = start(1)                    # GPU 1 still held, GPU 0 free again
    assert d == 0
    end(second), end(fourth)


def _sweep(tmp_path: Path, name: str, *extra: str, device: str = "device=cpu",
           seeds: str = "seed=0,1") -> tuple[list[dict], str]:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "deltalora_repro", "-m", *TINY, *([device] if device else []), seeds,
           f"results_dir={out / 'results'}", f"hydra.sweep.dir={out / 'multirun'}", *extra]
    env = child_env(OMP_NUM_THREADS="1")
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


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@needs_glue
def test_a_sweep_on_two_gpus_never_puts_two_jobs_on_one_gpu(tmp_path):
    """launch=gpus on a 2-GPU machine, 4 jobs: both GPUs are used, and on each GPU the jobs run
    one after another (their started..finished spans do not overlap)."""
    import datetime
    records, log = _sweep(tmp_path, "gpus", "launch=gpus", device="", seeds="seed=0,1,2,3")
    assert [r["status"] for r in records] == ["completed"] * 4
    spans: dict[str, list] = {}
    for r in records:
        t = [datetime.datetime.strptime(r[k], "%Y-%m-%dT%H:%M:%S%z") for k in ("started_at", "finished_at")]
        spans.setdefault(r["config"]["device"], []).append(t)
    assert sorted(spans) == ["cuda:0", "cuda:1"], spans
    for device, ts in spans.items():
        ts.sort()
        assert all(b[0] >= a[1] for a, b in zip(ts, ts[1:])), (device, ts)


def test_launch_slurm_composes_submitit_with_requeue_and_resume_in_place():
    cfg = compose("launch=slurm", hydra_node=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    # A requeued job must find its folder again: named by the job's number, not a fresh run id.
    assert cfg.hydra.sweep._get_node("subdir")._value() == "${hydra.job.num}"
    assert cfg.resume == "auto" and cfg.train.checkpoint is True
    local = compose("launch=submitit-local", hydra_node=True)
    assert local.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert local.resume == "auto"


@needs_glue
def test_sigusr2_checkpoints_hands_on_to_the_schedulers_handler_and_resume_auto_continues(
        tmp_path, monkeypatch):
    """What a requeued SLURM job goes through, in one process: SIGUSR2 stops the run after the
    step with a checkpoint and its record; the handler that was there before (submitit's
    requeue) is handed back on the exception, not lost; the same command again with resume=auto
    in the same folder continues and ends bit-identical to a run never stopped."""
    import signal


    from safetensors.torch import load_file

    from deltalora_repro.errors import ConfigError
    from deltalora_repro.run import run
    from deltalora_repro.train import TrainingInterrupted

    from .conftest import SMALL, make_cfg
    args = (*SMALL, "model=tiny-roberta", "method=delta-lora", "method.start_steps=2",
            "train.epochs=2", "train.checkpoint=true", "resume=auto")
    straight = run(make_cfg(*args, tmp_path=tmp_path / "a"))

    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with monkeypatch.context() as m:
            signal_at(m, 4, signal.SIGUSR2)
            with pytest.raises(TrainingInterrupted) as info:
                run(make_cfg(*args, tmp_path=tmp_path / "b"))
        assert info.value.step == 4 and info.value.signum == signal.SIGUSR2
        assert calls == []                       # not called behind the run's back ...
        info.value.handler(info.value.signum, None)
        assert calls == [signal.SIGUSR2]         # ... but handed on
    finally:
        signal.signal(signal.SIGUSR2, previous)
    out = tmp_path / "b" / "out"
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    again = run(make_cfg(*args, tmp_path=tmp_path / "b"))       # the requeued job: same folder
    assert again["resumed_from"]["step"] == 4
    assert again["metrics"]["evals"] == straight["metrics"]["evals"]
    a, b = load_file(str(tmp_path / "a" / "out" / "weights.safetensors")), load_file(str(out / "weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    with pytest.raises(ConfigError, match="has completed; nothing to continue"):
        run(make_cfg(*args, tmp_path=tmp_path / "b"))


@pytest.mark.slow
@needs_glue
def test_a_submitit_sweep_is_requeued_at_its_time_limit_and_resumes(tmp_path):
    """launch=submitit-local with a one-minute limit (submitit's local executor sends SIGUSR2 30 s
    before it; that delay is not a setting of Hydra's local launcher config): each job is
    stopped (checkpoint), requeued by submitit and resumed in its own folder until it completes;
    it ends with the same numbers as the same job run straight through."""
    long = ["task.train_max_examples=96", "train.epochs=400", "train.checkpoint=true"]
    requeued, log = _sweep(tmp_path, "submitit", *long, "launch=submitit-local",
                           "hydra.launcher.timeout_min=1", "hydra.launcher.gpus_per_node=0")
    straight, _ = _sweep(tmp_path, "basic", *long)
    finished = [r for r in requeued if r["status"] == "completed"]
    stopped = [r for r in requeued if r["status"] == "interrupted"]
    assert [r["seed"] for r in finished] == [0, 1]
    # 400 epochs (4,800 steps) outlive the first 30 s on this machine; a job stopped at least once must
    # have resumed from its checkpoint, in its own folder.
    assert stopped and all(r["checkpoint"] for r in stopped)
    for r in finished:
        if any(s["seed"] == r["seed"] for s in stopped):
            assert r["resumed_from"]["path"].startswith(r["output_dir"])
    for x, y in zip(finished, straight, strict=True):
        assert x["metrics"]["final"] == y["metrics"]["final"]
