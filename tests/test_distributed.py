"""Data-parallel runs on CPU: torchrun starts 2 processes (gloo); each takes half of every global
batch and the gradients are summed across them. The result must equal one process with the same
global batch, for every method, with W the same in every process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import DATA, GLUE, ROOT, child_env, needs_glue

DRIVER = ROOT / "tests" / "ddp_runs.py"
TINY_RTE = ["model=tiny-roberta", "task=glue/rte", f"data_dir={GLUE}", "task.train_max_examples=36",
            "task.eval_max_examples=16", "task.max_length=48", "train.batch_size=8",
            "train.epochs=2", "device=cpu", "train.checkpoint=false", "train.log_every=2",
            "train.progress=false", "train.tensorboard=false", "seed=3",
            "++task.model_overrides={dropouts: 0.0}"]
TINY_E2E = ["model=tiny-gpt2", "task=e2e", f"data_dir={DATA / 'e2e'}", "task.train_max_examples=28",
            "task.eval_max_examples=8", "task.test_max_groups=2", "task.decoding.num_beams=2",
            "task.decoding.max_new_tokens=8", "task.score=false", "train.batch_size=8",
            "train.epochs=2", "device=cpu", "train.checkpoint=false", "train.log_every=2",
            "train.progress=false", "train.tensorboard=false", "seed=1"]
# Dropout is off: a process draws the masks of its half of a batch, not those one process draws
# for the whole batch, so with dropout the runs agree in distribution only.
# The short last batch (36 = 4 x 8 + 4; 28 = 3 x 8 + 4) splits unevenly: the weights must still
# give the global batch's mean.
JOBS = {
    "lora": TINY_RTE + ["method=lora", "method.lora_dropout=0.0"],
    "delta-explicit": TINY_RTE + ["method=delta-lora", "method.start_steps=2", "method.update=explicit"],
    "delta-deferred": TINY_RTE + ["method=delta-lora", "method.start_steps=2", "method.update=deferred"],
    "adalora": TINY_RTE + ["method=adalora", "method.lora_dropout=0.0", "method.rank=4", "method.target_rank=2", "method.tinit=2",
                           "method.tfinal=2", "method.schedule.delta_t=1"],
    "dylora": TINY_RTE + ["method=dylora", "method.lora_dropout=0.0"],
    "ft": TINY_RTE + ["method=ft"],
    "ft-qv": TINY_RTE + ["method=ft-qv"],
    "e2e-delta": TINY_E2E + ["method=delta-lora", "method.start_steps=1"],
    "e2e-accum": TINY_E2E + ["method=lora", "method.lora_dropout=0.0", "train.grad_accum=2"],
}


def _launch(n: int, out: Path, jobs: dict[str, list[str]], launcher: str = "torchrun") -> None:
    env = child_env(OMP_NUM_THREADS="1")
    args = [f"{name}={'|'.join(overrides)}" for name, overrides in jobs.items()]
    if n == 1:
        cmd = [sys.executable, str(DRIVER), str(out), *args]
    elif launcher == "accelerate":
        # accelerate's multi-process launcher is --multi_gpu (its --cpu starts one process); the
        # runs themselves say device=cpu, so the processes join over gloo.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={n}",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
               "--main_process_port=29517", str(DRIVER), str(out), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={n}", str(DRIVER), str(out), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    _launch(1, base / "one", JOBS)
    _launch(2, base / "two", JOBS)
    return base


@needs_glue
@pytest.mark.parametrize("name", list(JOBS))
def test_two_processes_equal_one_with_the_same_global_batch(outputs, name):
    one, two = outputs / "one" / name, outputs / "two" / name
    a, b = load_file(str(one / "weights.safetensors")), load_file(str(two / "weights.safetensors"))
    assert set(a) == set(b) and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    rec_one = json.loads((one / "run.json").read_text())
    rec_two = json.loads((two / "run.json").read_text())
    assert rec_two["world"]["size"] == 2 and rec_one["world"]["size"] == 1
    assert rec_two["total_steps"] == rec_one["total_steps"]
    for e1, e2 in zip(rec_one["metrics"]["evals"], rec_two["metrics"]["evals"], strict=True):
        for k, v in e1.items():
            assert e2[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (k, e1, e2)
    # Every epoch ends with the same weights in both processes (Delta-LoRA's W included).
    sums = rec_two["world"]["checksums"]
    assert len(sums) == 2 and all(s["equal"] and len(s["checksums"]) == 2 for s in sums)
    if "predictions" in rec_one:
        p1 = (one / "predictions.jsonl").read_text()
        assert (two / "predictions.jsonl").read_text() == p1


@needs_glue
def test_one_run_one_folder_one_record(outputs):
    """The main process writes the run: one record per run, in the main process's folder."""
    for name in JOBS:
        records = list((outputs / "two" / f"{name}-results").rglob("records/**/*.json"))
        assert len(records) == 1, name
        assert json.loads(records[0].read_text())["output_dir"] == str(outputs / "two" / name)


