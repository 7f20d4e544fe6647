"""The composed configs: every experiment and every task x method default composes and resolves,
each hyperparameter has one address (train.*, method.*, task.*), and the values that arrive there
are the paper's (Tables 9, 11, 13, as printed) or an experiment's own."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from deltalora_repro.__main__ import FREE_FORM, check_keys, known_keys
from deltalora_repro.tables import swept

from .conftest import CONFIGS

PAPER_TEXT = Path(__file__).resolve().parents[2] / "shared/paper/delta-lora-2309.02411.txt"


def _names(group: str) -> list[str]:
    root = CONFIGS / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


MODELS, TASKS, METHODS, EXPERIMENTS = (_names(g) for g in ("model", "task", "method", "experiment"))
GLUE_TASKS = [t for t in TASKS if t.startswith("glue/")]
LORA_FAMILY = ("lora", "dylora", "adalora", "delta-lora")
FT_FAMILY = ("ft", "ft-noembed", "ft-qv")
# Keys a method of the LoRA family takes per task; none of them belongs to full fine-tuning.
LORA_KEYS = {"rank", "alpha", "lora_dropout", "update_ratio", "start_steps", "schedule", "target_rank"}


def _compose_all(runs: list[list[str]], hydra: bool = False) -> dict[str, object]:
    """{' '.join(overrides): composed config}, all in one Hydra context (composing is the cost)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return {" ".join(o): compose("config", overrides=o, return_hydra_config=hydra) for o in runs}


def _keys(node, prefix: str = "") -> set[str]:
    """Every dotted key of a resolved config (containers flattened)."""
    out = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, dict):
            out |= _keys(value, path + ".")
    return out


def _check_resolved(name: str, cfg) -> dict:
    assert not OmegaConf.missing_keys(cfg), f"{name}: unset {OmegaConf.missing_keys(cfg)}"
    plain = OmegaConf.to_container(cfg, resolve=True)
    keys = _keys(plain)
    # One address per hyperparameter: the old second homes are gone.
    assert not [k for k in keys if k.split(".")[-1] == "hparams"], name
    assert "task.adalora" not in keys, name
    return plain


@pytest.fixture(scope="module")
def defaults() -> dict[tuple[str, str], dict]:
    """Every task x method default with the task's own model, resolved."""
    runs = [[f"task={t}", f"method={m}"] for t in TASKS for m in METHODS]
    return {(o[0][5:], o[1][7:]): _check_resolved(" ".join(o), cfg)
            for o, cfg in zip(runs, _compose_all(runs).values())}


@pytest.fixture(scope="module")
def experiments() -> dict[str, object]:
    """Every experiment config with its default task, composed with the hydra node (the sweep)."""
    return _compose_all([[f"experiment={e}"] for e in EXPERIMENTS], hydra=True)


def test_the_folders_hold_what_the_tests_walk():
    # A renamed folder must not make the tests below pass over nothing.
    assert len(MODELS) == 12 and len(TASKS) == 11 and len(METHODS) == 8
    assert len(EXPERIMENTS) == 36 and len(GLUE_TASKS) == 8


def test_every_experiment_composes_and_resolves(experiments):
    assert len(experiments) == len(EXPERIMENTS)
    for name, cfg in experiments.items():
        with_hydra = OmegaConf.to_container(cfg, resolve=False)
        del with_hydra["hydra"]
        _check_resolved(name, OmegaConf.create(with_hydra))


def test_every_task_and_method_default_composes_and_resolves(defaults):
    assert len(defaults) == len(TASKS) * len(METHODS)
    for (task, method), cfg in defaults.items():
        assert cfg["task"]["name"] == task and cfg["method"]["name"] == method
        # The paper's optimisation values reach train.* for every method alike.
        assert cfg["train"] == defaults[(task, "lora")]["train"], (task, method)


@pytest.mark.slow
def test_every_model_task_and_method_composes_and_resolves():
    runs = [[f"model={mo}", f"task={t}", f"method={m}"] for mo in MODELS for t in TASKS for m in METHODS]
    composed = _compose_all(runs + [[f"task={t}", f"method={m}"] for t in TASKS for m in METHODS])
    assert len(composed) == 12 * 11 * 8 + 11 * 8
    for overrides in runs:
        name = " ".join(overrides)
        plain = _check_resolved(name, composed[name])
        # The model changes neither the paper's training values nor the method's.
        base = OmegaConf.to_container(composed[" ".join(overrides[1:])], resolve=True)
        assert (plain["train"], plain["method"]) == (base["train"], base["method"]), name


def test_ft_methods_carry_no_low_rank_keys(defaults):
    for (task, method), cfg in defaults.items():
        keys = set(cfg["method"])
        if method in FT_FAMILY:
            assert not keys & LORA_KEYS, (task, method, keys)
        else:
            assert {"rank", "alpha", "lora_dropout"} <= keys, (task, method)
        assert ("schedule" in keys) == (method == "adalora"), (task, method)
        assert ("update_ratio" in keys) == (method in ("delta-lora", "scaled-lora")), (task, method)


