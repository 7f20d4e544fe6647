"""The package as users get it: a non-editable install runs from any folder, with its configs and
assets inside it, and the `deltalora` command dispatches to every module's command line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from deltalora_repro import records
from deltalora_repro.errors import ConfigError

from .conftest import GLUE, ROOT, SMALL, make_cfg, needs_glue

SOURCE_CONFIGS = ROOT / "deltalora_repro" / "configs"
TINY_RUN = ["model=tiny-roberta", "task=glue/rte", "method=lora", f"data_dir={GLUE}",
            "task.train_max_examples=16", "task.eval_max_examples=16", "task.max_length=32",
            "train.epochs=1", "train.batch_size=8"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """TMP with TMP/pkg: `pip install --target` of a copy of the source (a build in the checkout
    would leave build/ behind); no dependencies, the test's environment provides them."""
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "deltalora_repro", src / "deltalora_repro",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(tmp / "pkg"), str(src)],
                   check=True, capture_output=True, text=True, timeout=300)
    shutil.rmtree(src)                     # nothing of the source is left to import by mistake
    (tmp / "work").mkdir()
    return tmp


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTALORA_")}
    # PYTHONPATH comes before site-packages, where an editable install of the checkout may be.
    return {**env, "PYTHONPATH": str(tmp / "pkg"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(tmp: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=tmp / "work", env=_env(tmp), capture_output=True,
                          text=True, timeout=timeout)


def test_install_ships_configs_and_assets(installed):
    pkg = installed / "pkg" / "deltalora_repro"
    shipped = sorted(p.relative_to(pkg / "configs") for p in (pkg / "configs").rglob("*.yaml"))
    source = sorted(p.relative_to(SOURCE_CONFIGS) for p in SOURCE_CONFIGS.rglob("*.yaml"))
    assert shipped == source and len(source) > 50
    assert (pkg / "assets" / "tiny-bpe" / "tokenizer.json").is_file()
    # The package and the config folder the command line reads are the installed ones.
    out = _run(installed, sys.executable, "-c",
               "import deltalora_repro.__main__ as m; print(m.__file__); print(m.CONFIG_DIR)")
    assert out.returncode == 0, out.stderr
    module_file, config_dir = out.stdout.split()
    assert Path(module_file) == pkg / "__main__.py"
    assert Path(config_dir) == pkg / "configs"


@needs_glue
def test_installed_package_trains_from_another_folder(installed):
    results = installed / "results"
    out = _run(installed, sys.executable, "-m", "deltalora_repro", *TINY_RUN,
               f"results_dir={results}", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    [record_file] = list(results.rglob("*.json"))
    record = json.loads(record_file.read_text())
    assert record["status"] == "completed"
    assert record["task"] == "glue/rte"
    assert record["task_version"] == 1
    # Hydra composed the run from the installed package's configs (its own record of the sources).
    hydra = yaml.safe_load((Path(record["output_dir"]) / ".hydra" / "hydra.yaml").read_text())
    sources = {s["provider"]: s["path"] for s in hydra["hydra"]["runtime"]["config_sources"]}
    assert Path(sources["main"]) == installed / "pkg" / "deltalora_repro" / "configs"
    # The run folder is relative to where the command ran, not to the package.
    assert Path(record["output_dir"]).resolve().is_relative_to((installed / "work").resolve())


def test_console_command_lists_and_dispatches(installed):
    command = str(installed / "pkg" / "bin" / "deltalora")
    out = _run(installed, command, "--help")
    assert out.returncode == 0, out.stderr
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["train", "score", "score-run", "tables", "promote", "export", "bench",
                      "figure3"]
    # A subcommand's --help is its module's own (argparse names the module as its prog).
    out = _run(installed, command, "score-run", "--help")
    assert out.returncode == 0 and out.stdout.startswith(
        "usage: python -m deltalora_repro.score_run"), out.stdout + out.stderr
    # train is the Hydra entrypoint: overrides pass through and compose from the installed configs.
    out = _run(installed, command, "train", "task=glue/mrpc", "method=delta-lora", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    job = yaml.safe_load(out.stdout)
    assert (job["task"]["name"], job["method"]["name"]) == ("glue/mrpc", "delta-lora")
    # ... and its checks run before Hydra: a bad config name is exit 2 with the valid choices.
    out = _run(installed, command, "train", "-m", "task=glue/rte,glue/rtf")
    assert out.returncode == 2 and "task=glue/rtf is not a config" in out.stderr, out.stderr
    assert "glue/rte" in out.stderr.split("valid:")[1]
    out = _run(installed, command, "scores")
    assert out.returncode == 2 and "unknown command 'scores'" in out.stderr, out.stderr


@pytest.mark.slow
@needs_glue
def test_console_command_runs_a_sweep(installed):
    """`deltalora train -m` is a Hydra multirun: one job per value, each with its record."""
    results = installed / "sweep-results"
    out = _run(installed, str(installed / "pkg" / "bin" / "deltalora"), "train", "-m", *TINY_RUN,
               f"results_dir={results}", "seed=0,1", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in results.rglob("*.json")]
    assert sorted(r["seed"] for r in records) == [0, 1]
    assert all(r["status"] == "completed" for r in records)
    assert all(r["command"].endswith("seed=0,1") for r in records)


# -- task versions ----------------------------------------------------------------------------------
def test_every_task_config_has_a_version():
    tasks = sorted(p.relative_to(SOURCE_CONFIGS / "task").with_suffix("").as_posix()
                   for p in (SOURCE_CONFIGS / "task").rglob("*.yaml"))
    assert len(tasks) == 11
    for name in tasks:
        cfg = make_cfg(f"task={name}")
        assert records.task_version(cfg.task) >= 1, name
    # E2E and WebNLG changed after their first version (targets and named scoring procedures;
    # WebNLG's dropouts by role reach Llama-family models from 3 on).
    assert make_cfg("task=e2e").task.version == 2
    assert make_cfg("task=webnlg").task.version == 3


@pytest.mark.parametrize("version", [None, 0, "2", 1.5, True])
def test_a_task_without_a_valid_version_is_refused(version):
    task = OmegaConf.create({"name": "glue/rte"} if version is None else
                            {"name": "glue/rte", "version": version})
    with pytest.raises(ConfigError, match=r"task 'glue/rte' needs task.version, a positive integer"):
        records.task_version(task)


@needs_glue
def test_run_refuses_a_task_config_without_version_before_training(tmp_path):
    from deltalora_repro.run import run
    cfg = make_cfg("model=tiny-roberta", *SMALL, "~task.version", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="needs task.version"):
        run(cfg)
    assert not list((tmp_path / "results").rglob("*.json"))
