"""End to end: run() writes a complete record and the weights, resumes exactly, exports a merged
model; the command line rejects bad input before any work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from deltalora_repro import train as train_module
from deltalora_repro.errors import ConfigError
from deltalora_repro.export import main as export_main
from deltalora_repro.run import run

from .conftest import GLUE, ROOT, SMALL, make_cfg, needs_glue

pytestmark = needs_glue


def small_cfg(tmp_path, *extra):
    return make_cfg("model=tiny-roberta", *SMALL, "train.checkpoint=true", *extra, tmp_path=tmp_path)


def test_run_writes_a_complete_record(tmp_path):
    record = run(small_cfg(tmp_path, "method=delta-lora", "train.epochs=2"))
    files = list((tmp_path / "results" / "records" / "glue" / "rte" / "tiny-roberta" / "delta-lora").glob("*.json"))
    assert len(files) == 1
    on_disk = json.loads(files[0].read_text())
    assert on_disk["run_id"] == record["run_id"] and on_disk["status"] == "completed"
    for key in ("config", "metrics", "params", "git", "versions", "machine", "command",
                "wall_time_s", "train_time_s", "peak_rss_bytes", "seed", "data"):
        assert key in on_disk, key
    assert [e["epoch"] for e in on_disk["metrics"]["evals"]] == [1, 2]
    assert on_disk["metrics"]["best"]["accuracy"] == max(e["accuracy"] for e in on_disk["metrics"]["evals"])
    assert on_disk["params"]["extra_updated"] == 2 * 2 * 64 * 64   # Wq, Wv of 2 layers, 64x64
    assert on_disk["config"]["method"]["update_ratio"] == 0.5
    assert on_disk["data"]["train"]["rows_used"] == 48
    weights = load_file(str(tmp_path / "out" / "weights.safetensors"))
    assert any("lora_A" in k for k in weights) and any(k.endswith("query.base.weight") for k in weights)
    assert not any("word_embeddings" in k for k in weights)   # unchanged tensors are not saved


@pytest.mark.parametrize("update", ["explicit", "deferred"])
def test_resume_continues_exactly(tmp_path, update):
    """Crash in epoch 2, resume from epoch 1's checkpoint: the same weights, bit for bit, and the
    same evaluations as a run straight through. Deferred: the checkpoint holds W_K, the snapshot
    and the mode, and W is written at the end of either run."""
    args = ("method=delta-lora", "method.start_steps=2", "train.epochs=2", f"method.update={update}")
    straight = run(small_cfg(tmp_path / "a", *args))
    assert straight["fast_path"]["delta_update"] == update
    assert straight["fast_path"]["compile"] is None and not straight["fast_path"]["cuda_graph"]  # CPU
    original = train_module.Trainer.evaluate
    calls = {"n": 0}

    def crash_in_second_epoch(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return original(self)

    train_module.Trainer.evaluate = crash_in_second_epoch
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            run(small_cfg(tmp_path / "b", *args))
    finally:
        train_module.Trainer.evaluate = original
    failed = list((tmp_path / "b" / "results").rglob("*.json"))
    assert len(failed) == 1 and json.loads(failed[0].read_text())["status"] == "failed"
    resumed = run(make_cfg("model=tiny-roberta", *SMALL, *args, f"resume={tmp_path / 'b' / 'out'}",
                           tmp_path=tmp_path / "c"))
    assert resumed["resumed_from"]["epoch"] == 1
    other = "explicit" if update == "deferred" else "deferred"
    with pytest.raises(ConfigError, match=f"method.update: checkpoint '{update}', now '{other}'"):
        run(make_cfg("model=tiny-roberta", *SMALL, *args[:-1], f"method.update={other}",
                     f"resume={tmp_path / 'b' / 'out'}", tmp_path=tmp_path / "d"))
    a = load_file(str(tmp_path / "a" / "out" / "weights.safetensors"))
    c = load_file(str(tmp_path / "c" / "out" / "weights.safetensors"))
    assert a.keys() == c.keys()
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=0)
    assert resumed["metrics"]["evals"] == straight["metrics"]["evals"]


@pytest.mark.parametrize("method", ["delta-lora", "adalora"])
def test_export_merges_into_a_plain_model(tmp_path, method):
    from deltalora_repro.export import load_trained
    record = run(small_cfg(tmp_path, f"method={method}", "method.start_steps=0"
                           if method == "delta-lora" else "seed=1"))
    model, tok, _ = load_trained(tmp_path / "out")
    model.eval()
    batch = tok(["A first sentence.", "And another one here."], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
    assert export_main([str(tmp_path / "out"), str(tmp_path / "export")]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-4, atol=1e-5)
    # Refuses to overwrite.
    assert export_main([str(tmp_path / "out"), str(tmp_path / "export")]) == 2
    assert record["status"] == "completed"
    assert record["params"]["head"] == 64 * 64 + 64 + 64 * 2 + 2   # classifier dense + out_proj


def cli(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "deltalora_repro", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_unknown_method_lists_choices(tmp_path):
    out = cli("method=nope", f"results_dir={tmp_path}")
    assert out.returncode != 0
    assert "delta-lora" in out.stderr and "adalora" in out.stderr
    assert not list(tmp_path.rglob("*.json"))


@pytest.mark.parametrize("override,message", [
    ("method.rank=0", "method.rank must be a positive integer"),
    ("method.lora_dropout=1.5", "method.lora_dropout must be in [0, 1)"),
    ("data_dir=/nonexistent/glue", "data_dir '/nonexistent/glue' is not a directory"),
])
def test_cli_bad_values_exit_before_work(tmp_path, override, message):
    out = cli("model=tiny-roberta", override, f"results_dir={tmp_path}", f"data_dir={GLUE}"
              if not override.startswith("data_dir") else override)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert not list(tmp_path.rglob("*.json"))


def test_cli_missing_data_file_and_offline_hub(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = cli("model=tiny-roberta", f"data_dir={empty}", f"results_dir={tmp_path}")
    assert out.returncode == 2 and "RTE" in out.stderr
    out = cli("model=roberta-base", f"data_dir={GLUE}", f"results_dir={tmp_path}",
              "task.train_max_examples=8", "train.epochs=1",
              env_extra={"HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 2
    assert "cannot load model 'roberta-base'" in out.stderr and "HF_HUB_OFFLINE" in out.stderr
    assert not list(tmp_path.rglob("records/**/*.json"))


@pytest.mark.parametrize("task,metric", [("glue/sst2", "accuracy"), ("glue/cola", "matthews_correlation"),
                                         ("glue/stsb", "pearson"), ("glue/mrpc", "accuracy")])
def test_every_local_glue_task_runs(tmp_path, task, metric):
    cfg = make_cfg("model=tiny-roberta", "method=lora", *SMALL, f"task={task}", tmp_path=tmp_path)
    record = run(cfg)
    assert record["metrics"]["primary"] == metric
    assert -1.0 <= record["metrics"]["best"][metric] <= 1.0
    if task == "glue/stsb":
        assert "spearman" in record["metrics"]["best"]
    if task == "glue/mrpc":   # without GLUE's dev ids the record says what was evaluated
        assert "MSRP test" in record["data"]["validation"]["note"] or "msr" in record["data"]["validation"]["note"].lower()


def test_cli_multirun_writes_one_record_per_job(tmp_path):
    out = cli("-m", "model=tiny-roberta", "method=lora,delta-lora", f"data_dir={GLUE}",
              "task.train_max_examples=16", "task.eval_max_examples=16", "task.max_length=32",
              "train.epochs=1", "train.batch_size=8", f"results_dir={tmp_path}", "save_weights=false",
              f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert out.returncode == 0, out.stderr[-2000:]
    methods = sorted(json.loads(p.read_text())["method"] for p in tmp_path.rglob("records/**/*.json"))
    assert methods == ["delta-lora", "lora"]
    assert "sweep: 2 job(s)" in out.stderr
    assert out.stderr.count(": completed") == 2


def test_cli_multirun_failed_job_leaves_the_others(tmp_path):
    out = cli("-m", "model=tiny-roberta", "method=lora", "method.rank=0,4", f"data_dir={GLUE}",
              "task.train_max_examples=16", "task.eval_max_examples=16", "task.max_length=32",
              "train.epochs=1", "train.batch_size=8", f"results_dir={tmp_path}", "save_weights=false",
              f"hydra.sweep.dir={tmp_path / 'sweep'}")
    # The sweep goes on past the failed job, then says which failed and exits non-zero.
    assert out.returncode == 1, out.stderr[-2000:]
    assert "job 0 failed" in out.stderr and "method.rank must be a positive integer" in out.stderr
    assert "job 0: bad-input" in out.stderr and "job 1: completed" in out.stderr
    assert "not every job of the sweep completed" in out.stderr
    recs = [json.loads(p.read_text()) for p in tmp_path.rglob("records/**/*.json")]
    assert [r["config"]["method"]["rank"] for r in recs] == [4] and recs[0]["status"] == "completed"


def _tiny_cli_args():
    return ["model=tiny-roberta", f"data_dir={GLUE}", "task.train_max_examples=16",
            "task.eval_max_examples=16", "task.max_length=32", "train.epochs=1",
            "train.batch_size=8", "save_weights=false", "train.checkpoint=false"]


def test_a_trial_run_leaves_the_committed_results_untouched():
    """Without results_dir a run's record goes to the ignored outputs/results, never to the
    committed results/ (whose tables a test keeps equal to the rendering of its records)."""
    def status():
        return subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "results"],
                              capture_output=True, text=True).stdout
    before = status()
    out = cli(*_tiny_cli_args())
    assert out.returncode == 0, out.stderr[-2000:]
    assert status() == before
    record_file = next(line.rsplit("record: ", 1)[1] for line in out.stdout.splitlines() + out.stderr.splitlines()
                       if "record: " in line)
    assert Path(record_file).parts[:2] == ("outputs", "results")
    record = json.loads((ROOT / record_file).read_text())
    (ROOT / record_file).unlink()
    import shutil
    shutil.rmtree(ROOT / record["output_dir"])


def test_two_runs_started_together_keep_separate_folders(tmp_path):
    """Two runs started in the same second (the run folder used to be named by the second
    alone): each gets its own folder, named by its run id, and its own record."""
    from deltalora_repro import records
    assert records.new_run_id() != records.new_run_id()      # same second, different ids
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "deltalora_repro", *_tiny_cli_args(),
                               f"results_dir={tmp_path / 'results'}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    folders = sorted((tmp_path / "outputs").glob("glue/rte/tiny-roberta/lora/*"))
    assert len(folders) == 2 and all((f / "run.json").is_file() for f in folders)
    ids = {json.loads((f / "run.json").read_text())["run_id"] for f in folders}
    assert ids == {f.name for f in folders}
    assert len(list((tmp_path / "results").rglob("records/**/*.json"))) == 2


@pytest.mark.slow
def test_fixed_tiny_runs_match_the_committed_fingerprints(tmp_path):
    """The fixed set of tiny CPU runs (scripts/fingerprint_runs.py) trains bit for bit as it did at
    the commit the fingerprints were taken (same torch, same kind of CPU): a refactor that
    changes no computation keeps this green."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("fingerprint_runs", ROOT / "scripts" / "fingerprint_runs.py")
    fp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fp)
    assert fp.main(["--out", str(tmp_path / "now.json")]) == 0
    old = ROOT / "tests" / "fixtures" / "fingerprints-8377647.json"
    assert fp.main(["--compare", str(old), str(tmp_path / "now.json")]) == 0