@needs_glue
def test_accelerate_launch_gives_the_same_run(outputs):
    """`accelerate launch` sets the same RANK / WORLD_SIZE / LOCAL_RANK as torchrun: the same run."""
    jobs = {name: JOBS[name] for name in ("lora", "delta-explicit")}
    _launch(2, outputs / "accelerate", jobs, launcher="accelerate")
    for name in jobs:
        one = load_file(str(outputs / "one" / name / "weights.safetensors"))
        acc = load_file(str(outputs / "accelerate" / name / "weights.safetensors"))
        assert set(one) == set(acc)
        for key in one:
            torch.testing.assert_close(acc[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
        record = json.loads((outputs / "accelerate" / name / "run.json").read_text())
        assert record["world"]["size"] == 2 and all(s["equal"] for s in record["world"]["checksums"])


@needs_glue
def test_a_stopped_run_resumes_exactly_with_the_same_processes(outputs):
    """SIGTERM to the main process of 2 after step 3: they agree to stop at the next log point
    (step 4, train.log_every=2), checkpoint, and a 2-process resume ends bit-identical to the
    uninterrupted 2-process run; a 1-process resume of that checkpoint ends equal within float
    tolerance (the same global batches, summed in another order)."""
    ckpt = ["train.checkpoint=true"]
    name = "delta-explicit"
    base = outputs / "resume"
    _launch(2, base / "stop", {f"{name}@3": JOBS[name] + ckpt})
    (record,) = (base / "stop" / f"{name}-results").rglob("records/**/*.json")
    stopped = json.loads(record.read_text())
    assert stopped["status"] == "interrupted" and stopped["checkpoint"]["step"] == 4
    resume = [*JOBS[name], *ckpt, f"resume={base / 'stop' / name}"]
    _launch(2, base / "two", {name: resume})
    _launch(1, base / "one", {name: resume})
    straight = load_file(str(outputs / "two" / name / "weights.safetensors"))
    again = load_file(str(base / "two" / name / "weights.safetensors"))
    single = load_file(str(base / "one" / name / "weights.safetensors"))
    assert set(again) == set(straight) == set(single)
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(single[key], straight[key], rtol=1e-5, atol=1e-6, msg=key)
    record = json.loads((base / "two" / name / "run.json").read_text())
    assert record["resumed_from"]["step"] == 4 and record["world"]["size"] == 2
    assert record["metrics"]["evals"] == json.loads(
        (outputs / "two" / name / "run.json").read_text())["metrics"]["evals"]


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@pytest.mark.gpu
@TWO_GPUS
def test_cuda_graph_step_with_two_gpus_equals_one(tmp_path):
    """NCCL, 2 GPUs, the CUDA-graph step (the gradient all-reduce recorded inside it): the same
    weights and predictions as one GPU with the same global batch. The short last batch splits
    4 + 4 of 8 in other steps and 2 + 2 at the end: new shapes recorded by both at once."""
    gpu = [o for o in TINY_E2E if not o.startswith("device=")] + [
        "device=auto", "train.precision=fp32", "train.cuda_graph=true", "train.compile=false"]
    jobs = {"lora": gpu + ["method=lora", "method.lora_dropout=0.0"],
            "delta": gpu + ["method=delta-lora", "method.start_steps=1", "method.update=explicit"]}
    _launch(1, tmp_path / "one", jobs)
    _launch(2, tmp_path / "two", jobs)
    for name in jobs:
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        a, b = load_file(str(one / "weights.safetensors")), load_file(str(two / "weights.safetensors"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
        record = json.loads((two / "run.json").read_text())
        assert record["fast_path"]["cuda_graph"] is True and record["world"]["backend"] == "nccl"
        assert all(s["equal"] for s in record["world"]["checksums"])
        assert (two / "predictions.jsonl").read_text() == (one / "predictions.jsonl").read_text()


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused():
    from omegaconf import OmegaConf

    from deltalora_repro.errors import ConfigError
    from deltalora_repro.train import check_batch_split
    check_batch_split(OmegaConf.create({"batch_size": 8, "grad_accum": 2}), 2)   # 2 x 2 x 2
    with pytest.raises(ConfigError, match=r"train.batch_size 6 is not divisible by train.grad_accum 2 x 2 processes"):
        check_batch_split(OmegaConf.create({"batch_size": 6, "grad_accum": 2}), 2)
    with pytest.raises(ConfigError, match=r"not divisible by train.grad_accum 3$"):
        check_batch_split(OmegaConf.create({"batch_size": 8, "grad_accum": 3}), 1)
