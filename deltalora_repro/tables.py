"""Render run records into the paper's Tables 1-8, our numbers beside the paper's.

    python -m deltalora_repro.tables [--results results]

reads every `results/records/**/*.json` and writes `results/tables/<table>__<model>.{md,tex}` and
the index of run and benchmark records, `results/README.md`. Figure 3 needs the saved weights and
torch: `python -m deltalora_repro.figure3 --results results` draws it; `make tables` runs both.
Rendering is pure: records (and the package's configs) in, text out, and no torch, so tables
render wherever the records are. A table is data (`TableSpec`): which records belong to which row
(a matcher on record fields and resolved-config values) and column (a task and a metric), and how
a record's metric becomes a cell (which metrics dict, which scale). What a row or the paper's
protocol compares a run's settings with is read from the composed Hydra configs (the paper's
values in configs/paper/, the studies in configs/experiment/), never restated here.

E2E and WebNLG numbers depend on the scoring procedure (metrics/e2e.py, metrics/webnlg.py): every
such table is rendered for one procedure per task, named above the table (default: paper, the
procedure behind the paper's numbers), so a column never mixes procedures; runs scored with
other procedures only are listed under the table. `--procedure official` renders the same
tables with the official procedures into `<table>__<model>__official.{md,tex}`.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from deltalora_repro import records as run_records
from deltalora_repro.config import CONFIG_DIR, compose
from deltalora_repro.errors import DataError
from deltalora_repro.paper_numbers import GLUE_TASKS, PAPER_TABLES, PaperTable

Record = dict[str, Any]

MISSING_MARK = "–"
_REQUIRED_KEYS = ("run_id", "status", "task", "model", "method", "seed", "metrics")


class RecordError(DataError):
    """A run record that cannot be read or lacks what a table needs; names the file or run."""


# ---------------------------------------------------------------------------------------------
# Loading


class LoadedRecords(NamedTuple):
    completed: list[Record]
    skipped: list[Record]  # status != "completed" (failed, running, ...): counted, never tabulated
    unreadable: list[str] = []  # "path: why" of files that are no usable run record


def scan_records(results_dir: Path) -> LoadedRecords:
    """Read every `*.json` under `results_dir/records/`, split into completed and the rest."""
    completed: list[Record] = []
    skipped: list[Record] = []
    unreadable: list[str] = []
    # One broken file must not take every table down: it is set aside and named.
    for path in sorted((Path(results_dir) / "records").rglob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            unreadable.append(f"{path}: malformed run record ({exc})")
            continue
        if not isinstance(record, dict) or "status" not in record:
            unreadable.append(f"{path}: malformed run record (not an object with a 'status' key)")
            continue
        if record["status"] != "completed":
            skipped.append(record)
            continue
        missing = [key for key in _REQUIRED_KEYS if key not in record]
        if missing:
            unreadable.append(f"{path}: malformed run record (missing keys {missing})")
            continue
        completed.append(record)
    _merge_scores(Path(results_dir), completed)
    return LoadedRecords(completed, skipped, unreadable)


def _merge_scores(results_dir: Path, completed: list[Record]) -> None:
    """Scores computed after the run (`python -m deltalora_repro.score_run`) join its final
    metrics, each procedure's under its name (`procedures`); the run record on disk is never
    changed."""
    by_id = {r["run_id"]: r for r in completed}
    for path in sorted((results_dir / "scores").rglob("*.json")):
        score = json.loads(path.read_text(encoding="utf-8"))
        run = by_id.get(score.get("run_id"))
        if run is None:
            continue
        final = run.setdefault("metrics", {}).setdefault("final", {})
        task = run["task"]
        procedures = run_records.scores_by_procedure(task, final)
        if "procedures" in score:
            later = {name: entry["metrics"] for name, entry in score["procedures"].items()}
        else:
            later = run_records.scores_by_procedure(task, score["metrics"])
        procedures.update(later)
        final.update(score["metrics"])
        if procedures:
            final["procedures"] = procedures
            final["procedure"] = score.get("procedure") or next(iter(later), None)
        run["scored_by"] = {"path": str(path), "commit": score.get("git", {}).get("commit")}


# ---------------------------------------------------------------------------------------------
# Table specs: which records go to which cell

_ABSENT = object()  # a config path the record does not have

# Where a record's resolved config keeps the hyperparameters that tell the E2E runs of Tables 1
# and 5-8 apart; what each row compares them with is read from the composed configs below.
LR = "config.train.lr"
UPDATE_RATIO = "config.method.update_ratio"
START_STEPS = "config.method.start_steps"
BRANCH_DROPOUT = "config.method.lora_dropout"

# A matcher maps a record field or dotted config path to the value it must equal (numbers compare
# as floats, so 2 == 2.0 and 2e-4 == 0.0002) or to a predicate on the value (`_ABSENT` if absent).
Matcher = Mapping[str, object]


# ---------------------------------------------------------------------------------------------
# The paper's settings, read from the package's Hydra configs (the same files a run composes), so
# that the tables cannot drift from them. Composing loads no torch.

@functools.cache
def composed(*overrides: str) -> Any:
    """The config a run with these command-line overrides composes, with its `hydra` node (an
    experiment's sweep); cached, as every record of a task x method asks for the same one."""
    return compose(*overrides, hydra_node=True)


def swept(cfg: Any) -> dict[str, list[Any]]:
    """{dotted key: values} of an experiment's sweep (`hydra.sweeper.params`), parsed as Hydra
    parses them (`2e-4,6e-4` -> [0.0002, 0.0006])."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = cfg.hydra.sweeper.get("params") or {}
    parser = OverridesParser.create()
    out = {}
    for key, value in params.items():
        override = parser.parse_overrides([f"{key}={value}"])[0]
        out[key] = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    return out


def _short(x: Any) -> str:
    """A number as the paper prints it: 2e-4, 0.5, 2, 500."""
    if isinstance(x, float) and x != 0 and abs(x) < 1e-3:
        mantissa, exponent = f"{x:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{x:g}"


def _dropout_is(want: float):
    """Branch dropout equal to `want`; an absent key (records of code without it) means none."""
    def ok(value: object) -> bool:
        return _same(0.0 if value is _ABSENT or value is None else value, want)
    return ok


# On E2E the paper runs LoRA and Delta-LoRA at several settings (Tables 5-8); each row pins the
# settings that tell it apart, as the row's experiment config sets them, so a sweep run never
# lands in Table 1. Those settings, per method: LoRA's learning rate (Table 6); Delta-LoRA's
# learning rate, branch dropout (Table 5), lambda (Table 7) and K (Table 8).
_STUDIED = {"lora": {LR: "train.lr"},
            "delta-lora": {LR: "train.lr", BRANCH_DROPOUT: "method.lora_dropout",
                           UPDATE_RATIO: "method.update_ratio", START_STEPS: "method.start_steps"}}


def _experiment_row(experiment: str, vary: Mapping[str, Any] | None = None) -> Matcher:
    """The matcher of the run an experiment config pins (`vary`: one point of its sweep, by
    dotted config key), on the settings that tell E2E runs apart."""
    from omegaconf import OmegaConf

    cfg = composed(f"experiment={experiment}")
    vary = vary or {}
    matcher: dict[str, object] = {"method": cfg.method.name}
    for path, key in _STUDIED[cfg.method.name].items():
        value = vary[key] if key in vary else OmegaConf.select(cfg, key, throw_on_missing=True)
        matcher[path] = _dropout_is(value) if path == BRANCH_DROPOUT else value
    return matcher


@dataclass(frozen=True)
class Column:
    key: str  # column key in paper_numbers
    label: str
    task: str  # record["task"] of the runs in this column
    metric: str | None = None  # key in the record's metrics dict; None: the record's primary metric
    scale: float = 1.0  # record value × scale = the paper's printed unit


@dataclass(frozen=True)
class TableSpec:
    number: int
    slug: str  # file name stem
    columns: tuple[Column, ...]
    rows: Mapping[str, Matcher | None]  # row key -> matcher, in display order; None: paper only
    split: str = "final"  # which dict of record["metrics"] holds the cell values
    average: bool = False  # add the paper's AVG column: mean of all columns of a row
    open_rows: bool = False  # also a row for each other method found among the table's records
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def paper(self) -> PaperTable:
        return PAPER_TABLES[self.number]

    @property
    def tasks(self) -> set[str]:
        return {column.task for column in self.columns}


LABELS = {
    "ft": "Full Fine-Tuning",
    "ft-noembed": "Fine-Tuning† (embeddings frozen)",
    "ft-qv": "Fine-Tuning‡ (Wq, Wv only)",
    "lora": "LoRA",
    "lora-paper": "LoRA (as published by Hu et al.)",
    "dylora": "DyLoRA",
    "adalora": "AdaLoRA",
    "delta-lora": "Delta-LoRA",
}
_METHOD_ROWS = ("ft", "ft-noembed", "ft-qv", "lora", "dylora", "adalora", "delta-lora")


def _method_rows(*, reference_lora: bool) -> dict[str, Matcher | None]:
    rows: dict[str, Matcher | None] = {}
    for key in _METHOD_ROWS:
        rows[key] = {"method": key}
        if key == "lora" and reference_lora:  # Tables 1-2 also print the LoRA paper's own numbers
            rows["lora-paper"] = None
    return rows


def _e2e_columns() -> tuple[Column, ...]:
    # e2e-metrics reports BLEU, METEOR and ROUGE-L as fractions, NIST and CIDEr as printed.
    return (
        Column("bleu", "BLEU", "e2e", "bleu", 100.0),
        Column("nist", "NIST", "e2e", "nist"),
        Column("meteor", "METEOR", "e2e", "meteor", 100.0),
        Column("rouge_l", "ROUGE-L", "e2e", "rouge_l", 100.0),
        Column("cider", "CIDEr", "e2e", "cider"),
    )


def _webnlg_columns() -> tuple[Column, ...]:
    # GenerationEval reports BLEU in 0-100 and METEOR, TER as fractions, as the paper prints them.
    return tuple(
        Column(f"{metric}_{split}", f"{metric.upper()} {split[0].upper()}", "webnlg", f"{metric}_{split}")
        for metric in ("bleu", "meteor", "ter")
        for split in ("seen", "unseen", "all")
    )


_XSUM_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
_GLUE_LABELS = {
    "mnli": "MNLI", "sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA",
    "qnli": "QNLI", "qqp": "QQP", "rte": "RTE", "stsb": "STS-B",
}


def _sweep_spec(number: int, slug: str, experiment: str, key: str, values: Sequence[Any],
                symbol: str) -> "TableSpec":
    """Tables 7 and 8: one row per value an experiment sweeps `key` over."""
    return TableSpec(number=number, slug=slug, columns=_e2e_columns(),
                     rows={_short(v): _experiment_row(experiment, {key: v}) for v in values},
                     labels={_short(v): f"{symbol} = {_short(v)}" for v in values})

@functools.cache
def table_specs() -> tuple[TableSpec, ...]:
    """Every table's spec. Built on first use: the E2E rows read the experiment configs."""
    sweep6, sweep7, sweep8 = (swept(composed(f"experiment={e}")) for e in
                              ("table6/lora-lr", "table7/update-ratio", "table8/start-steps"))
    lrs = sweep6["train.lr"]
    lambdas = sweep7["method.update_ratio"]
    ks = sweep8["method.start_steps"]
    delta_main = _experiment_row("table5/delta-lora")
    delta_label = (f"Delta-LoRA, lr {_short(delta_main[LR])}, "
                   f"λ = {_short(delta_main[UPDATE_RATIO])}")
    return (
        TableSpec(
            number=1,
            slug="table1_e2e",
            columns=_e2e_columns(),
            rows={**_method_rows(reference_lora=True), "lora": _experiment_row("table1/lora"),
                  "delta-lora": _experiment_row("table1/delta-lora")},
            open_rows=True,
        ),
        TableSpec(
            number=2,
            slug="table2_webnlg",
            columns=_webnlg_columns(),
            rows=_method_rows(reference_lora=True),
            open_rows=True,
        ),
        TableSpec(
            number=3,
            slug="table3_xsum",
            # rouge-score reports fractions; the paper prints percentages.
            columns=tuple(Column(key, label, "xsum", key, 100.0) for key, label in _XSUM_LABELS.items()),
            rows=_method_rows(reference_lora=False),
            open_rows=True,
        ),
        TableSpec(
            number=4,
            slug="table4_glue",
            # GLUE metrics are fractions; the paper prints percentages of the best dev-set score.
            columns=tuple(Column(t, _GLUE_LABELS[t], f"glue/{t}", None, 100.0) for t in GLUE_TASKS),
            rows=_method_rows(reference_lora=False),
            split="best",
            average=True,
            open_rows=True,
        ),
        TableSpec(
            number=5,
            slug="table5_ablation_branch_dropout",
            columns=_e2e_columns(),
            rows={
                "lora": _experiment_row("table5/lora"),
                "delta-lora-branch-dropout": _experiment_row("table5/delta-lora-branch-dropout"),
                "delta-lora": delta_main,
            },
            labels={"delta-lora-branch-dropout": "Delta-LoRA + LoRA module (dropout in the branch)"},
        ),
        TableSpec(
            number=6,
            slug="table6_lora_lr",
            columns=_e2e_columns(),
            # Delta-LoRA's row is Table 5's run (configs/experiment/table6/lora-lr.yaml says so).
            rows={**{f"lora-lr{_short(lr)}": _experiment_row("table6/lora-lr", {"train.lr": lr})
                     for lr in lrs},
                  "delta-lora": delta_main},
            labels={**{f"lora-lr{_short(lr)}": f"LoRA, lr {_short(lr)}" for lr in lrs},
                    "delta-lora": delta_label},
        ),
        _sweep_spec(7, "table7_update_ratio", "table7/update-ratio", "method.update_ratio", lambdas, "λ"),
        _sweep_spec(8, "table8_start_steps", "table8/start-steps", "method.start_steps", ks, "K"),
    )


def specs_by_number() -> dict[int, TableSpec]:
    return {spec.number: spec for spec in table_specs()}


def __getattr__(name: str) -> Any:
    # TABLE_SPECS and SPECS_BY_NUMBER read the configs, so they are built when first asked for
    # (importing this module composes nothing).
    if name == "TABLE_SPECS":
        return table_specs()
    if name == "SPECS_BY_NUMBER":
        return specs_by_number()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lookup(record: Mapping[str, Any], path: str) -> object:
    node: object = record
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _same(got: object, want: object) -> bool:
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        try:
            return math.isclose(float(got), float(want), rel_tol=1e-9)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
    return got == want


def matches(record: Mapping[str, Any], matcher: Matcher) -> bool:
    for path, want in matcher.items():
        got = _lookup(record, path)
        ok = want(got) if callable(want) else got is not _ABSENT and _same(got, want)
        if not ok:
            return False
    return True


def _row_matchers(spec: TableSpec, records: Sequence[Record]) -> dict[str, Matcher | None]:
    rows = dict(spec.rows)
    if spec.open_rows:
        named = {m.get("method") for m in spec.rows.values() if m is not None}
        for method in sorted({r["method"] for r in records if r["task"] in spec.tasks} - named):
            rows[method] = {"method": method}
    return rows


# ---------------------------------------------------------------------------------------------
# Cells


def _cell(values: Sequence[float], paper: float | None) -> str:
    """`86.64 (paper 87.00, n=3, sd 0.52)`: our median over seeds, the paper's number, spread."""
    notes = [] if paper is None else [f"paper {paper:.2f}"]
    if len(values) > 1:
        notes += [f"n={len(values)}", f"sd {statistics.stdev(values):.2f}"]
    ours = f"{statistics.median(values):.2f}" if values else MISSING_MARK
    return f"{ours} ({', '.join(notes)})" if notes else ours


def _count(n: float) -> str:
    """In the paper's unit: its counts are in units of 2**20 (LoRA on RoBERTa-base, 294,912
    parameters, is printed 0.28M; Delta-LoRA's 14,155,776 updated elements, 13.5M)."""
    if n == 0:
        return "0"
    m = n / 2**20
    return f"{m:.3f}M" if m < 1 else f"{m:.2f}M"


def _params_cell(used: Sequence[Record], key: str, paper: str | None) -> str:
    """Our parameter count (a range when runs differ, e.g. GLUE heads per task), the paper's."""
    counts = sorted({int(r.get("params", {}).get(key) or 0) for r in used})
    if not counts:
        ours = MISSING_MARK
    elif len(counts) == 1:
        ours = _count(counts[0])
    else:
        ours = f"{_count(counts[0])}–{_count(counts[-1])}"
    return ours if paper is None else f"{ours} (paper {paper})"


# The scoring procedure of each NLG task's numbers when none is asked for: the paper's.
DEFAULT_PROCEDURES: Mapping[str, str] = {"e2e": "paper", "webnlg": "paper"}


def _procedure_descriptions() -> dict[str, dict[str, str]]:
    # Read from the procedures themselves so the text cannot drift from what scored the numbers;
    # the scoring modules load no torch (a test renders every table and checks).
    from deltalora_repro.metrics import e2e, webnlg
    return {"e2e": {n: p.description for n, p in e2e.PROCEDURES.items()},
            "webnlg": {n: p.description for n, p in webnlg.PROCEDURES.items()}}


def _other_procedures(record: Record, spec: TableSpec, procedures: Mapping[str, str]) -> list[str]:
    """The procedures a run was scored with when the table's one is not among them (else [])."""
    procedure = procedures.get(record["task"])
    if procedure is None:
        return []
    scored = run_records.scores_by_procedure(record["task"], record["metrics"].get(spec.split, {}))
    return [] if procedure in scored else sorted(scored)


def _metric(record: Record, spec: TableSpec, column: Column,
            procedures: Mapping[str, str] = DEFAULT_PROCEDURES) -> float | None:
    """The cell's number, or None when the run did not measure it (e.g. a WebNLG run decoded on
    a subset with no unseen entries, a run whose outputs are not scored yet, or one scored with
    other procedures only). For E2E and WebNLG the number is the table's procedure's, never
    another procedure's."""
    metrics = record["metrics"]
    name = column.metric or metrics.get("primary")
    procedure = procedures.get(column.task)
    if procedure is not None:
        scored = run_records.scores_by_procedure(record["task"], metrics.get(spec.split, {}))
        if scored and procedure not in scored:
            return None   # listed under the table as scored with other procedures only
        if name in scored.get(procedure, {}):
            try:
                return float(scored[procedure][name]) * column.scale
            except (TypeError, ValueError) as exc:
                raise RecordError(f"run {record['run_id']} ({record['task']}, {record['method']}): "
                                  f"procedure {procedure} has no number for {name}") from exc
    if name not in metrics.get(spec.split, {}) or procedure is not None:
        task_cfg = record.get("config", {}).get("task", {})
        if task_cfg.get("test_max_groups") is not None or task_cfg.get("score") is False:
            return None   # decoded on a subset, or not scored yet: a missing cell, not an error
        under = f" (procedure {procedure})" if procedure is not None else ""
        raise RecordError(f"run {record['run_id']} ({record['task']}, {record['method']}): no "
                          f"number for metrics.{spec.split}.{name}{under} needed by Table {spec.number}")
    try:
        return float(metrics[spec.split][name]) * column.scale
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(
            f"run {record['run_id']} ({record['task']}, {record['method']}): no number for "
            f"metrics.{spec.split}.{name} needed by Table {spec.number}"
        ) from exc


class Grid(NamedTuple):
    header: list[str]
    rows: list[list[str]]
    used: list[Record]  # every record behind a number, in row order
    superseded: list[Record]  # older runs of the same (row, column, seed), not used
    other_procedures: list[tuple[Record, list[str]]]  # in a row, but scored with other procedures only
    trials: list[tuple[Record, list[str]]] = []  # runs of this table outside the paper's protocol


# A run outside the paper's protocol never fills a cell: shortened (max_steps), on a subset of a
# split, on a split carved from one file, with an optimisation setting changed from the paper's
# (PROTOCOL_TRAIN_KEYS), or with a warning that it is not what its method promises (Delta-LoRA
# whose W never moved). Such runs are listed under the table instead.
_SUBSETS = ("train_max_examples", "eval_max_examples", "test_max_groups", "test_max_examples",
            "local_file")
PROTOCOL_TRAIN_KEYS = ("lr", "batch_size", "epochs", "weight_decay", "warmup_ratio", "warmup_steps",
                       "max_grad_norm")


@functools.cache
def _studies() -> tuple[str, ...]:
    """The experiment configs that set a train.* value of their own (pinned or swept), e.g.
    Table 6's learning rates: a run with one of those values follows that study's protocol."""
    found = []
    for path in sorted((CONFIG_DIR / "experiment").rglob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        sweep = ((data.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
        if "train" in data or any(str(k).startswith("train.") for k in sweep):
            found.append(path.relative_to(CONFIG_DIR / "experiment").with_suffix("").as_posix())
    return tuple(found)


@functools.cache
def protocol_train(task: str, method: str, experiment: str | None) -> dict[str, list[Any]]:
    """{train key: the values the paper's protocol allows} for a run of `method` on `task`: the
    composed config's (the paper's values from configs/paper/, or what the run's experiment config
    pins), and the values a study sweeps: the run's own experiment's or, for a run without one,
    those of every study that composes to the same task and method."""
    base = [f"task={task}", f"method={method}"]
    cfg = composed(*base, *([f"experiment={experiment}"] if experiment else []))
    allowed = {k: [cfg.train[k]] for k in PROTOCOL_TRAIN_KEYS}
    studies = [cfg] if experiment else [composed(f"experiment={s}") for s in _studies()]
    for study in studies:
        if (study.task.name, study.method.name) != (task, method):
            continue
        for k in PROTOCOL_TRAIN_KEYS:
            allowed[k].append(study.train[k])
        for key, values in swept(study).items():
            if key.startswith("train.") and key[len("train."):] in allowed:
                allowed[key[len("train."):]] += values
    return {k: list(dict.fromkeys(v)) for k, v in allowed.items()}


def _train_departures(record: Record, train: Mapping[str, Any]) -> list[str]:
    """train.* values of a run that the paper's protocol for its task and method does not allow."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        allowed = protocol_train(record["task"], record["method"], record.get("experiment"))
    except (HydraException, OmegaConfBaseException) as exc:
        # A task, method or experiment this version has no config for: listed, never a cell.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return [f"no config to compare its settings with ({first})"]
    reasons = []
    for key in PROTOCOL_TRAIN_KEYS:
        if key in train and not any(_same(train[key], want) for want in allowed[key]):
            paper = " or ".join("null" if v is None else str(v) for v in allowed[key])
            shown = "null" if train[key] is None else train[key]
            reasons.append(f"train.{key}={shown} (paper: {paper})")
    return reasons


def trial_reasons(record: Record) -> list[str]:
    """Why a run is a trial rather than the paper's protocol (empty: it follows the protocol)."""
    cfg = record.get("config") or {}
    train, task = cfg.get("train") or {}, cfg.get("task") or {}
    reasons = []
    if train.get("max_steps") is not None:
        reasons.append(f"train.max_steps={train['max_steps']}")
    reasons += [f"task.{k}={task[k]}" for k in _SUBSETS if task.get(k) is not None]
    if "hparams" in task:
        # Written when the task config carried its paper values as task.hparams: judged as it
        # was then, on epochs and batch size against the values the run itself carried.
        hparams = task["hparams"] or {}
        for key in ("epochs", "batch_size"):
            if key in hparams and key in train and train[key] != hparams[key]:
                reasons.append(f"train.{key}={train[key]} (paper: {hparams[key]})")
    elif train:
        reasons += _train_departures(record, train)
    if record.get("warnings"):
        reasons.append("warned: " + "; ".join(record["warnings"]))
    return reasons


def _finite_metrics(record: Record) -> bool:
    values = [v for v in ((record.get("metrics") or {}).get("final") or {}).values()
              if isinstance(v, float)]
    return all(v == v and abs(v) != float("inf") for v in values)


# Public entry points for other reports over the same runs (deltalora_repro.reproduction), so
# that they exclude and read runs exactly as the tables do.
def exclusion_reasons(record: Record) -> list[str]:
    """Why a completed run fills no table cell (a trial, or non-finite metrics); empty if none."""
    return trial_reasons(record) or ([] if _finite_metrics(record) else ["non-finite metrics"])


def metric_value(record: Record, spec: TableSpec, column: Column,
                 procedures: Mapping[str, str] = DEFAULT_PROCEDURES) -> float | None:
    """The number a table cell would take from this run, in the paper's unit (see `_metric`)."""
    return _metric(record, spec, column, procedures)


def belongs(spec: TableSpec, record: Record) -> bool:
    """Which runs a table may use: a run of an experiment config (`experiment=table7/...`) only
    that table, so a study's settings (a reduced training set, a sweep) never fill another table's
    cell; a run without one, any table whose row settings it matches."""
    experiment = record.get("experiment")
    return experiment is None or str(experiment).startswith(f"table{spec.number}/")


def _unique(records: Iterable[Record]) -> list[Record]:
    seen: dict[str, Record] = {}
    for r in records:
        seen.setdefault(r["run_id"], r)
    return list(seen.values())


def build_grid(spec: TableSpec, records: Sequence[Record], model: str,
               procedures: Mapping[str, str] = DEFAULT_PROCEDURES, include_trials: bool = False) -> Grid:
    """Cells of `spec` for the runs of `model`, as strings, with the records behind them; E2E and
    WebNLG cells hold `procedures[task]`'s numbers."""
    paper = spec.paper
    candidates = [r for r in records if r["model"] == model and r["task"] in spec.tasks
                  and belongs(spec, r)]
    trials = [(r, trial_reasons(r) or ["non-finite metrics"]) for r in candidates
              if (trial_reasons(r) and not include_trials) or not _finite_metrics(r)]
    trial_ids = {r["run_id"] for r, _ in trials}
    ours = [r for r in candidates if r["run_id"] not in trial_ids]
    has_params = "params" in paper
    header = ["Method", *(["Trainable", "Extra updated"] if has_params else [])]
    header += [c.label for c in spec.columns] + (["AVG"] if spec.average else [])
    rows: list[list[str]] = []
    used: list[Record] = []
    superseded: list[Record] = []
    other: list[tuple[Record, list[str]]] = []
    for key, matcher in _row_matchers(spec, ours).items():
        in_row = [r for r in ours if matcher is not None and matches(r, matcher)]
        other += [(r, names) for r in in_row if (names := _other_procedures(r, spec, procedures))]
        paper_row = paper["rows"].get(key, {})
        cells: list[str] = []
        medians: list[float] = []
        row_used: list[Record] = []
        for column in spec.columns:
            # One run per seed: a rerun supersedes (run ids start with their UTC start time).
            latest: dict[Any, Record] = {}
            # A run without this metric (decoded but not scored yet) neither fills the cell nor
            # hides an older run of the same seed that has it.
            scored = (r for r in in_row if r["task"] == column.task
                      and _metric(r, spec, column, procedures) is not None)
            # The table's own study runs (experiment=tableN/...) outrank runs without an
            # experiment config, whatever their age: a study's rows share its training setting,
            # and a later main-table run of the same seed must not replace one of its rows.
            for r in sorted(scored, key=lambda r: (r.get("experiment") is not None, r["run_id"])):
                if r["seed"] in latest:
                    superseded.append(latest[r["seed"]])
                latest[r["seed"]] = r
            values = [v for v in (_metric(r, spec, column, procedures) for r in latest.values())
                      if v is not None]
            row_used += latest.values()
            if values:
                medians.append(statistics.median(values))
            cells.append(_cell(values, paper_row.get(column.key)))
        if spec.average:  # the paper's AVG: mean over all tasks, so only with every task present
            mean = [statistics.fmean(medians)] if len(medians) == len(spec.columns) else []
            cells.append(_cell(mean, paper_row.get("avg")))
        if has_params:
            printed = paper["params"].get(key, {})
            trainable = printed.get("trainable")
            # The paper's mark for "no extra updatable parameters" is printed here as 0.
            extra = (printed.get("extra_updated") or "0") if printed else None
            cells = [
                _params_cell(row_used, "trainable", trainable),
                _params_cell(row_used, "extra_updated", extra),
                *cells,
            ]
        rows.append([spec.labels.get(key, LABELS.get(key, key)), *cells])
        used += row_used
    seen_other: dict[str, tuple[Record, list[str]]] = {}
    for r, names in other:
        seen_other.setdefault(r["run_id"], (r, names))
    return Grid(header, rows, _unique(used), _unique(superseded), list(seen_other.values()), trials)


# ---------------------------------------------------------------------------------------------
# Rendering


def _legend(spec: TableSpec) -> str:
    which = {"best": "best dev-set evaluation", "final": "final evaluation"}[spec.split]
    which += f" (`metrics.{spec.split}`)"
    scaled = [c.label for c in spec.columns if c.scale == 100.0]
    if scaled:  # records keep fractions where the official tool prints them; the paper prints %
        which += " ×100" if len(scaled) == len(spec.columns) else f" (×100 for {', '.join(scaled)})"
    text = (
        f"Cell: our median over seeds of the {which}, then in parentheses the paper's number and, "
        f"when more than one seed ran, n = seeds and sd = their sample standard deviation; "
        f"`{MISSING_MARK}` = no completed run."
    )
    if spec.average:
        text += f" AVG: mean of the {len(spec.columns)} task medians, only when all are present."
    if "params" in spec.paper:
        text += " Parameter counts (M = 2^20, as the paper counts): ours (a range when runs differ, e.g. GLUE heads), then the paper's."
    reference = [LABELS.get(key, key) for key, matcher in spec.rows.items() if matcher is None]
    if reference:
        text += f" {', '.join(reference)}: the paper quotes it; no run of ours belongs there."
    return text


def _procedure_lines(spec: TableSpec, procedures: Mapping[str, str]) -> list[str]:
    """Which scoring procedure every E2E / WebNLG number of the table comes from."""
    descriptions = _procedure_descriptions()
    lines = []
    for task in sorted(spec.tasks & set(procedures)):
        name = procedures[task]
        line = f"Scoring procedure of every {_TASK_NAMES[task]} number: `{name}`, {descriptions[task][name]}."
        if name != "paper":
            line += " The paper's numbers in parentheses come from its own procedure (`paper`)."
        lines.append(line)
    return lines


_TASK_NAMES = {"e2e": "E2E", "webnlg": "WebNLG"}


def _model_line(spec: TableSpec, model: str) -> str:
    paper_model = spec.paper["model"]
    if model == paper_model:
        return f"Ours and the paper's: `{model}`."
    return f"Ours: `{model}`. The paper's numbers beside ours are for `{paper_model}`."


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _provenance(record: Record) -> list[str]:
    git = record.get("git", {})
    commit = str(git.get("commit") or "?")[:10] + ("+dirty" if git.get("dirty") else "")
    machine = record.get("machine", {})
    where = " / ".join(str(machine[k]) for k in ("hostname", "device_name") if machine.get(k)) or "?"
    run = f"`{record['run_id']}`"
    train = (record.get("data") or {}).get("train") or {}
    cfg = (record.get("config") or {}).get("train") or {}
    setting = f"{cfg.get('epochs', '?')} ep, {train.get('rows_used', '?')} rows, {record.get('total_steps', '?')} steps"
    return [run, record["task"], record["method"], str(record["seed"]), setting, f"`{commit}`", where]


def render_table(
    spec: TableSpec, records: Sequence[Record], model: str, skipped: Sequence[Record] = (),
    procedures: Mapping[str, str] = DEFAULT_PROCEDURES, include_trials: bool = False,
) -> str:
    """Markdown for one table and one model, with the records behind every number."""
    grid = build_grid(spec, records, model, procedures, include_trials)
    lines = [f"## Table {spec.number}: {spec.paper['caption']}", "", _model_line(spec, model), ""]
    if include_trials:
        lines += ["Trial runs (shortened, subsets) fill cells here: a pipeline check, not the "
                  "paper's protocol.", ""]
    procedure_lines = _procedure_lines(spec, procedures)
    if procedure_lines:
        lines += [*procedure_lines, ""]
    lines += _md_table(grid.header, grid.rows)
    lines += ["", _legend(spec)]
    not_done = [r for r in skipped if r.get("model") == model and r.get("task") in spec.tasks
                and belongs(spec, r)]
    if not_done:
        ids = ", ".join(f"`{r.get('run_id', '?')}` ({r.get('status')})" for r in not_done)
        lines += ["", f"Not completed, not shown: {len(not_done)} run(s): {ids}."]
    if grid.superseded:
        ids = ", ".join(f"`{r['run_id']}`" for r in grid.superseded)
        lines += ["", f"Superseded by a later run of the same seed (or by this table's own study "
                      f"run of it): {ids}."]
    if grid.trials:
        ids = "; ".join(f"`{r['run_id']}` ({', '.join(why)})" for r, why in grid.trials)
        lines += ["", f"Trial runs, outside the paper's protocol, in no cell: {ids}."]
    if grid.other_procedures:
        ids = ", ".join(f"`{r['run_id']}` ({', '.join(names)})" for r, names in grid.other_procedures)
        lines += ["", f"Scored with other procedures only, not shown (`python -m "
                      f"deltalora_repro.score_run RECORD` adds this one): {ids}."]
    lines += ["", "Records used:", ""]
    if grid.used:
        header = ["run_id", "task", "method", "seed", "training", "commit", "machine"]
        lines += _md_table(header, map(_provenance, grid.used))
    else:
        lines += ["(none yet)"]
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {
    "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "–": "--", "`": "",
    "λ": r"$\lambda$", "†": r"$^\dagger$", "‡": r"$^\ddagger$", "×": r"$\times$",
}


def _tex(text: str) -> str:
    return re.sub("|".join(map(re.escape, _TEX_ESCAPES)), lambda m: _TEX_ESCAPES[m.group()], text)


def render_table_latex(spec: TableSpec, records: Sequence[Record], model: str,
                       procedures: Mapping[str, str] = DEFAULT_PROCEDURES,
                       include_trials: bool = False) -> str:
    """The same cells as `render_table`, as a LaTeX tabular."""
    grid = build_grid(spec, records, model, procedures, include_trials)
    lines = [
        f"% Table {spec.number}: {_tex(spec.paper['caption'])}",
        f"% {_tex(_model_line(spec, model))} Generated by deltalora_repro.tables; do not edit.",
        *(f"% {_tex(line)}" for line in _procedure_lines(spec, procedures)),
        f"% {_tex(_legend(spec))}",
        r"\begin{tabular}{l" + "c" * (len(grid.header) - 1) + "}",
        r"\hline",
        " & ".join(map(_tex, grid.header)) + r" \\",
        r"\hline",
        *(" & ".join(map(_tex, row)) + r" \\" for row in grid.rows),
        r"\hline",
        r"\end{tabular}",
    ]
    return "\n".join(lines) + "\n"


def _models(spec: TableSpec, records: Sequence[Record]) -> list[str]:
    """The paper's model (so pending cells show) and every model with a run in this table."""
    matchers = [m for m in _row_matchers(spec, records).values() if m is not None]
    ran = {r["model"] for r in records if r["task"] in spec.tasks and any(matches(r, m) for m in matchers)}
    return [spec.paper["model"], *sorted(ran - {spec.paper["model"]})]


def _file_stem(spec: TableSpec, model: str, procedure: str | None = None) -> str:
    stem = f"{spec.slug}__{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}"
    return stem if procedure is None else f"{stem}__{procedure}"


PROCEDURE_CHOICES = ("paper", "official")


def render_all(results_dir: Path, latex: bool = True, procedure: str = "paper",
               include_trials: bool = False) -> dict[str, str]:
    """{file name: text} for every table and model: `.md`, and `.tex` when `latex`. With
    procedure="paper" (the default) every table; otherwise only the E2E and WebNLG tables, with
    that procedure's numbers, in files named `..__<procedure>`."""
    if procedure not in PROCEDURE_CHOICES:
        raise ValueError(f"unknown scoring procedure {procedure!r}; valid: {', '.join(PROCEDURE_CHOICES)}")
    procedures = {task: procedure for task in DEFAULT_PROCEDURES}
    suffix = None if procedure == "paper" else procedure
    loaded = scan_records(results_dir)
    files: dict[str, str] = {}
    for spec in table_specs():
        if suffix is not None and not spec.tasks & set(procedures):
            continue
        for model in _models(spec, loaded.completed):
            stem = _file_stem(spec, model, suffix)
            files[f"{stem}.md"] = render_table(spec, loaded.completed, model, loaded.skipped, procedures,
                                               include_trials)
            if latex:
                files[f"{stem}.tex"] = render_table_latex(spec, loaded.completed, model, procedures,
                                                          include_trials)
    return files


def has_records(results_dir: Path) -> bool:
    """Whether `results_dir` holds records/; if not, says so on stderr (the commands that read
    records exit 2 then)."""
    if (results_dir / "records").is_dir():
        return True
    print(f"error: no run records under {results_dir / 'records'} (--results names the folder "
          "holding records/, e.g. results or outputs/results)", file=sys.stderr)
    return False


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deltalora_repro.tables", description=__doc__.splitlines()[0],
        epilog="examples: python -m deltalora_repro.tables --results results   (what `make tables` "
               "runs); python -m deltalora_repro.tables --results outputs/results   (your own runs)")
    parser.add_argument(
        "--results", type=Path, default=Path("results"), help="folder with records/; tables/ is written there"
    )
    parser.add_argument(
        "--procedure", choices=PROCEDURE_CHOICES, default="paper",
        help="scoring procedure of the E2E and WebNLG numbers (default: paper, the paper's own); "
             "official writes the E2E/WebNLG tables to <table>__<model>__official.{md,tex}",
    )
    parser.add_argument(
        "--include-trials", action="store_true",
        help="let trial runs (max_steps, subsets, other epochs) fill cells, e.g. for `make smoke`'s "
             "tiny runs; the tables say so")
    args = parser.parse_args(argv)
    if not has_records(args.results):
        raise SystemExit(2)
    for problem in scan_records(args.results).unreadable:
        print(f"warning: skipped {problem}", file=sys.stderr)
    out_dir = args.results / "tables"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = render_all(args.results, procedure=args.procedure, include_trials=args.include_trials)
    # Generated files only: drop tables of models that no longer have records, so none go stale
    # (only among the files of this procedure: the default tables and the `__official` ones are
    # rendered by separate calls).
    official = "__official."
    for old in out_dir.glob("table[0-9]_*__*"):
        same_kind = (official in old.name) == (args.procedure == "official")
        if same_kind and old.suffix in {".md", ".tex"} and old.name not in files:
            old.unlink()
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
        if name.endswith(".md"):
            print(text)
    if args.procedure != "paper":
        print(f"wrote {len(files)} files to {out_dir}")
        return
    # The index goes with the default tables: one call of `make tables` writes it once.
    (args.results / "README.md").write_text(render_index(args.results), encoding="utf-8")
    print(f"wrote {len(files)} files to {out_dir} and the index {args.results / 'README.md'}")


def render_index(results_dir: Path) -> str:
    """results/README.md: every run record, where and from which commit it came, and its command."""
    loaded = scan_records(results_dir)
    rows = sorted(loaded.completed + loaded.skipped, key=lambda r: (r["task"], r["model"], r["method"], r["run_id"]))
    lines = ["# Run records", "",
             "Generated by `make tables` from `records/` (one JSON per run, written by the code; never "
             "edited by hand). `scores/`: scores computed later from a run's kept predictions "
             "(`python -m deltalora_repro.score_run`). `predictions/`: decoded test outputs. "
             "`tables/`: the paper's tables with ours beside them. `figures/`: Figure 3 from runs "
             "saved with their weights. `bench/`: benchmark records (`python -m deltalora_repro.bench`, "
             "`make bench`).", "",
             "| task | model | method | run_id | status | commit | machine | command |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        git = r.get("git", {})
        commit = (str(git.get("commit") or "?")[:10]) + ("+dirty" if git.get("dirty") else "")
        m = r.get("machine", {})
        where = m.get("device_name") or m.get("device", "?")
        scored = " (scored later)" if r.get("scored_by") else ""
        lines.append(f"| {r['task']} | {r['model']} | {r['method']} | `{r['run_id']}` | "
                     f"{r['status']}{scored} | `{commit}` | {where} | `{r.get('command', '')}` |")
    bench = sorted((results_dir / "bench").glob("*.json"))
    if bench:
        lines += ["", "## Benchmark records", "", "| record | kind | shape | commit | device | command |",
                  "|---|---|---|---|---|---|"]
        for f in bench:
            b = json.loads(f.read_text())
            args = b.get("args", {})
            commit = str((b.get("git") or {}).get("commit") or "?")[:10]
            cmd = "python -m deltalora_repro.bench " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in args.items()
                if k in ("shape", "methods", "lengths", "batch", "precision", "paths") and v not in ("None", ""))
            if args.get("processes", "1") != "1":
                cmd += f" --processes {args['processes']}"
            if b.get("kind") == "bench-decode":
                cmd = f"python -m deltalora_repro.bench --decode --shape {args.get('shape')} --precision {args.get('precision')} --decode-batch {args.get('decode_batch')}"
            shape = args.get("shape")
            if b.get("kind") in ("bench-fsdp", "bench-sweep"):
                cmd, shape = _script_bench(b)
            lines.append(f"| `{f.stem}` | {b.get('kind')} | {shape} | `{commit}` | "
                         f"{(b.get('machine') or {}).get('device_name', '?')} | `{cmd}` |")
    return "\n".join(lines) + "\n"


def _script_bench(b: dict) -> tuple[str, str]:
    """(command, what it measured) of a record written by scripts/bench_fsdp.py or
    scripts/bench_sweep.py. Records from before those scripts wrote their own command line are
    told by what they hold: the FSDP bench's arguments after its (mislabelled) module name, the
    sweep's job count and the overrides it changed."""
    if b["kind"] == "bench-fsdp":
        model = (b.get("rows") or [{}])[0].get("model", "?")
        cmd = b.get("command", "")
        if not cmd.startswith("torchrun"):
            _, _, rest = cmd.partition(" -m deltalora_repro ")
            cmd = f"torchrun --nproc_per_node={(b.get('world') or {}).get('size', '?')} scripts/bench_fsdp.py {rest}"
        return cmd.replace(" --out /root/out/bench", ""), model
    what = f"{b.get('jobs', '?')} jobs"
    if "command" in b:
        return b["command"], what
    jobs = " ".join(o for o in b.get("overrides", []) if not o.startswith("data_dir="))
    return f"python scripts/bench_sweep.py --jobs {b.get('jobs', '?')} (every job: {jobs})", what


if __name__ == "__main__":
    main()