# (task, method): {dotted key: value}, read off the paper's Tables 9, 11 and 13 (Appendix A.3);
# LoRA's E2E branch dropout 0.1 and Delta-LoRA's none (Sec. 4.2); AdaLoRA's RTE schedule from its
# authors' NLU/scripts/run_debertav3_rte.sh.
PAPER_CELLS = {
    ("e2e", "lora"): {"train.lr": 2e-4, "train.batch_size": 8, "train.epochs": 5,
                      "train.weight_decay": 0.01, "train.warmup_steps": 500, "method.rank": 4,
                      "method.alpha": 32, "method.lora_dropout": 0.1, "task.label_smoothing": 0.0},
    ("e2e", "delta-lora"): {"train.lr": 2e-4, "train.batch_size": 8, "train.epochs": 5,
                            "train.warmup_steps": 500, "method.rank": 4, "method.alpha": 32,
                            "method.lora_dropout": 0.0, "method.update_ratio": 2,
                            "method.start_steps": 500},
    ("webnlg", "delta-lora"): {"train.lr": 2e-4, "train.batch_size": 8, "method.update_ratio": 5,
                               "method.start_steps": 500, "task.label_smoothing": 0.0},
    ("xsum", "delta-lora"): {"train.lr": 2e-4, "train.batch_size": 64, "train.epochs": 25,
                             "train.weight_decay": 0.0, "train.warmup_steps": 3000,
                             "method.update_ratio": 0.5, "method.start_steps": 1000,
                             "method.rank": 4, "method.alpha": 32},
    ("glue/rte", "delta-lora"): {"train.lr": 4e-4, "train.batch_size": 128, "train.epochs": 80,
                                 "train.weight_decay": 0.1, "train.warmup_ratio": 0.06,
                                 "method.start_steps": 200, "method.update_ratio": 0.5,
                                 "method.rank": 8, "method.alpha": 16, "task.max_length": 512},
    ("glue/mnli", "delta-lora"): {"train.lr": 5e-4, "train.epochs": 30, "method.start_steps": 2000},
    ("glue/cola", "ft"): {"train.lr": 4e-4, "train.batch_size": 64, "train.epochs": 80},
    ("glue/rte", "adalora"): {"method.rank": 8, "method.target_rank": 6, "method.schedule.tinit": 600,
                              "method.schedule.tfinal": 1800, "method.schedule.orth_reg_weight": 0.3},
}


@pytest.mark.parametrize("cell", sorted(PAPER_CELLS))
def test_paper_values_arrive_at_their_one_address(defaults, cell):
    cfg = OmegaConf.create(defaults[cell])
    for key, want in PAPER_CELLS[cell].items():
        assert OmegaConf.select(cfg, key) == want, (cell, key)


def _paper_table(header: str) -> dict[str, dict[str, str]]:
    """{row name: {column: printed value}} of the first table in the paper text whose header
    line starts with `header`."""
    lines = PAPER_TEXT.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    columns = [c.strip() for c in lines[start].split("|")[1:-1]]
    table = {}
    for line in lines[start + 1:]:
        if line.startswith("Hyper-Parameter") or line.count("|") != len(columns) + 1:
            break
        name, *cells = [c.strip() for c in line.split("|")[:-1]]
        table[name] = dict(zip(columns, cells))
    return table


# The paper's row name -> where the value lives (Delta-LoRA's rows for lambda and K).
PAPER_ROWS = {"Learning Rate": "train.lr", "Batch Size": "train.batch_size",
              "Number of Epochs": "train.epochs", "Weight Decay": "train.weight_decay",
              "Warmup Steps": "train.warmup_steps", "Warmup Ratio": "train.warmup_ratio",
              "Start Steps": "method.start_steps", "Update Ratio": "method.update_ratio",
              "Rank": "method.rank", "Alpha": "method.alpha", "Label Smooth": "task.label_smoothing",
              "Max Sequence Length": "task.max_length"}
PAPER_COLUMNS = {"E2E Challenge": "e2e", "WebNLG Challenge 2017": "webnlg", "Xsum": "xsum",
                 "MNLI": "glue/mnli", "SST-2": "glue/sst2", "MRPC": "glue/mrpc", "CoLA": "glue/cola",
                 "QNLI": "glue/qnli", "QQP": "glue/qqp", "RTE": "glue/rte", "STS-B": "glue/stsb"}


