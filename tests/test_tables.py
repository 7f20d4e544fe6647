"""Golden tests for the paper's numbers and the rendering of run records into tables."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deltalora_repro import config as config_module
from deltalora_repro import tables
from deltalora_repro.paper_numbers import GLUE_TASKS, PAPER_TABLES
from deltalora_repro.tables import RecordError, render_all, render_table, scan_records, specs_by_number


def _completed(results_dir: Path) -> list[dict]:
    return scan_records(results_dir).completed


def _table4(records, model: str, skipped=()) -> str:
    return render_table(specs_by_number()[4], records, model, skipped)

PAPER_TEXT = Path(__file__).resolve().parents[2] / "shared/paper/delta-lora-2309.02411.txt"


def _record(
    task: str,
    method: str,
    seed: int,
    score: float,
    *,
    model: str = "roberta-base",
    status: str = "completed",
    run_id: str | None = None,
    config: dict[str, Any] | None = None,
    final: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A run record as the training code writes it, GLUE-like unless `final` metrics are given."""
    best = {"epoch": 2, "step": 40, "accuracy": score}
    slug = f"{task.replace('/', '-')}-{method}-{model}"
    return {
        "schema": 1,
        "run_id": run_id or f"20261122-1601{seed:02d}-{slug}",
        "status": status,
        "task": task,
        "model": model,
        "method": method,
        "seed": seed,
        "experiment": None,                      # a plain command-line run
        "config": config or {},
        "metrics": {"primary": "accuracy", "evals": [best], "best": best, "final": final or best},
        "params": {"trainable": 294912, "extra_updated": 14155776 if method == "delta-lora" else 0},
        "git": {"commit": "0123456789abcdef", "dirty": False},
        "machine": {"hostname": "node1", "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"},
    }


def _write(results: Path, *records: dict[str, Any]) -> None:
    folder = results / "records"
    folder.mkdir(parents=True, exist_ok=True)
    for record in records:
        sub = folder / record["task"].replace("/", "_")
        sub.mkdir(exist_ok=True)
        (sub / f"{record['run_id']}.json").write_text(json.dumps(record))


