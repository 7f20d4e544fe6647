"""Sharded training (train.fsdp=true) on CPU: torchrun starts 2 processes (gloo), FSDP2 shards every
weight over them. The result must equal one plain process with the same global batch (LoRA, and
Delta-LoRA with its snapshot taken mid-run and at the start), a run stopped by SIGTERM must resume
to the same end, the export must load as the trained model, and what FSDP cannot do is refused.

This file is also what the 2 processes run: `torchrun tests/test_fsdp.py OUT DATA JOB...` makes the
gradient check (`grads_worker`, into OUT/grads), then the runs (tests/ddp_runs.py's jobs): one
launch, since starting processes costs more than these tiny runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# -- the benchmark's CPU path ------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_fsdp_runs_on_two_cpu_processes(tmp_path):
    """scripts/bench_fsdp.py (made for 2 GPUs and llama-1b) on tiny-llama, 2 gloo processes."""
    done = _torchrun(2, str(ROOT / "scripts" / "bench_fsdp.py"), "--model", "tiny-llama",
                     "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch", "4",
                     "--length", "16", "--precision", "fp32", "--out", str(tmp_path), "--name",
                     "bench")
    # Two methods one after the other: said once (main process) that their time ratio is biased.
    assert done.stderr.count("their time ratio depends on that order (--interleave") == 1
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["world"]["size"] == 2 and record["git"]["commit"]
    rows = {r["method"]: r for r in record["rows"]}
    assert set(rows) == {"lora", "delta-lora"}
    assert rows["delta-lora"]["delta_update"] == "deferred"
    for r in rows.values():
        assert r["fsdp"] and r["processes"] == 2 and r["step_ms_median"] > 0
        assert len(r["step_ms_median_per_process"]) == 2
        assert r["peak_memory_bytes_per_process"] == [None, None]        # no GPU here
        # tiny-llama by hand: per layer q, o 64x64, k, v 32x64, MLP 3 x 64x128, 2 norms of 64
        # (36,992), 2 layers, embeddings and LM head 2048x64 each, final norm 64: 336,192; rank-4
        # factors on q (4x64 + 64x4) and v (4x64 + 32x4): 896 a layer.
        assert r["trainable"] == 2 * 896 and r["params"] == 336_192 + r["trainable"]
        assert r["interleaved"] is False
    # --interleave: both models at once, steps in turn; times, no peak memory.
    done = _torchrun(2, str(ROOT / "scripts" / "bench_fsdp.py"), "--model", "tiny-llama",
                     "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch", "4",
                     "--length", "16", "--precision", "fp32", "--out", str(tmp_path), "--name",
                     "turns", "--interleave")
    assert "time ratio depends on that order" not in done.stderr
    turns = json.loads((tmp_path / "turns.json").read_text())["rows"]
    assert [r["method"] for r in turns] == ["lora", "delta-lora"]
    assert all(r["interleaved"] and r["step_ms_median"] > 0 for r in turns)
    # Delta-LoRA's steps over LoRA's of the same turn (2 turns here): the median of the two ratios.
    lora_ms, delta_ms = turns[0]["step_ms_per_step"], turns[1]["step_ms_per_step"]
    assert len(lora_ms) == len(delta_ms) == 2
    paired = turns[1]["paired_ratio_vs_first"]
    assert paired["turns"] == 2
    assert paired["median"] == pytest.approx((delta_ms[0] / lora_ms[0] + delta_ms[1] / lora_ms[1]) / 2)
    low, high = paired["median_ci95"]
    assert low <= paired["median"] <= high
    assert "paired_ratio_vs_first" not in turns[0]
    assert "vs the first, paired by turn" in done.stdout
    assert [r["trainable"] for r in turns] == [2 * 896, 2 * 896]
    assert [r["allocated_before_shard_bytes"] for r in turns] == [None, None]


def test_bench_fsdp_refuses_bad_arguments():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_fsdp.py"), "--methods",
                           "ft", "--batch", "0"], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "unknown method 'ft' (valid: lora, delta-lora)" in done.stderr
    assert "--batch must be positive" in done.stderr
    both = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_fsdp.py"), "--interleave",
                           "--profile", "p"], env=_env(), capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "leave out --interleave" in both.stderr


if __name__ == "__main__":                 # the torchrun worker imports the package from here
    sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("DELTALORA_TEST_DATA", ROOT.parent / "shared" / "data")).resolve()
E2E = DATA / "e2e"

# 24 real E2E rows in global batches of 8: 3 optimizer steps per epoch, 6 in the run. lr 2e-3 (not
# the paper's 2e-4) and no warm-up, so that the runs compared move far more than the 1e-5
# tolerance (checked in test_the_comparison_can_fail). Dropout off: a process draws the masks of
# its half of a batch only. The data folder is a copy of the first rows of the official CSVs
# (`small_e2e`): converting all 51k rows would cost each run seconds.
TINY = ["model=tiny-llama", "task=e2e", "task.train_max_examples=24",
        "task.eval_max_examples=8", "task.test_max_groups=2", "task.decoding.num_beams=2",
        "task.decoding.max_new_tokens=8", "task.score=false", "train.batch_size=8",
        "train.epochs=2", "train.lr=0.002", "train.warmup_steps=0", "train.max_grad_norm=1.0", "train.precision=fp32", "device=cpu",
        "train.checkpoint=false", "train.log_every=1", "train.progress=false",
        "train.tensorboard=false", "seed=1", "++task.model_overrides={dropouts: 0.0}"]
JOBS = {
    "lora": TINY + ["method=lora", "method.lora_dropout=0.0"],
    "delta": TINY + ["method=delta-lora", "method.start_steps=1"],     # snapshot after step 1
    "delta0": TINY + ["method=delta-lora", "method.start_steps=0"],    # the sum from the start
}
FSDP = ["train.fsdp=true"]
CHECKPOINTS = ["train.checkpoint=true", "train.checkpoint_every=2"]
STOP_AT = 2                      # mid-epoch 1, after the snapshot (K = 1)

needs_e2e = pytest.mark.skipif(not E2E.is_dir(), reason=f"E2E data not found at {E2E}")


ROWS = {"trainset.csv": 40, "devset.csv": 16, "testset_w_refs.csv": 40}


def write_small_e2e(folder: Path) -> Path:
    """The header and the first rows of each official E2E CSV (the test set's first MRs keep all
    their references: its rows are grouped by MR)."""
    import csv
    import itertools
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in ROWS.items():
        with (E2E / name).open(encoding="utf-8", newline="") as src, \
                (folder / name).open("w", encoding="utf-8", newline="") as dst:
            csv.writer(dst).writerows(itertools.islice(csv.reader(src), n + 1))
    return folder


@pytest.fixture(scope="module")
def small_e2e(tmp_path_factory) -> Path:
    return write_small_e2e(tmp_path_factory.mktemp("e2e"))


def _env() -> dict:
    # This checkout first on the import path, the test run's own path after it.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def _torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           *args]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _job(name: str, overrides: list[str]) -> str:
    return f"{name}={'|'.join(overrides)}"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, small_e2e):
    base = tmp_path_factory.mktemp("fsdp")
    jobs = {n: o + [f"data_dir={small_e2e}"] for n, o in JOBS.items()}
    from deltalora_repro.config import compose
    from deltalora_repro.run import run
    for name, overrides in jobs.items():           # one plain process: this one
        run(compose(*overrides, f"output_dir={base / 'one' / name}",
                    f"results_dir={base / 'one' / name}-results"))
    stopped = jobs["delta"] + FSDP + CHECKPOINTS
    two = [_job(n, o + FSDP) for n, o in jobs.items()] + [
        _job(f"resumed@{STOP_AT}", stopped),                  # SIGTERM after step 2: checkpoint
        _job("resumed", stopped + [f"resume={base / 'two' / 'resumed'}"])]
    (base / "grads").mkdir()
    _torchrun(2, str(Path(__file__)), str(base), str(small_e2e), *two)
    return base


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "weights.safetensors"))


def _assert_same(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert set(a) == set(b) and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol, msg=key)


@needs_e2e
@pytest.mark.parametrize("name", list(JOBS))
def test_fsdp_equals_one_plain_process(outputs, name):
    one, two = outputs / "one" / name, outputs / "two" / name
    _assert_same(_weights(one), _weights(two))
    rec_one = json.loads((one / "run.json").read_text())
    rec_two = json.loads((two / "run.json").read_text())
    assert rec_two["world"]["size"] == 2 and rec_two["fast_path"]["fsdp"] is True
    assert rec_one["fast_path"]["fsdp"] is False
    if name != "lora":
        # One process on the CPU writes W after every step (auto = explicit); sharded, W is
        # written once at the end from the telescoped sum, into each process's own rows.
        assert rec_one["fast_path"]["delta_update"] == "explicit"
        assert rec_two["fast_path"]["delta_update"] == "deferred"
    for e1, e2 in zip(rec_one["metrics"]["evals"], rec_two["metrics"]["evals"], strict=True):
        assert e2["val_loss"] == pytest.approx(e1["val_loss"], rel=1e-5)
    sums = rec_two["world"]["checksums"]
    assert len(sums) == 2 and all(s["equal"] and len(s["checksums"]) == 2 for s in sums)
    # The test decoded in both processes (every forward gathers from both); the main one wrote.
    assert (two / "predictions.jsonl").read_text() == (one / "predictions.jsonl").read_text()


@needs_e2e
def test_the_comparison_can_fail(outputs):
    """The runs differ far beyond the tolerance when K differs: the equality above means something."""
    a, b = _weights(outputs / "two" / "delta"), _weights(outputs / "two" / "delta0")
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert gap > 1e-3


@needs_e2e
def test_sharded_delta_lora_telescopes_to_lambda_s_BA(outputs):
    """K = 0: W_T - W_0 = lambda * s * B_T A_T exactly (Algorithm 1's updates telescope), with W_0
    the seeded init rebuilt here and W_T written shard by shard at the end."""
    from deltalora_repro.build import build
    from deltalora_repro.config import compose
    cfg = compose(*JOBS["delta0"])
    w0 = dict(build(cfg, data=False, total_steps=6).model.named_parameters())
    trained = _weights(outputs / "two" / "delta0")
    scale = cfg.method.update_ratio * cfg.method.alpha / cfg.method.rank
    checked = 0
    for key in trained:
        if not key.endswith(".base.weight"):
            continue
        prefix = key.removesuffix("base.weight")
        delta = trained[prefix + "lora_B.0"] @ trained[prefix + "lora_A.0"]
        torch.testing.assert_close(trained[key] - w0[key].detach(), scale * delta,
                                   rtol=1e-4, atol=1e-6, msg=key)
        assert delta.abs().max() > 1e-3
        checked += 1
    assert checked == 4                    # q_proj and v_proj of 2 layers


@needs_e2e
def test_sigterm_under_fsdp_then_resume_ends_as_the_uninterrupted_run(outputs):
    run_dir = outputs / "two" / "resumed"
    _assert_same(_weights(outputs / "two" / "delta"), _weights(run_dir), atol=0)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["resumed_from"]["step"] == STOP_AT and record["resumed_from"]["epoch"] == 0
    index = json.loads((run_dir / "checkpoint.json").read_text())
    shards = sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".shards"))
    assert shards == [index["shards"]["dir"]] and index["shards"]["processes"] == 2
    assert (run_dir / shards[0] / ".metadata").is_file()
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    # The snapshot (A_K, B_K) is part of the sharded model state; the deferred sum was begun.
    assert index["state"]["method"] == {"update": "deferred", "begun": True}
    assert "model" not in index["state"] and "optimizer" not in index["state"]


@needs_e2e
@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(outputs, small_e2e, tmp_path):
    """DCP reshards on load: stopped with 2 processes, resumed with 1 (FSDP over one), the run
    ends as the uninterrupted 2-process run (to rounding: the sums run in another order)."""
    stopped = JOBS["delta"] + FSDP + CHECKPOINTS + [f"data_dir={small_e2e}"]
    _torchrun(2, str(ROOT / "tests" / "ddp_runs.py"), str(tmp_path), _job(f"run@{STOP_AT}", stopped))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_runs.py"), str(tmp_path),
                           _job("run", stopped + [f"resume={tmp_path / 'run'}"])], env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    _assert_same(_weights(outputs / "two" / "delta"), _weights(tmp_path / "run"), atol=1e-6)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["world"]["size"] == 1 and record["resumed_from"]["step"] == STOP_AT


@needs_e2e
@pytest.mark.slow
def test_three_processes_shard_unevenly_and_still_agree(small_e2e, tmp_path):
    """64 rows of Wq over 3 processes are 22 + 22 + 20 (Wv: 11 + 11 + 10); GPT-2's Conv1D W is
    sharded over its 64 input rows: each process's final write into its own rows must still give
    the one-process W, for both layouts."""
    jobs = {}
    for model in ("tiny-llama", "tiny-gpt2"):
        overrides = [o for o in JOBS["delta"] if not o.startswith(("model=", "train.batch_size="))]
        jobs[model] = overrides + [f"model={model}", "train.batch_size=6", f"data_dir={small_e2e}"]
    _torchrun(3, str(ROOT / "tests" / "ddp_runs.py"), str(tmp_path / "three"),
              *(_job(n, o + FSDP) for n, o in jobs.items()))
    from deltalora_repro.config import compose
    from deltalora_repro.run import run
    for name, overrides in jobs.items():
        run(compose(*overrides, f"output_dir={tmp_path / 'one' / name}",
                    f"results_dir={tmp_path / 'one' / name}-results"))
        _assert_same(_weights(tmp_path / "one" / name), _weights(tmp_path / "three" / name))


@needs_e2e
def test_resume_refuses_an_incomplete_shard_folder(outputs, tmp_path):
    import shutil

    from deltalora_repro import checkpoint
    from deltalora_repro.errors import ConfigError
    copy = tmp_path / "run"
    shutil.copytree(outputs / "two" / "resumed", copy)
    checkpoint.read(copy)                                  # complete: accepted
    index = json.loads((copy / "checkpoint.json").read_text())
    (copy / index["shards"]["dir"] / ".metadata").unlink()
    with pytest.raises(ConfigError, match=r"not a complete shard folder \(no \.metadata\)"):
        checkpoint.read(copy)


@needs_e2e
def test_export_of_an_fsdp_run_is_the_trained_model(outputs, tmp_path):
    """The merged export of the sharded run gives the logits of the trained (unmerged) model,
    here rebuilt from the plain process's run, whose weights equal the sharded one's."""
    from transformers import AutoModelForCausalLM

    from deltalora_repro.export import load_trained
    from deltalora_repro.export import main as export_main
    assert export_main([str(outputs / "two" / "delta"), str(tmp_path / "export")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    trained, tok, _ = load_trained(outputs / "one" / "delta")
    ids = torch.tensor([tok("name : The Punter | food : Italian").input_ids])
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, trained.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    plain = load_trained(outputs / "one" / "lora")[0].eval()
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - want).abs().max() > 1e-3   # W's update shows


# -- on 2 GPUs (NCCL) ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@needs_e2e
def test_fsdp_on_two_gpus_equals_one_plain_gpu(small_e2e, tmp_path):
    """The same comparison on 2 GPUs through NCCL: FSDP's reduce-scatter and all-gathers, fused
    AdamW on sharded parameters, Delta-LoRA's shard-local write of W."""
    gpu = [o for o in TINY if o != "device=cpu"] + ["device=auto", f"data_dir={small_e2e}"]
    jobs = {"lora": gpu + ["method=lora", "method.lora_dropout=0.0"],
            "delta": gpu + ["method=delta-lora", "method.start_steps=1"]}
    driver = str(ROOT / "tests" / "ddp_runs.py")
    done = subprocess.run([sys.executable, driver, str(tmp_path / "one"),
                           *(_job(n, o) for n, o in jobs.items())], env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    _torchrun(2, driver, str(tmp_path / "two"), *(_job(n, o + FSDP) for n, o in jobs.items()))
    for name in jobs:
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        _assert_same(_weights(one), _weights(two), atol=1e-4)
        record = json.loads((two / "run.json").read_text())
        assert record["world"]["backend"] == "nccl" and record["fast_path"]["fsdp"] is True
        assert all(s["equal"] for s in record["world"]["checksums"])


# -- the gradient reduction ------------------------------------------------------------------------
GRAD_JOB = TINY + ["method=delta-lora", "method.start_steps=0", "train.fsdp=true"]


def grads_worker(out: Path, data_dir: Path) -> None:
    """In each of 2 processes: one step's gradients under FSDP (gathered whole), then a copy of a
    replicated buffer put out of step in process 1, which the epoch-end check must catch."""
    from safetensors.torch import save_file

    from deltalora_repro import sharding
    from deltalora_repro.build import build
    from deltalora_repro.config import compose
    from deltalora_repro.train import Trainer
    from deltalora_repro.world import World

    world = World.from_env("cpu")
    cfg = compose(*GRAD_JOB, f"data_dir={data_dir}")
    built = build(cfg)
    model = built.model
    sharding.shard(model, world)
    trainer = Trainer(model, built.method, built.task, cfg.train, world, cfg.seed,
                      built.total_steps)
    trainer.start()
    step = next(trainer.step_batches(built.task.train_examples()))
    loss = sum(trainer.forward_backward(b, w) for b, w in zip(step, step.weights))
    trainer.reduce(loss)
    grads = {n: sharding.full(p.grad).contiguous() for n, p in model.named_parameters()
             if p.requires_grad}
    # Clipping as the Trainer clips: the norm must be the global one, over every shard.
    norm = torch.nn.utils.clip_grad_norm_(trainer.params, 1e-3, foreach=True)
    clipped = {f"clipped/{n}": sharding.full(p.grad).contiguous()
               for n, p in model.named_parameters() if p.requires_grad}
    trainer.check_same_weights()                    # in step: passes
    layer = next(m for m in model.modules() if hasattr(m, "prev_A0"))
    if world.rank == 1:
        layer.prev_A0.add_(1e-3)
    try:
        trainer.check_same_weights()
        caught = ""
    except RuntimeError as e:
        caught = str(e)
    if world.is_main:
        save_file({**grads, **clipped}, str(out / "grads.safetensors"))
        (out / "result.json").write_text(json.dumps({"loss": float(loss), "caught": caught,
                                                     "norm": float(sharding.full(norm))}))


@needs_e2e
def test_fsdp_sums_the_processes_gradients(outputs, small_e2e):
    """Each process's loss is weighted as its share of the global batch, so FSDP's reduce-scatter
    must sum: the gradients equal one process's on the whole batch (an average would halve them,
    which AdamW's scale invariance would all but hide in the weights)."""
    from deltalora_repro.build import build
    from deltalora_repro.config import compose
    from deltalora_repro.train import Trainer
    from deltalora_repro.world import World

    got = load_file(str(outputs / "grads" / "grads.safetensors"))
    result = json.loads((outputs / "grads" / "result.json").read_text())
    cfg = compose(*[o for o in GRAD_JOB if o != "train.fsdp=true"], f"data_dir={small_e2e}")
    built = build(cfg)
    trainer = Trainer(built.model, built.method, built.task, cfg.train, World.single("cpu"),
                      cfg.seed, built.total_steps)
    trainer.start()
    (batch,) = next(trainer.step_batches(built.task.train_examples()))
    loss = trainer.forward_backward(batch)
    want = {n: p.grad for n, p in built.model.named_parameters() if p.requires_grad}
    norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in want.values()])).item()
    assert result["norm"] == pytest.approx(norm, rel=1e-5) and norm > 1e-2
    for key in want:
        torch.testing.assert_close(got.pop(f"clipped/{key}"), want[key] * (1e-3 / norm),
                                   rtol=1e-4, atol=1e-9, msg=key)
    assert set(got) == set(want) and len(want) == 8
    # B starts at zero, so A's first gradient is zero; B's is not.
    assert sum(bool(g.abs().max() > 0) for g in want.values()) == 4
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-7, msg=key)
    assert result["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert "the processes' weights differ" in result["caught"]


# -- what FSDP cannot do -----------------------------------------------------------------------------
def _validate(*overrides):
    from deltalora_repro.config import compose
    from deltalora_repro.run import validate
    validate(compose("model=tiny-llama", "task=e2e", "method=lora", *overrides))


@pytest.mark.parametrize("overrides, message", [
    (["train.fsdp=true", "train.cuda_graph=true"],
     r"train.fsdp=true cannot be used with train.cuda_graph=true: the CUDA-graph step"),
    (["train.fsdp=true", "train.compile=true"], r"train.fsdp=true cannot be used with train.compile=True"),
    (["train.fsdp=true", "train.compile=blocks"], r"train.fsdp=true cannot be used with train.compile=blocks"),
    (["train.fsdp=yes"], r"train.fsdp must be true or false, got 'yes'"),
])
def test_bad_fsdp_configs_are_refused_before_anything_loads(overrides, message):
    from deltalora_repro.errors import ConfigError
    with pytest.raises(ConfigError, match=message):
        _validate(*overrides)
    _validate("train.fsdp=true", "train.cuda_graph=auto", "train.compile=auto")   # auto: accepted


def test_fsdp_leaves_the_fast_path_off_under_auto_and_delta_lora_deferred():
    from omegaconf import OmegaConf

    from deltalora_repro import fastpath
    from deltalora_repro.errors import ConfigError
    from deltalora_repro.methods import build_method
    from deltalora_repro.config import compose
    cfg = compose("model=tiny-llama", "task=e2e", "method=delta-lora", "train.fsdp=true",
                  "train.cuda_graph=auto", "train.compile=auto")
    method = build_method(cfg.method, 10)
    fast = fastpath.resolve(OmegaConf.merge(cfg.train, {"grad_accum": 1}), torch.device("cpu"),
                            method)
    assert (fast.cuda_graph, fast.compile, fast.fsdp, fast.graph_update) == (False, None, True, False)
    assert method.resolve_update(fast) == "deferred"
    for overrides in (["method.update=explicit"], ["method.lora_dropout=0.1"]):
        m = build_method(compose("model=tiny-llama", "task=e2e", "method=delta-lora",
                                 *overrides).method, 10)
        with pytest.raises(ConfigError, match=r"train.fsdp=true runs Delta-LoRA in its deferred form only"):
            m.resolve_update(fast)


if __name__ == "__main__":
    from tests.ddp_runs import main
    grads_worker(Path(sys.argv[1]) / "grads", Path(sys.argv[2]))
    main(str(Path(sys.argv[1]) / "two"), sys.argv[3:])


def test_bench_fsdp_paired_ratio_by_hand():
    """The interleaved bench's paired ratio: per-turn ratios, their median and a bootstrap
    interval, on numbers worked out by hand."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_fsdp", ROOT / "scripts" / "bench_fsdp.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # ratios 1.1, 0.9, 1.2, 1.0, 1.05: median 1.05
    out = bench.paired_ratio([110.0, 90.0, 120.0, 100.0, 105.0], [100.0] * 5)
    assert out["turns"] == 5 and out["median"] == pytest.approx(1.05)
    # statistics.quantiles (exclusive method), n=10 over 0.9, 1.0, 1.05, 1.1, 1.2: the first cut
    # lies at position 0.6 -> below the smallest: 0.9 - 0.4 * 0.1 = 0.86; the last at 5.4 -> 1.24.
    assert out["p10"] == pytest.approx(0.86) and out["p90"] == pytest.approx(1.24)
    low, high = out["median_ci95"]
    assert 0.9 <= low <= 1.05 <= high <= 1.2
    # Every turn the same ratio: no spread at all.
    flat = bench.paired_ratio([103.0] * 4, [100.0] * 4)
    assert flat["median"] == pytest.approx(1.03) and flat["median_ci95"] == pytest.approx([1.03, 1.03])