@pytest.mark.skipif(not PAPER_TEXT.exists(), reason="paper text not available")
def test_every_task_default_is_the_paper_table_as_printed(defaults):
    """Tables 9, 11 and 13 read from the paper text: each printed number is the composed value
    of Delta-LoRA on that task (and the train.* of every method)."""
    compared = 0
    for header in ("Hyper-Parameter | E2E Challenge", "Hyper-Parameter | Xsum",
                   "Hyper-Parameter | MNLI"):
        for row, cells in _paper_table(header).items():
            if row not in PAPER_ROWS:
                continue
            for column, printed in cells.items():
                cfg = OmegaConf.create(defaults[(PAPER_COLUMNS[column], "delta-lora")])
                got = OmegaConf.select(cfg, PAPER_ROWS[row])
                assert got == float(printed), (column, row, printed, got)
                compared += 1
    assert compared == 2 * 10 + 9 + 8 * 10       # every number of the three tables' rows above


def _pinned(data: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _pinned(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_an_experiments_pinned_and_swept_values_arrive_at_their_address(experiments):
    checked = set()
    for name in EXPERIMENTS:
        data = yaml.safe_load((CONFIGS / "experiment" / f"{name}.yaml").read_text()) or {}
        cfg = experiments[f"experiment={name}"]
        pins = _pinned({k: v for k, v in data.items() if k not in ("defaults", "hydra")})
        for key, value in pins.items():
            assert OmegaConf.select(cfg, key) == value, (name, key)
            checked.add(key)
        for key, values in swept(cfg).items():
            # A sweep point composes (an address that did not exist would be refused) and lands.
            point = _compose_all([[f"experiment={name}", f"{key}={values[-1]}"]])
            assert OmegaConf.select(next(iter(point.values())), key) == values[-1], (name, key)
            checked.add(key)
    # Which ones exist today: AdaLoRA's ranks, Table 5's branch dropout, Tables 6-8's sweeps, the
    # alpha (1 + lambda) control.
    assert checked == {"method.rank", "method.target_rank", "method.lora_dropout", "train.lr",
                       "method.update_ratio", "method.start_steps", "method.alpha"}
    assert experiments["experiment=controls/lora-alpha"].method.alpha == 32 * (1 + 2)   # Table 9
    a1, a4 = experiments["experiment=table1/adalora"], experiments["experiment=table4/adalora"]
    assert (a1.method.rank, a1.method.target_rank) == (6, 4)     # over the E2E paper file's 4
    assert (a4.method.rank, a4.method.target_rank) == (8, 6)     # Sec. 5.3
    assert experiments["experiment=table5/delta-lora-branch-dropout"].method.lora_dropout == 0.1
    assert experiments["experiment=table5/delta-lora"].method.lora_dropout == 0.0
    assert swept(experiments["experiment=table6/lora-lr"]) == {"train.lr": [2e-4, 6e-4]}
    assert swept(experiments["experiment=table7/update-ratio"]) == {"method.update_ratio": list(range(6))}
    assert swept(experiments["experiment=table8/start-steps"]) == {"method.start_steps": list(range(0, 1001, 100))}


@pytest.mark.slow
def test_table4_experiments_take_each_tasks_paper_values(defaults):
    table4 = [e for e in EXPERIMENTS if e.startswith("table4/")]
    composed = _compose_all([[f"experiment={e}", f"task={t}"] for e in table4 for t in GLUE_TASKS])
    assert len(composed) == 7 * 8
    for name in table4:
        method = name.split("/")[1]
        for task in GLUE_TASKS:
            cfg = composed[f"experiment={name} task={task}"]
            _check_resolved(f"{name} {task}", cfg)
            train, method_cfg = (OmegaConf.to_container(n, resolve=True) for n in (cfg.train, cfg.method))
            assert train == defaults[(task, method)]["train"], (name, task)
            if method != "adalora":               # the AdaLoRA row pins its ranks
                assert method_cfg == defaults[(task, method)]["method"], (name, task)


def test_every_task_has_its_paper_files():
    # A task added without its paper values would silently train with generic ones.
    paper = CONFIGS / "paper"
    assert _names("paper/train") == TASKS
    for method in LORA_FAMILY:
        assert _names(f"paper/method/{method}") == TASKS, method
    assert not [m for m in FT_FAMILY if (paper / "method" / m).exists()]


def test_the_key_check_knows_every_composed_key_and_no_old_address(defaults):
    known = known_keys()
    for (task, method), cfg in defaults.items():
        keys = {k for k in _keys(cfg) if not any(k.startswith(f + ".") for f in FREE_FORM)}
        assert keys <= known, (task, method, sorted(keys - known))
    assert not [k for k in known if k.startswith("paper")]
    for old in ("task.hparams.lr=1e-3", "task.adalora.tinit=5", "method.rank.x=1"):
        assert re.match(r"unknown config key", check_keys([old]) or ""), old
    assert check_keys(["method.schedule.tinit=5", "task.label_smoothing=0.1", "train.lr=1e-3"]) is None