def _cells(markdown: str, label: str) -> list[str]:
    """The cells of the first Markdown table row whose first cell is `label`."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in\n{markdown}")


# --- paper numbers -----------------------------------------------------------------------------


def test_paper_numbers_round_trip() -> None:
    assert PAPER_TABLES[4]["rows"]["delta-lora"]["rte"] == 87.00
    assert PAPER_TABLES[1]["rows"]["delta-lora"]["bleu"] == 70.84
    assert PAPER_TABLES[4]["rows"]["lora"]["avg"] == 87.12
    assert PAPER_TABLES[1]["rows"]["lora-paper"]["bleu"] == 70.4
    assert PAPER_TABLES[2]["rows"]["adalora"]["ter_all"] == 0.44
    assert PAPER_TABLES[3]["rows"]["ft"]["rougeLsum"] == 37.24
    assert PAPER_TABLES[5]["rows"]["delta-lora-branch-dropout"]["meteor"] == 46.38
    assert PAPER_TABLES[6]["rows"]["lora-lr6e-4"]["cider"] == 2.39
    assert PAPER_TABLES[7]["rows"]["0"]["bleu"] == 68.94
    assert PAPER_TABLES[8]["rows"]["900"]["bleu"] == 71.00
    assert PAPER_TABLES[1]["params"]["delta-lora"] == {"trainable": "0.375M", "extra_updated": "48M"}
    assert PAPER_TABLES[4]["params"]["ft"]["trainable"] == "118.87M"


def test_paper_tables_are_complete() -> None:
    models = {1: "gpt2-medium", 2: "gpt2-medium", 3: "bart-large", 4: "roberta-base"}
    for number, table in PAPER_TABLES.items():
        assert table["model"] == models.get(number, "gpt2-medium")
        for row in table["rows"].values():
            assert list(row) == table["columns"]
    assert list(PAPER_TABLES[7]["rows"]) == [str(v) for v in range(6)]
    assert list(PAPER_TABLES[8]["rows"]) == [str(v) for v in range(0, 1001, 100)]


def test_table4_paper_avg_is_the_mean_of_its_tasks() -> None:
    # The paper's AVG is the task mean up to its last digit (it truncates some, e.g. 87.3875 -> 87.38).
    for row in PAPER_TABLES[4]["rows"].values():
        assert abs(sum(row[t] for t in GLUE_TASKS) / 8 - row["avg"]) < 0.011


@pytest.mark.skipif(not PAPER_TEXT.exists(), reason="paper text not available")
def test_paper_numbers_match_the_paper_text() -> None:
    """Every transcribed row appears, in order, as a line of numbers in the paper text."""
    printed = [
        [float(x) for x in re.findall(r"(?<![\w.])-?\d+\.?\d*(?![\w.])", line.split("|", 1)[1])]
        for line in PAPER_TEXT.read_text(encoding="utf-8").splitlines()
        if line.count("|") >= 5
    ]
    for number, table in PAPER_TABLES.items():
        for key, row in table["rows"].items():
            values = list(row.values())
            found = any(nums[-len(values):] == values for nums in printed if len(nums) >= len(values))
            assert found, f"Table {number} row {key} {values} not in the paper text"


# --- loading -----------------------------------------------------------------------------------


def test_load_records_skips_but_counts_unfinished(tmp_path: Path) -> None:
    failed = _record("glue/rte", "lora", 1, 0.7, status="failed")
    _write(tmp_path, _record("glue/rte", "lora", 0, 0.8), failed)
    assert [r["seed"] for r in _completed(tmp_path)] == [0]
    assert [r["status"] for r in scan_records(tmp_path).skipped] == ["failed"]


def test_malformed_record_names_the_file(tmp_path: Path) -> None:
    _write(tmp_path, _record("glue/rte", "lora", 0, 0.8))
    bad = tmp_path / "records" / "deep" / "broken.json"
    bad.parent.mkdir()
    bad.write_text('{"status": "completed", ')
    loaded = scan_records(tmp_path)       # the good record still counts; the broken one is named
    assert [r["seed"] for r in loaded.completed] == [0]
    assert len(loaded.unreadable) == 1 and "broken.json" in loaded.unreadable[0]


def test_record_missing_keys_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "partial.json").write_text('{"status": "completed", "task": "glue/rte"}')
    (problem,) = scan_records(tmp_path).unreadable
    assert re.search(r"partial\.json.*run_id", problem)


def test_tables_without_records_is_a_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tables.main(["--results", str(tmp_path / "nonexistent")])
    assert exit_info.value.code == 2 and "no run records under" in capsys.readouterr().err
    assert not (tmp_path / "nonexistent").exists()


# --- Table 4 ------------------------------------------------------------------------------------


def _glue_results(tmp_path: Path) -> Path:
    records = [
        # Delta-LoRA on RTE: three seeds, median 0.8664; a failed fourth run.
        _record("glue/rte", "delta-lora", 0, 0.8664),
        _record("glue/rte", "delta-lora", 1, 0.8520),
        _record("glue/rte", "delta-lora", 2, 0.8700),
        _record("glue/rte", "delta-lora", 3, 0.10, status="failed"),
        # LoRA on all 8 tasks, one seed each, 0.80 everywhere except CoLA 0.60.
        *(_record(f"glue/{t}", "lora", 0, 0.60 if t == "cola" else 0.80) for t in GLUE_TASKS),
        # A method the paper does not have; and a second model.
        _record("glue/rte", "vera", 0, 0.75),
        _record("glue/rte", "delta-lora", 0, 0.61, model="minilm-l6"),
        _record("glue/rte", "delta-lora", 1, 0.63, model="minilm-l6"),
    ]
    _write(tmp_path, *records)
    return tmp_path


def test_table4_cells(tmp_path: Path) -> None:
    loaded = scan_records(_glue_results(tmp_path))
    md = _table4(loaded.completed, "roberta-base", loaded.skipped)

    delta = _cells(md, "Delta-LoRA")
    header = _cells(md, "Method")
    assert header == [
        "Trainable", "Extra updated", "MNLI", "SST-2", "MRPC", "CoLA", "QNLI", "QQP", "RTE", "STS-B", "AVG"
    ]
    assert delta[header.index("RTE")] == "86.64 (paper 87.00, n=3, sd 0.95)"
    assert delta[header.index("MNLI")] == "– (paper 87.50)"
    assert delta[header.index("AVG")] == "– (paper 87.38)"  # not all 8 tasks ran
    assert delta[:2] == ["0.281M (paper 0.28M)", "13.50M (paper 13.5M)"]

    lora = _cells(md, "LoRA")
    assert lora[header.index("RTE")] == "80.00 (paper 86.64)"  # one seed: no n, no sd
    assert lora[header.index("AVG")] == "77.50 (paper 87.12)"  # (7 * 80 + 60) / 8
    assert lora[1] == "0 (paper 0)"

    assert _cells(md, "Full Fine-Tuning")[header.index("RTE")] == "– (paper 84.11)"
    assert _cells(md, "vera")[header.index("RTE")] == "75.00"  # no paper number to show
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")]
    assert rows[1:9] == [
        "Full Fine-Tuning", "Fine-Tuning† (embeddings frozen)", "Fine-Tuning‡ (Wq, Wv only)",
        "LoRA", "DyLoRA", "AdaLoRA", "Delta-LoRA", "vera",
    ]

    assert "Ours and the paper's: `roberta-base`." in md
    assert "Not completed, not shown: 1 run(s)" in md
    assert "| `20261122-160100-" in md and "`0123456789`" in md and "node1 / NVIDIA H100 80GB HBM3" in md
    assert "minilm" not in md  # the other model's runs are not mixed in


def test_table4_other_model_keeps_paper_numbers(tmp_path: Path) -> None:
    md = _table4(_completed(_glue_results(tmp_path)), "minilm-l6")
    header = _cells(md, "Method")
    assert _cells(md, "Delta-LoRA")[header.index("RTE")] == "62.00 (paper 87.00, n=2, sd 1.41)"
    assert "Ours: `minilm-l6`. The paper's numbers beside ours are for `roberta-base`." in md


def test_rerun_of_a_seed_supersedes_the_older_run(tmp_path: Path) -> None:
    old = _record("glue/rte", "lora", 0, 0.50, run_id="20261122-100000-aaaaaa")
    new = _record("glue/rte", "lora", 0, 0.70, run_id="20261123-100000-bbbbbb")
    md = _table4([new, old], "roberta-base")
    assert _cells(md, "LoRA")[_cells(md, "Method").index("RTE")] == "70.00 (paper 86.64)"
    assert "Superseded by a later run of the same seed (or by this table's own study run of it): `20261122-100000-aaaaaa`." in md


def test_missing_primary_metric_names_the_run() -> None:
    record = _record("glue/rte", "lora", 0, 0.5)
    record["metrics"]["primary"] = "matthews_correlation"
    with pytest.raises(RecordError, match=record["run_id"]):
        _table4([record], "roberta-base")


# --- all tables ----------------------------------------------------------------------------------


def test_render_all_files(tmp_path: Path) -> None:
    files = render_all(_glue_results(tmp_path))
    assert "table4_glue__roberta-base.md" in files and "table4_glue__minilm-l6.md" in files
    assert "table4_glue__roberta-base.tex" in files
    # Every table is rendered for the paper's model, showing the paper's numbers while runs are pending.
    assert {name.split("__")[0] for name in files} == {spec.slug for spec in tables.TABLE_SPECS}
    assert "– (paper 70.84)" in files["table1_e2e__gpt2-medium.md"]
    tex = files["table4_glue__roberta-base.tex"]
    assert r"\begin{tabular}{l" + "c" * 11 + "}" in tex  # 2 counts + 8 tasks + AVG
    assert "86.64 (paper 87.00, n=3, sd 0.95)" in tex


def test_main_writes_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = _glue_results(tmp_path)
    stale = results / "tables" / "table4_glue__gone.md"
    stale.parent.mkdir()
    stale.write_text("old")
    tables.main(["--results", str(results)])
    assert (results / "tables" / "table4_glue__minilm-l6.md").exists()
    assert not stale.exists()
    assert "86.64 (paper 87.00, n=3, sd 0.95)" in capsys.readouterr().out


def _e2e(method: str, bleu: float, lr: float = 2e-4, **method_cfg: float) -> dict[str, Any]:
    """One E2E run (seed 0); e2e-metrics style fractions for BLEU, METEOR and ROUGE-L."""
    # Scored as runs score E2E now: the numbers say their procedure (tables show paper's).
    final = {"bleu": bleu, "nist": 8.8, "meteor": 0.46, "rouge_l": 0.72, "cider": 2.5, "procedure": "paper"}
    config = {"method": method_cfg, "train": {"lr": lr}}
    run_id = f"20261122-160100-{method}-lr{lr}-" + "-".join(f"{k}{v}" for k, v in method_cfg.items())
    return _record("e2e", method, 0, 0.0, model="gpt2-medium", run_id=run_id, config=config, final=final)


def test_e2e_runs_land_in_their_tables() -> None:
    records = [
        _e2e("delta-lora", 0.7084, update_ratio=2, start_steps=500, lora_dropout=0.0),
        _e2e("delta-lora", 0.6900, update_ratio=3, start_steps=500),
        _e2e("delta-lora", 0.7000, update_ratio=2, start_steps=500, lora_dropout=0.1),
        _e2e("lora", 0.6960),
        _e2e("lora", 0.6963, lr=6e-4),
    ]
    spec = tables.SPECS_BY_NUMBER
    t1 = tables.render_table(spec[1], records, "gpt2-medium")
    assert _cells(t1, "Delta-LoRA")[2:4] == ["70.84 (paper 70.84)", "8.80 (paper 8.91)"]
    assert _cells(t1, "LoRA")[2] == "69.60 (paper 69.60)"  # the lr 6e-4 run is Table 6's
    assert _cells(t1, "LoRA (as published by Hu et al.)")[2] == "– (paper 70.40)"
    t5 = tables.render_table(spec[5], records, "gpt2-medium")
    assert _cells(t5, "Delta-LoRA + LoRA module (dropout in the branch)")[2] == "70.00 (paper 70.29)"
    t6 = tables.render_table(spec[6], records, "gpt2-medium")
    assert _cells(t6, "LoRA, lr 6e-4")[0] == "69.63 (paper 69.63)"
    t7 = tables.render_table(spec[7], records, "gpt2-medium")
    assert _cells(t7, "λ = 3")[0] == "69.00 (paper 70.14)"
    assert _cells(t7, "λ = 2")[0] == "70.84 (paper 70.84)"
    assert _cells(t7, "λ = 0")[0] == "– (paper 68.94)"
    t8 = tables.render_table(spec[8], records, "gpt2-medium")
    assert _cells(t8, "K = 500")[0] == "70.84 (paper 70.84)"


def test_study_runs_stay_in_their_study_table(tmp_path):
    """A Table 7 sweep run (reduced training set) fills its λ row in Table 7 and never a Table 1
    cell; a run without an experiment config may fill any table whose row settings it matches."""
    from deltalora_repro.tables import SPECS_BY_NUMBER, belongs
    sweep = _record("e2e", "delta-lora", 0, 0.7)
    sweep["experiment"] = "table7/update-ratio"
    plain = _record("e2e", "delta-lora", 0, 0.7)
    main = _record("glue/rte", "lora", 0, 0.7)
    main["experiment"] = "table4/lora"
    t1, t4, t7 = (SPECS_BY_NUMBER[n] for n in (1, 4, 7))
    assert belongs(t7, sweep) and not belongs(t1, sweep)
    assert belongs(t1, plain) and belongs(t7, plain)
    assert belongs(t4, main) and not belongs(t1, main)


def test_an_unscored_rerun_does_not_hide_a_scored_run() -> None:
    """A later run of the same seed that was decoded but not scored (no BLEU yet) leaves the
    older scored run in the cell; once a later run has the metric, it supersedes."""
    scored = _e2e("lora", 0.6960)
    unscored = _e2e("lora", 0.0)
    unscored["run_id"] = "20261122-170000-lora-unscored"
    unscored["metrics"]["final"] = {"val_loss": 1.2}
    unscored["config"]["task"] = {"score": False}          # decoded on the GPU, scored later
    t1 = tables.render_table(tables.SPECS_BY_NUMBER[1], [scored, unscored], "gpt2-medium")
    assert _cells(t1, "LoRA")[2] == "69.60 (paper 69.60)"
    later = _e2e("lora", 0.7000)
    later["run_id"] = "20261122-180000-lora-later"
    t1 = tables.render_table(tables.SPECS_BY_NUMBER[1], [scored, unscored, later], "gpt2-medium")
    assert _cells(t1, "LoRA")[2] == "70.00 (paper 69.60)"


def test_a_later_plain_run_does_not_replace_a_study_row() -> None:
    """A Table 7 sweep row (its own reduced setting) keeps its run when a later run without an
    experiment config matches the same row and seed; that run still fills Table 1."""
    sweep = _e2e("delta-lora", 0.6751, update_ratio=2, start_steps=500, lora_dropout=0.0)
    sweep["experiment"] = "table7/update-ratio"
    later = _e2e("delta-lora", 0.6625, update_ratio=2, start_steps=500, lora_dropout=0.0)
    later["run_id"] = "29991231-000000-later"
    t7 = tables.render_table(tables.SPECS_BY_NUMBER[7], [sweep, later], "gpt2-medium")
    assert _cells(t7, "λ = 2")[0] == "67.51 (paper 70.84)"
    assert "29991231-000000-later" in t7.split("Superseded")[1].split("\n")[0]
    t1 = tables.render_table(tables.SPECS_BY_NUMBER[1], [sweep, later], "gpt2-medium")
    assert _cells(t1, "Delta-LoRA")[2] == "66.25 (paper 70.84)"


@pytest.mark.parametrize("change,reason", [
    ({"train": {"lr": 2e-4, "max_steps": 20}}, "train.max_steps=20"),
    ({"task": {"train_max_examples": 16000}}, "task.train_max_examples=16000"),
    ({"train": {"lr": 2e-4, "epochs": 1}, "task": {"hparams": {"epochs": 5}}}, "train.epochs=1 (paper: 5)"),
])
def test_trial_runs_fill_no_cell_and_are_listed_apart(change, reason) -> None:
    """A run outside the paper's protocol (shortened, on a subset, fewer epochs) never fills a
    cell, even as the only run of its row; the table lists it with the reason."""
    protocol = _e2e("lora", 0.6960)
    protocol["config"]["train"]["epochs"] = 5
    protocol["config"]["task"] = {"hparams": {"epochs": 5}}
    trial = _e2e("lora", 0.5000)
    trial["run_id"] = "20261129-170000-trial"
    trial["config"].update(change)
    t1 = tables.render_table(tables.SPECS_BY_NUMBER[1], [trial], "gpt2-medium")
    assert _cells(t1, "LoRA")[2] == "– (paper 69.60)"
    assert f"`20261129-170000-trial` ({reason})" in t1
    both = tables.render_table(tables.SPECS_BY_NUMBER[1], [protocol, trial], "gpt2-medium")
    assert _cells(both, "LoRA")[2] == "69.60 (paper 69.60)"


@pytest.mark.parametrize("train,reason", [
    # Every value compared with the composed config of E2E x LoRA (configs/paper/train/e2e.yaml:
    # Table 9) and with Table 6's swept learning rates.
    ({"lr": 2e-4, "epochs": 1}, "train.epochs=1 (paper: 5)"),
    ({"lr": 5e-4}, "train.lr=0.0005 (paper: 0.0002 or 0.0006)"),
    ({"lr": 2e-4, "batch_size": 16}, "train.batch_size=16 (paper: 8)"),
    ({"lr": 2e-4, "warmup_steps": 20}, "train.warmup_steps=20 (paper: 500)"),
    ({"lr": 2e-4, "weight_decay": 0.1}, "train.weight_decay=0.1 (paper: 0.01)"),
    ({"lr": 2e-4, "max_grad_norm": 1.0}, "train.max_grad_norm=1.0 (paper: null)"),
])
def test_a_run_follows_the_protocol_only_with_the_paper_training_settings(train, reason) -> None:
    """A record without task.hparams (written since the paper's values live in configs/paper/) is
    judged on every train.* setting of the protocol against the composed config of its task and
    method."""
    protocol = _e2e("lora", 0.6960)
    protocol["config"]["train"] = {"lr": 2e-4, "batch_size": 8, "epochs": 5, "weight_decay": 0.01,
                                   "warmup_ratio": 0.0, "warmup_steps": 500, "max_grad_norm": None}
    assert tables.trial_reasons(protocol) == []
    trial = _e2e("lora", 0.5000)
    trial["run_id"] = "20261129-170000-trial"
    trial["config"]["train"] = {**protocol["config"]["train"], **train}
    assert tables.trial_reasons(trial) == [reason]
    t1 = tables.render_table(tables.SPECS_BY_NUMBER[1], [protocol, trial], "gpt2-medium")
    assert _cells(t1, "LoRA")[2] == "69.60 (paper 69.60)"
    assert f"`20261129-170000-trial` ({reason})" in t1


def test_old_records_are_judged_as_they_were_written() -> None:
    """Records from when the task config carried task.hparams compare epochs and batch size with
    those, as then: an old Table 6 run at lr 6e-4 (task.hparams.lr 2e-4) fills its cell, and so
    does a run of today at that lr (Table 6's sweep), while 5e-4 is no study's value."""
    old = _e2e("lora", 0.6963, lr=6e-4)
    old["config"]["train"].update(epochs=5, batch_size=8, warmup_steps=20)
    old["config"]["task"] = {"hparams": {"lr": 2e-4, "epochs": 5, "batch_size": 8, "warmup_steps": 500}}
    now = _e2e("lora", 0.6963, lr=6e-4)
    now["config"]["train"].update(epochs=5, batch_size=8)
    off = _e2e("lora", 0.6963, lr=5e-4)
    assert tables.trial_reasons(old) == [] and tables.trial_reasons(now) == []
    assert tables.trial_reasons(off) == ["train.lr=0.0005 (paper: 0.0002 or 0.0006)"]
    for record in (old, now):
        t6 = tables.render_table(tables.SPECS_BY_NUMBER[6], [record], "gpt2-medium")
        assert _cells(t6, "LoRA, lr 6e-4")[0] == "69.63 (paper 69.63)"
    shortened = _e2e("lora", 0.6963)
    shortened["config"]["train"]["epochs"] = 1
    shortened["config"]["task"] = {"hparams": {"epochs": 1}}          # its own task.hparams said 1
    assert tables.trial_reasons(shortened) == []


def test_an_experiment_run_is_judged_against_its_experiment() -> None:
    """experiment=table4/lora task=glue/sst2 is Table 13's SST-2 setting (lr 5e-4, 60 epochs); RTE's
    lr there is a departure. A task or experiment with no config is named, never a cell."""
    sst2 = _record("glue/sst2", "lora", 0, 0.95, config={"train": {"lr": 5e-4, "epochs": 60}})
    sst2["experiment"] = "table4/lora"
    assert tables.trial_reasons(sst2) == []
    sst2["config"]["train"]["lr"] = 4e-4
    assert tables.trial_reasons(sst2) == ["train.lr=0.0004 (paper: 0.0005)"]
    gone = _record("glue/wnli", "lora", 0, 0.5, config={"train": {"lr": 5e-4}})
    assert tables.trial_reasons(gone) == [
        "no config to compare its settings with (In 'config': Could not find 'task/glue/wnli')"]


@pytest.fixture
def config_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A copy of the package's configs that the tables read instead (caches emptied around)."""
    copy = tmp_path / "configs"
    shutil.copytree(tables.CONFIG_DIR, copy)
    cached = (tables.composed, tables.table_specs, tables.protocol_train, tables._studies)
    for function in cached:
        function.cache_clear()
    monkeypatch.setattr(tables, "CONFIG_DIR", copy)
    monkeypatch.setattr(config_module, "CONFIG_DIR", copy)        # what compose() reads
    yield copy
    for function in cached:
        function.cache_clear()


def test_rows_and_protocol_follow_the_configs(config_copy: Path) -> None:
    """Table rows and the protocol are read from the configs, not restated: change the paper's
    E2E lambda and epochs and Table 7's sweep, and the tables follow."""
    delta = config_copy / "paper/method/delta-lora/e2e.yaml"
    delta.write_text(delta.read_text().replace("update_ratio: 2 ", "update_ratio: 3 "))
    train = config_copy / "paper/train/e2e.yaml"
    train.write_text(train.read_text().replace("epochs: 5", "epochs: 4"))
    sweep = config_copy / "experiment/table7/update-ratio.yaml"
    sweep.write_text(sweep.read_text().replace("method.update_ratio: 0,1,2,3,4,5", "method.update_ratio: 0,2"))
    specs = tables.specs_by_number()
    assert specs[1].rows["delta-lora"][tables.UPDATE_RATIO] == 3
    assert list(specs[7].rows) == ["0", "2"]
    assert all(m[tables.UPDATE_RATIO] == 3 for m in specs[8].rows.values())     # Table 8's lambda
    assert specs[6].labels["delta-lora"] == "Delta-LoRA, lr 2e-4, λ = 3"
    run = _e2e("delta-lora", 0.7, update_ratio=3, start_steps=500, lora_dropout=0.0)
    run["config"]["train"]["epochs"] = 5
    assert tables.trial_reasons(run) == ["train.epochs=5 (paper: 4)"]


def test_e2e_rows_are_the_experiment_configs_and_the_paper_rows() -> None:
    """The E2E rows carry Table 9's setting (lr 2e-4, lambda 2, K 500, no branch dropout), Table
    5's ablation dropout 0.1, and one row per swept value: the paper's rows of Tables 6-8."""
    specs = tables.SPECS_BY_NUMBER
    delta = specs[1].rows["delta-lora"]
    assert (delta[tables.LR], delta[tables.UPDATE_RATIO], delta[tables.START_STEPS]) == (2e-4, 2, 500)
    assert delta[tables.BRANCH_DROPOUT](0.0) and delta[tables.BRANCH_DROPOUT](tables._ABSENT)
    assert not delta[tables.BRANCH_DROPOUT](0.1)
    ablation = specs[5].rows["delta-lora-branch-dropout"]
    assert ablation[tables.BRANCH_DROPOUT](0.1) and not ablation[tables.BRANCH_DROPOUT](0.0)
    assert specs[1].rows["lora"] == {"method": "lora", tables.LR: 2e-4}
    for number in (6, 7, 8):
        assert list(specs[number].rows) == list(PAPER_TABLES[number]["rows"]), number


def test_runs_with_warnings_or_non_finite_metrics_fill_no_cell() -> None:
    never_moved = _e2e("delta-lora", 0.7084, update_ratio=2, start_steps=500, lora_dropout=0.0)
    never_moved["warnings"] = ["delta-lora: method.start_steps (K=500) >= the run's 20 optimizer steps"]
    nan = _record("glue/rte", "lora", 0, float("nan"))
    t1 = tables.render_table(tables.SPECS_BY_NUMBER[1], [never_moved], "gpt2-medium")
    assert _cells(t1, "Delta-LoRA")[2] == "– (paper 70.84)" and "warned: delta-lora" in t1
    t4 = _table4([nan], "roberta-base")
    assert "non-finite metrics" in t4 and "nan" not in _cells(t4, "LoRA")[2].lower()


def test_committed_tables_are_the_rendering_of_the_committed_records() -> None:
    """results/tables holds exactly what `make tables` writes from results/records and
    results/scores (nothing typed by hand, nothing stale)."""
    results = Path(__file__).resolve().parents[1] / "results"
    for procedure in tables.PROCEDURE_CHOICES:
        for name, text in render_all(results, procedure=procedure).items():
            assert (results / "tables" / name).read_text(encoding="utf-8") == text, name


# --- rendering needs no torch ------------------------------------------------------------------

_PURE_RENDER = """
import importlib.util, json, sys
heavy = ("torch", "transformers", "peft")
print("INSTALLED " + json.dumps([m for m in heavy if importlib.util.find_spec(m) is not None]))
from deltalora_repro import tables
results = sys.argv[1]
tables.main(["--results", results])
tables.main(["--results", results, "--procedure", "official"])
print("TABLES " + json.dumps([m for m in heavy if m in sys.modules]), flush=True)
from deltalora_repro import figure3
assert figure3.main(["--results", results]) == 0
print("FIGURE3 " + json.dumps([m for m in heavy if m in sys.modules]))
"""


def test_make_tables_loads_no_torch(tmp_path: Path) -> None:
    """The commands of `make tables` on a results folder without saved weights: every table (both
    procedures), the index and the (empty) Figure 3 step, in a fresh interpreter that never
    imports torch, transformers or peft."""
    results = _glue_results(tmp_path / "results")
    _write(results, _e2e("delta-lora", 0.7084, update_ratio=2, start_steps=500, lora_dropout=0.0),
           _e2e("lora", 0.6960))
    (results / "bench").mkdir()
    (results / "bench" / "20261122-185003-ea9b17.json").write_text(json.dumps({
        "kind": "bench", "args": {"shape": "gpt2-medium", "methods": "lora,delta-lora"},
        "git": {"commit": "0123456789abcdef"}, "machine": {"device_name": "NVIDIA H200"}}))
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _PURE_RENDER, str(results)], cwd=root,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    said = {}
    for line in done.stdout.splitlines():
        tag, _, value = line.partition(" ")
        if tag in ("INSTALLED", "TABLES", "FIGURE3"):
            said[tag] = json.loads(value)
    # Not vacuous: torch and transformers are installed here, so an import would have succeeded.
    assert {"torch", "transformers"} <= set(said["INSTALLED"])
    assert "TABLES" in said, done.stderr[-2000:]
    assert said["TABLES"] == [], f"rendering the tables imported {said['TABLES']}"
    assert done.returncode == 0, done.stderr[-2000:]
    assert said["FIGURE3"] == [], f"Figure 3 without saved weights imported {said['FIGURE3']}"
    # What was rendered: every table, the official-procedure copies, the index with both kinds.
    written = {p.name for p in (results / "tables").iterdir()}
    assert {n.split("__")[0] for n in written} == {spec.slug for spec in tables.TABLE_SPECS}
    assert "table1_e2e__gpt2-medium__official.md" in written
    assert "70.84 (paper 70.84)" in (results / "tables" / "table1_e2e__gpt2-medium.md").read_text()
    index = (results / "README.md").read_text()
    assert "`20261122-160100-lora-lr0.0002-`" in index and "`20261122-185003-ea9b17`" in index
    assert not (results / "figures").exists()
    assert "no Figure 3" in done.stdout
