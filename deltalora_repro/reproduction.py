"""The reproduction report: every arm's numbers over seeds, paired seed-by-seed comparisons of
Delta-LoRA with the other arms, the cost of each run and what is still missing.

    python -m deltalora_repro.reproduction --results results [--procedure paper|official]

writes `results/REPRODUCTION.md` (`REPRODUCTION__official.md` with `--procedure official`) and
prints it. It reads the runs exactly as the tables do (`tables.scan_records`: records with their
later scores; `tables.exclusion_reasons`: trial runs left out; `tables.metric_value`: a run's number
in the paper's unit), so the report and the tables cannot disagree about which runs count. The text
is a function of the records, the package's configs and the code's commit only: no clock, sorted
everywhere, so regenerating it without new records changes nothing but that commit.
"""
from __future__ import annotations

import argparse
import datetime
import math
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltalora_repro import tables
from deltalora_repro.paper_numbers import PAPER_TABLES

Record = dict[str, Any]

SEEDS = (0, 1, 2)
OUT_NAME = "REPRODUCTION.md"
COMMAND = "python -m deltalora_repro.reproduction --results results"

METHOD_LABELS = {
    "ft-qv": "Fine-Tuning‡ (ft-qv)",
    "lora": "LoRA",
    "scaled-lora": "Scaled LoRA (control)",
    "delta-lora": "Delta-LoRA",
}
# Display order of methods within a group; others follow alphabetically.
METHOD_ORDER = ("ft", "ft-noembed", "ft-qv", "lora", "dylora", "adalora", "scaled-lora", "delta-lora")
# How a departing setting is named in an arm's label.
SYMBOLS = {"train.lr": "lr", "method.alpha": "α", "method.update_ratio": "λ",
           "method.start_steps": "K", "method.rank": "rank", "method.lora_dropout": "branch dropout",
           "task.version": "task version"}
REFERENCE = "delta-lora"

# The arms the study plans, per (task, model): (method, departures from the paper's values, the
# command-line overrides that make one run of it, besides model, data_dir and seed).
_E2E_PLAN = (
    ("ft-qv", (), "task=e2e method=ft-qv"),
    ("lora", (), "task=e2e method=lora"),
    ("lora", (("train.lr", 6e-4),), "experiment=table6/lora-lr train.lr=6e-4"),
    ("lora", (("method.alpha", 96),), "experiment=controls/lora-alpha"),
    ("scaled-lora", (), "experiment=controls/scaled-lora"),
    ("delta-lora", (), "task=e2e method=delta-lora"),
)
_PAIR = (("lora", (), "method=lora"), ("delta-lora", (), "method=delta-lora"))
EXPECTED: dict[tuple[str, str], tuple[tuple[str, tuple, str], ...]] = {
    ("e2e", "smollm2-135m"): _E2E_PLAN,
    ("webnlg", "smollm2-135m"): tuple((m, d, f"task=webnlg {o}") for m, d, o in _PAIR),
    **{(f"glue/{t}", "minilm-l6"): tuple((m, d, f"task=glue/{t} {o}") for m, d, o in _PAIR)
       for t in ("rte", "mrpc", "stsb", "cola")},
}
# Where each task's data lies beside the checkout, and whether its test outputs are scored after
# the run (E2E, WebNLG: the GPU machine has no Java for the official scorers).
DATA_DIRS = {"e2e": "../shared/data/e2e", "webnlg": "../shared/data/webnlg2017"}
SCORED_LATER = ("e2e", "webnlg")


# ---------------------------------------------------------------------------------------------
# Arms: a method and the settings in which a run departs from the paper's values for its task


def _norm(value: Any) -> Any:
    """A setting's value as a comparable key: numbers as floats to 12 significant digits (so
    6e-4 == 0.0006 and 96 == 96.0), anything else as its text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(f"{float(value):.12g}")
    return repr(value)


def _short(x: Any) -> str:
    """A number as the paper prints it (the tables' form: 6e-4, 0.5, 96); anything else as text."""
    return tables._short(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


@dataclass(frozen=True, order=True)
class Arm:
    order: int
    method: str
    departures: tuple[tuple[str, Any], ...]  # sorted (dotted key, normalised value)

    @property
    def key(self) -> tuple[str, tuple]:
        return (self.method, self.departures)


def make_arm(method: str, departures: Sequence[tuple[str, Any]]) -> Arm:
    order = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return Arm(order, method, tuple(sorted((k, _norm(v)) for k, v in departures)))


def _paper_config(task: str, method: str) -> dict:
    from omegaconf import OmegaConf
    cfg = tables.composed(f"task={task}", f"method={method}")
    # Only the parts an arm compares: the composed config also holds Hydra's run-time node.
    return {"method": OmegaConf.to_container(cfg.method, resolve=True),
            "train": {"lr": cfg.train.lr}, "task": {"version": cfg.task.get("version")}}


def departures(record: Record) -> list[tuple[str, Any]]:
    """(dotted key, value) of every method setting, the learning rate and the task version in
    which the run differs from the paper's values for its task and method. A method key the record
    lacks is not compared: the code that wrote it had no such setting."""
    paper = _paper_config(record["task"], record["method"])
    cfg = record.get("config") or {}
    out = []
    ran_method = cfg.get("method") or {}
    for key in sorted(ran_method):
        if key == "name":
            continue
        if key not in paper["method"] or _norm(ran_method[key]) != _norm(paper["method"][key]):
            out.append((f"method.{key}", ran_method[key]))
    lr = (cfg.get("train") or {}).get("lr")
    if lr is not None and _norm(lr) != _norm(paper["train"]["lr"]):
        out.append(("train.lr", lr))
    version = (cfg.get("task") or {}).get("version")
    if version is not None and paper["task"].get("version") is not None \
            and version != paper["task"]["version"]:
        out.append(("task.version", version))
    return out


def arm_of(record: Record) -> Arm:
    return make_arm(record["method"], departures(record))


def arm_label(arm: Arm, task: str) -> str:
    label = METHOD_LABELS.get(arm.method) or tables.LABELS.get(arm.method, arm.method)
    parts = []
    for key, value in arm.departures:
        text = f"{SYMBOLS.get(key, key)} {_short(value)}"
        if key == "method.alpha":
            # The control that gives LoRA Delta-LoRA's forward scale after K: alpha (1 + lambda).
            paper = _paper_config(task, arm.method)["method"]
            ratio = _paper_config(task, REFERENCE)["method"].get("update_ratio")
            if ratio is not None and "alpha" in paper and \
                    _norm(paper["alpha"] * (1 + ratio)) == _norm(value):
                text += " (= α(1+λ))"
        parts.append(text)
    return ", ".join([label, *parts])


# ---------------------------------------------------------------------------------------------
# Numbers


def task_columns(task: str) -> tuple[tables.TableSpec, list[tables.Column]] | None:
    """The first paper table with columns for `task` (Table 1 for E2E, 2 WebNLG, 3 XSum, 4 a GLUE
    task) and those columns; None for a task no table knows."""
    for spec in sorted(tables.table_specs(), key=lambda s: s.number):
        columns = [c for c in spec.columns if c.task == task]
        if columns:
            return spec, columns
    return None


def _decimals(column: tables.Column) -> int:
    # Percentages and 0-100 BLEU read at 2 decimals; NIST, CIDEr and fractions (WebNLG METEOR,
    # TER) need a third for differences between seeds to show.
    return 2 if column.scale == 100.0 or column.key.startswith("bleu") else 3


def _fmt(x: float | None, column: tables.Column, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:{'+' if sign else ''}.{_decimals(column)}f}"


def _sd(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def paired_p(differences: Sequence[float], ours: Sequence[float], theirs: Sequence[float]) -> float | None:
    """Two-sided paired t-test p-value (scipy), None when it is undefined (n < 2, or every
    difference equal so that the spread is zero)."""
    if len(differences) < 2 or statistics.stdev(differences) == 0:
        return None
    from scipy import stats
    return float(stats.ttest_rel(ours, theirs).pvalue)


def _p_text(p: float | None) -> str:
    return "n/a" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


@dataclass
class Comparison:
    other: Arm
    column: tables.Column
    seeds: list[int]
    differences: list[float]
    p: float | None

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.differences) if self.differences else None

    @property
    def sd(self) -> float | None:
        return _sd(self.differences)

    @property
    def higher(self) -> int:
        return sum(d > 0 for d in self.differences)


@dataclass
class ArmRuns:
    arm: Arm
    label: str
    runs: dict[int, Record] = field(default_factory=dict)  # seed -> the run used
    superseded: list[tuple[int, Record, Record]] = field(default_factory=list)  # seed, old, used
    values: dict[str, dict[int, float]] = field(default_factory=dict)  # column key -> seed -> value


@dataclass
class Group:
    task: str
    model: str
    arms: list[ArmRuns]
    spec: tables.TableSpec | None
    columns: list[tables.Column]
    excluded: list[tuple[Record, list[str]]]
    unscored: list[Record]
    comparisons: list[Comparison]
    skipped: list[Record] = field(default_factory=list)  # runs that did not complete
    neighbours: dict[str, list["Neighbour"]] = field(default_factory=dict)  # run_id -> overlaps


# ---------------------------------------------------------------------------------------------
# Which runs shared a GPU: inferred from the records' hosts, devices and start and end times
@dataclass(frozen=True)
class Neighbour:
    run_id: str
    how: str                # "same GPU", "GPU not recorded" or "on several GPUs"
    seconds: float          # how long the two runs overlapped


SEVERAL = "several"         # _gpu of a run of several processes


def _when(value: Any) -> datetime.datetime | None:
    """A record's time as an aware datetime; None when absent, malformed or without a timezone."""
    try:
        when = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _gpu(record: Record) -> str | None:
    """The one GPU a run used ("cuda:1"); SEVERAL for a run of several processes; None when its
    record does not say (runs before launch=gpus recorded `device: auto`)."""
    world = _dict(record.get("world"))
    size = world.get("size")
    if isinstance(size, int) and size > 1:
        return SEVERAL
    device = world.get("device") or _dict(record.get("config")).get("device")
    return device if isinstance(device, str) and re.fullmatch(r"cuda:\d+", device) else None


def _host(record: Record) -> tuple | None:
    """What identifies a run's machine in its record: hostname, platform, CPU count and GPU model
    (lent machines can share a hostname). None without a hostname: not comparable."""
    machine = _dict(record.get("machine"))
    if machine.get("device") != "cuda" or not machine.get("hostname"):
        return None
    return tuple(str(machine.get(k)) for k in ("hostname", "platform", "cpu_count", "device_name"))


def gpu_neighbours(records: Sequence[Record]) -> dict[str, list[Neighbour]]:
    """For each GPU run, the other runs among `records` that ran on the same machine (as far as
    the records identify it) at the same time, on the same GPU or possibly so: one of the two
    names no GPU or ran on several. Two runs on one GPU each take longer than alone, so their
    times do not measure the method. What left no record here (a test suite, another user's job)
    is not seen, nor is a run on the machine's other GPU (which shares only the host)."""
    spans = []
    for r in records:
        host = _host(r)
        start, end = _when(r.get("started_at")), _when(r.get("finished_at"))
        if host is None or start is None or end is None or not isinstance(r.get("run_id"), str):
            continue
        spans.append((r["run_id"], host, _gpu(r), start, end))
    out: dict[str, list[Neighbour]] = {}
    for run_id, host, gpu, start, end in spans:
        found = []
        for other_id, other_host, other_gpu, other_start, other_end in spans:
            overlap = (min(end, other_end) - max(start, other_start)).total_seconds()
            if other_id == run_id or other_host != host or overlap <= 0:
                continue
            if SEVERAL in (gpu, other_gpu):
                how = "on several GPUs"
            elif gpu is None or other_gpu is None:
                how = "GPU not recorded"
            elif gpu == other_gpu:
                how = "same GPU"
            else:
                continue
            found.append(Neighbour(other_id, how, overlap))
        if found:
            out[run_id] = sorted(found, key=lambda n: n.run_id)
    return out


def _neighbours_text(found: Sequence[Neighbour]) -> str:
    if not found:
        return "none found"
    return "; ".join(f"`{n.run_id}` ({n.how}, {n.seconds:.0f} s)" for n in found)


def build_groups(loaded: tables.LoadedRecords, procedure: str) -> list[Group]:
    procedures = {task: procedure for task in tables.DEFAULT_PROCEDURES}
    by_group: dict[tuple[str, str], list[Record]] = {}
    for r in loaded.completed:
        by_group.setdefault((r["task"], r["model"]), []).append(r)
    not_completed: dict[tuple[str, str], list[Record]] = {}
    for r in loaded.skipped:
        not_completed.setdefault((r.get("task"), r.get("model")), []).append(r)
    # Every record counts as a GPU user here, trial and failed runs included.
    neighbours = gpu_neighbours([*loaded.completed, *loaded.skipped])
    groups = []
    for task, model in sorted(set(by_group) | set(EXPECTED)):
        found = task_columns(task)
        spec, columns = found if found else (None, [])
        excluded, unscored = [], []
        arms: dict[Arm, ArmRuns] = {}
        for r in sorted(by_group.get((task, model), []), key=lambda r: r["run_id"]):
            reasons = tables.exclusion_reasons(r)
            if reasons:
                excluded.append((r, reasons))
                continue
            values = {c.key: tables.metric_value(r, spec, c, procedures) for c in columns}
            if columns and all(v is None for v in values.values()):
                unscored.append(r)   # decoded, not scored (under this procedure) yet
                continue
            arm = arm_of(r)
            slot = arms.setdefault(arm, ArmRuns(arm, arm_label(arm, task)))
            seed = r["seed"]
            # Run ids start with the UTC start time, so the newest run of a seed sorts last.
            if seed in slot.runs:
                slot.superseded.append((seed, slot.runs[seed], r))
            slot.runs[seed] = r
            for key, v in values.items():
                if v is not None:
                    slot.values.setdefault(key, {})[seed] = v
                else:
                    slot.values.setdefault(key, {}).pop(seed, None)
        ordered = [arms[a] for a in sorted(arms, key=lambda a: (a.order, a.method, arm_label(a, task)))]
        skipped = sorted(not_completed.get((task, model), []), key=lambda r: str(r.get("run_id")))
        groups.append(Group(task, model, ordered, spec, columns, excluded, unscored,
                            _comparisons(ordered, columns), skipped, neighbours))
    return groups


def _comparisons(arms: Sequence[ArmRuns], columns: Sequence[tables.Column]) -> list[Comparison]:
    reference = next((a for a in arms if a.arm.method == REFERENCE and not a.arm.departures), None)
    if reference is None:
        return []
    out = []
    for other in arms:
        if other is reference:
            continue
        for column in columns:
            ours, theirs = reference.values.get(column.key, {}), other.values.get(column.key, {})
            seeds = sorted(set(ours) & set(theirs))
            a, b = [ours[s] for s in seeds], [theirs[s] for s in seeds]
            differences = [x - y for x, y in zip(a, b)]
            out.append(Comparison(other.arm, column, seeds, differences, paired_p(differences, a, b)))
    return out


def paper_number(spec: tables.TableSpec, arm: Arm, column: tables.Column) -> tuple[float, int] | None:
    """(the paper's number, its table) for this arm and column, or None. The paper's own arm at
    its default settings is its row of the task's table; LoRA at another learning rate on E2E is
    Table 6's row for that rate when the paper ran it."""
    if not arm.departures:
        value = spec.paper["rows"].get(arm.method, {}).get(column.key)
        return None if value is None else (value, spec.number)
    if spec.number == 1 and arm.method == "lora" and [k for k, _ in arm.departures] == ["train.lr"]:
        row = PAPER_TABLES[6]["rows"].get(f"lora-lr{_short(arm.departures[0][1])}", {})
        if column.key in row:
            return row[column.key], 6
    return None


# ---------------------------------------------------------------------------------------------
# Reading: sentences made by rules from the numbers


def reading(c: Comparison, reference_label: str, other_label: str) -> str:
    col = c.column
    head = f"{col.label}, {reference_label} − {other_label}"
    if c.n == 0:
        return f"{head}: no seed with both runs; nothing to compare."
    if c.n == 1:
        return (f"{head}: one paired seed ({'higher' if c.higher else 'not higher'}; difference "
                f"{_fmt(c.mean, col, sign=True)}): no spread and no test with one seed.")
    if c.higher == c.n:
        sign = "sign consistent: higher on every seed"
    elif c.higher == 0 and all(d < 0 for d in c.differences):
        sign = "sign consistent: lower on every seed"
    else:
        sign = "sign not consistent across seeds"
    se = c.sd / math.sqrt(c.n)
    size = "exceeds" if abs(c.mean) > se else "does not exceed"
    if c.p is None:
        verdict = "p n/a (every seed's difference is the same)"
    elif c.p < 0.05:
        verdict = (f"p = {_p_text(c.p)}: below 0.05 at n = {c.n}, one test among several, "
                   f"so indicative only")
    else:
        verdict = f"p = {_p_text(c.p)}: not distinguishable from zero at n = {c.n}"
    lower_better = " (TER: lower is better)" if col.key.startswith("ter") else ""
    return (f"{head}: {c.higher} of {c.n} seeds higher ({sign}); mean {_fmt(c.mean, col, sign=True)}, "
            f"sd {_fmt(c.sd, col)}, standard error {_fmt(se, col)}; |mean| {size} its standard "
            f"error; {verdict}.{lower_better}")


def scaled_lora_reading(group: Group) -> str | None:
    """What the Scaled LoRA control says, when it and Delta-LoRA (both at the paper's values)
    have paired seeds. Scaled LoRA computes Delta-LoRA's function without updating W; only the
    factors' gradients differ."""
    control = [c for c in group.comparisons if c.other.method == "scaled-lora" and not c.other.departures]
    if not control:
        return None
    n = min(c.n for c in control)
    intro = ("Scaled LoRA computes Delta-LoRA's function (branch scale s, then s(1+λ) after K) "
             "without updating W; only the factors' gradients differ.")
    if n < 2:
        return f"{intro} Fewer than 2 paired seeds on some metric: no conclusion."
    # A difference the same on every seed but not zero has no test (zero spread), yet is no sign
    # of equality: it counts as a difference.
    different = [c.column.label for c in control
                 if (c.p is not None and c.p < 0.05) or (c.p is None and any(c.differences))]
    if not different:
        return (f"{intro} On no metric is Delta-LoRA − Scaled LoRA distinguishable from zero at "
                f"n = {n}. If that holds with more seeds, what Delta-LoRA gains over LoRA would be "
                f"attributable to the larger branch scale rather than to updating W; at n = {n} "
                f"this is not established.")
    return (f"{intro} Delta-LoRA − Scaled LoRA has p < 0.05 on {', '.join(different)} at n = {n}: "
            f"updating W (with the factors' gradients that go with it) may matter beyond the "
            f"branch scale; more seeds would be needed to settle it.")


# ---------------------------------------------------------------------------------------------
# Rendering


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _commit(record: Record) -> str:
    git = record.get("git") or {}
    return str(git.get("commit") or "?")[:10] + ("+dirty" if git.get("dirty") else "")


def _seconds(x: Any) -> str:
    return f"{float(x):.1f}" if isinstance(x, (int, float)) else "not recorded"


def run_command(task: str, model: str, overrides: str, seed: int) -> list[str]:
    """The commands that make, score and promote one missing run."""
    data = DATA_DIRS.get(task, "../shared/data/glue" if task.startswith("glue/") else None)
    train = f"python -m deltalora_repro {overrides} model={model}"
    if data:
        train += f" data_dir={data}"
    if task in SCORED_LATER:
        train += " task.score=false"
    train += f" seed={seed}"
    method = next(word.split("=", 1)[1] for word in _overrides_with_method(overrides).split()
                  if word.startswith("method="))
    record = f"outputs/results/records/{task}/{model}/{method}/<run_id>.json"
    commands = [train]
    if task in SCORED_LATER:
        commands.append(f"python -m deltalora_repro.score_run {record}")
    commands.append(f"python -m deltalora_repro.promote {record}")
    return commands


def sweep_command(train: str, seeds: Sequence[int]) -> str:
    """A one-run command as a sweep over `seeds` through the launch=gpus launcher."""
    rest = train.partition("python -m deltalora_repro ")[2]
    words = [w for w in rest.split() if not w.startswith("seed=")]
    return " ".join(["python -m deltalora_repro -m launch=gpus", *words,
                     "seed=" + ",".join(map(str, seeds))])


def _overrides_with_method(overrides: str) -> str:
    """The overrides with the method an experiment config chooses, so the record path is known."""
    if "method=" in overrides:
        return overrides
    experiment = next(w.split("=", 1)[1] for w in overrides.split() if w.startswith("experiment="))
    return f"{overrides} method={tables.composed(f'experiment={experiment}').method.name}"


def missing(group: Group) -> list[tuple[str, list[int], list[str]]]:
    """(arm label, missing seeds, commands for the first missing seed) of each planned arm with
    fewer than all of SEEDS."""
    present = {a.arm.key: a for a in group.arms}
    out = []
    for method, deps, overrides in EXPECTED.get((group.task, group.model), ()):
        arm = make_arm(method, deps)
        have = set(present[arm.key].runs) if arm.key in present else set()
        lacking = [s for s in SEEDS if s not in have]
        if lacking:
            out.append((arm_label(arm, group.task), lacking,
                        run_command(group.task, group.model, overrides, lacking[0])))
    return out


def render_group(group: Group) -> list[str]:
    lines = [f"## {group.task} · {group.model}", ""]
    if group.spec is None:
        lines += ["No paper table has columns for this task; its runs are not summarised here.", ""]
    arms = group.arms
    if arms and group.spec is not None:
        paper_model = group.spec.paper["model"]
        lines += ["### Arms and seeds", ""]
        rows = []
        for a in arms:
            runs = ", ".join(f"{s}: `{r['run_id']}`" for s, r in sorted(a.runs.items()))
            rows.append([a.label, str(len(a.runs)), runs])
        lines += _table(["arm", "runs", "seed: run used"], rows)
        notes = [f"- {a.label}, seed {seed}: the newest run `{used['run_id']}` is used; the older "
                 f"`{old['run_id']}` is not." for a in arms for seed, old, used in a.superseded]
        lines += ["", *notes, *([""] if notes else [])]
        if not notes:
            lines.pop()
            lines += [""]

        lines += ["### Scores: mean ± sample sd over seeds (n)", ""]
        header = ["arm", *(c.label for c in group.columns)]
        rows = []
        for a in arms:
            cells = []
            for c in group.columns:
                values = [a.values.get(c.key, {})[s] for s in sorted(a.values.get(c.key, {}))]
                if not values:
                    cells.append("–")
                    continue
                sd = _sd(values)
                cells.append(f"{_fmt(statistics.fmean(values), c)} ± {_fmt(sd, c)} (n={len(values)})")
            rows.append([a.label, *cells])
            paper = [paper_number(group.spec, a.arm, c) for c in group.columns]
            if any(paper):
                table_no = next(p[1] for p in paper if p)
                rows.append([f"paper, {paper_model} (Table {table_no}): {a.label}",
                             *(_fmt(p[0], c) if p else "–" for p, c in zip(paper, group.columns))])
        lines += _table(header, rows)
        lines += ["", f"Rows marked \"paper\" are the paper's numbers for {paper_model}, a different "
                      f"model: for orientation, not comparison.", ""]

        lines += ["### Every seed's value", ""]
        rows = []
        for a in arms:
            for seed in sorted(a.runs):
                rows.append([a.label, str(seed),
                             *(_fmt(a.values.get(c.key, {}).get(seed), c) for c in group.columns)])
        lines += _table(["arm", "seed", *(c.label for c in group.columns)], rows)
        lines += [""]

        reference = next((a for a in arms if a.arm.method == REFERENCE and not a.arm.departures), None)
        if group.comparisons and reference is not None:
            labels = {a.arm: a.label for a in arms}
            lines += [f"### Paired by seed: {reference.label} − each other arm", "",
                      "Same seed only; p: two-sided paired t-test (scipy.stats.ttest_rel), n/a for "
                      "n < 2. With n = 3 seeds or fewer the test has little power: p above 0.05 "
                      "does not show the arms are equal.", ""]
            rows = []
            for c in group.comparisons:
                rows.append([f"{reference.label} − {labels[c.other]}", c.column.label,
                             ", ".join(map(str, c.seeds)) or "none",
                             _fmt(c.mean, c.column, sign=True), _fmt(c.sd, c.column), str(c.n),
                             _p_text(c.p), f"{c.higher} of {c.n}"])
            lines += _table(["comparison", "metric", "seeds", "mean diff", "sd", "n", "p",
                             f"{reference.label} higher"], rows)
            lines += ["", "### Reading (generated by fixed rules from the numbers above)", ""]
            lines += [f"- {reading(c, reference.label, labels[c.other])}" for c in group.comparisons]
            control = scaled_lora_reading(group)
            if control:
                lines += [f"- {control}"]
            lines += [""]

        lines += ["### Cost per run", "",
                  "Times as the record holds them. A run that shared its GPU took longer than it "
                  "would alone. The last column is inferred from the records: the runs among them "
                  "that ran at the same time on the same machine (hostname, platform, CPU count, "
                  "GPU model), on the same GPU or possibly so (a record that names no GPU: runs "
                  "before `launch=gpus` recorded `device: auto`; or a run on several GPUs), and for "
                  "how long. A GPU user that left no record here (a test suite, another job) is not "
                  "seen, nor is a run on the machine's other GPU.", ""]
        rows = []
        for a in arms:
            for seed, r in sorted(a.runs.items()):
                device = (r.get("machine") or {}).get("device_name") or \
                    (r.get("machine") or {}).get("device", "?")
                rows.append([a.label, str(seed), _seconds(r.get("train_time_s")),
                             _seconds(r.get("test_time_s")), str(device), f"`{_commit(r)}`",
                             f"`{r['run_id']}`",
                             _neighbours_text(group.neighbours.get(r["run_id"], []))])
        lines += _table(["arm", "seed", "train s", "decode (test) s", "GPU", "commit", "run_id",
                         "shared its GPU (inferred)"], rows)
        lines += [""]

    if group.unscored:
        ids = ", ".join(f"`{r['run_id']}`" for r in group.unscored)
        lines += [f"Completed but without scores under this procedure (`python -m "
                  f"deltalora_repro.score_run RECORD` scores one), not used: {ids}.", ""]
    if group.skipped:
        ids = ", ".join(f"`{r.get('run_id', '?')}` ({r.get('status')})" for r in group.skipped)
        lines += [f"Not completed, not used: {ids}.", ""]
    if group.excluded:
        ids = "; ".join(f"`{r['run_id']}` ({', '.join(why)})" for r, why in group.excluded)
        lines += [f"Left out as trial runs (the tables' rules): {ids}.", ""]

    lacking = missing(group)
    if lacking:
        lines += ["### Missing", ""]
        for label, seeds, commands in lacking:
            how = (f"One run (seed {seeds[0]}; change `seed=` for the others):" if len(seeds) > 1
                   else "The run:")
            lines += [f"- {label}: seed{'s' if len(seeds) > 1 else ''} "
                      f"{', '.join(map(str, seeds))} missing. {how}", "", "  ```",
                      *(f"  {c}" for c in commands), "  ```"]
            if len(seeds) > 1:
                lines += ["", "  Or every missing seed at once, one job per GPU of the machine:",
                          "", "  ```", f"  {sweep_command(commands[0], seeds)}", "  ```"]
        lines += [""]
    elif (group.task, group.model) in EXPECTED:
        lines += ["### Missing", "", f"Nothing: every planned arm has seeds "
                                     f"{', '.join(map(str, SEEDS))}.", ""]
    return lines


def render(results_dir: Path, procedure: str = "paper") -> str:
    if procedure not in tables.PROCEDURE_CHOICES:
        raise tables.RecordError(f"unknown scoring procedure {procedure!r}; valid: "
                                 f"{', '.join(tables.PROCEDURE_CHOICES)}")
    loaded = tables.scan_records(results_dir)
    groups = build_groups(loaded, procedure)
    used = sum(len(a.runs) for g in groups for a in g.arms)
    excluded = sum(len(g.excluded) for g in groups)
    # The commits of the runs used (not of the code rendering them): the file changes only
    # when the records do.
    commits = sorted({str((r.get("git") or {}).get("commit") or "unknown")[:10]
                      for g in groups for a in g.arms for r in a.runs.values()})
    # The procedures' own descriptions, so the text cannot drift from what scored the numbers.
    from deltalora_repro.metrics import e2e, webnlg
    command = COMMAND + ("" if procedure == "paper" else f" --procedure {procedure}")
    n_files = len(loaded.completed) + len(loaded.skipped) + len(loaded.unreadable)
    lines = [
        "# Reproduction: seeds, spread and paired comparisons", "",
        f"Generated by `{command}` (`make tables` runs it); do not edit by hand.",
        f"From {n_files} run records under `records/` with their scores in `scores/`: "
        f"{len(loaded.completed)} completed, {len(loaded.skipped)} not completed, "
        f"{len(loaded.unreadable)} unreadable; {used} runs used, {excluded} left out as trial runs "
        "(the same rules as the tables).",
        "Runs made at commit" + ("s " if len(commits) > 1 else " ") +
        (", ".join(f"`{c}`" for c in commits) or "none") + " (each run's in the cost table).", "",
        f"Scoring procedure of every E2E number: `{procedure}`, "
        f"{e2e.PROCEDURES[procedure].description}. WebNLG: `{procedure}`, "
        f"{webnlg.PROCEDURES[procedure].description}."
        + ("" if procedure == "paper" else " The paper's numbers beside ours come from its own "
           "procedure (`paper`)."), "",
        "An arm is a method plus the settings in which its runs depart from the paper's values for "
        "the task (learning rate, alpha, and any other method setting, each named in the label); "
        "runs of different settings are never pooled. Numbers are in the paper's units "
        "(×100 where the paper prints percentages). sd: sample standard deviation over seeds.", "",
    ]
    for group in groups:
        lines += render_group(group)
    lines += figure3_lines(loaded, results_dir)
    return "\n".join(lines).rstrip("\n") + "\n"


FIGURE3_METHODS = ("ft-qv", "lora", "delta-lora")


def figure3_lines(loaded: tables.LoadedRecords, results_dir: Path) -> list[str]:
    lines = ["## Figure 3", "",
             "`make tables` draws it with `python -m deltalora_repro.figure3 --results results` into "
             "`results/figures/figure3_<task>__<model>.{csv,png}`, from completed runs whose saved "
             "weights file is present on the machine that draws it.", ""]
    # Only the paper's arms (no control or learning-rate arm): Figure 3 compares the methods.
    saved = sorted((r["model"], r["method"], r["run_id"], r) for r in loaded.completed
                   if r["task"] == "e2e" and r["method"] in FIGURE3_METHODS and r.get("weights")
                   and not tables.exclusion_reasons(r) and not arm_of(r).departures)
    if not saved:
        return lines + ["E2E protocol runs of ft-qv, LoRA or Delta-LoRA with saved weights in their "
                        "records: none yet.", ""]
    rows = [[model, method, f"`{run_id}`", f"`{(r['weights'] or {}).get('path', '?')}`"]
            for model, method, run_id, r in saved]
    lines += ["E2E protocol runs of ft-qv, LoRA and Delta-LoRA whose records name saved weights:", "",
              *_table(["model", "method", "run_id", "weights (as recorded)"], rows), ""]
    for model in sorted({m for m, *_ in saved}):
        stem = f"figure3_e2e__{model}"
        if (results_dir / "figures" / f"{stem}.csv").is_file():
            lines += [f"- {model}: drawn, `figures/{stem}.png`.", ""]
            continue
        have = {method for m, method, *_ in saved if m == model}
        lacking = [m for m in FIGURE3_METHODS if m not in have]
        lines += [f"- {model}: not drawn (no `figures/{stem}.csv`). The paper's figure compares "
                  f"one run each of {', '.join(FIGURE3_METHODS)}"
                  + (f"; no protocol run of {', '.join(lacking)} has saved weights" if lacking
                     else "") + ". Weights stay on the machine that ran them (saved by default, "
                  "`save_weights=true`); draw it there, from the runs' output folders "
                  "(`--results` takes the latest run at the paper's settings of each method whose "
                  "weights are present):", "", "  ```",
                  f"  python -m deltalora_repro.figure3 OUT_FT_QV OUT_LORA OUT_DELTA_LORA "
                  f"--out results/figures/{stem}", "  ```", ""]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltalora_repro.reproduction",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"),
                        help="folder holding records/ (and scores/); the report is written there")
    parser.add_argument("--procedure", choices=tables.PROCEDURE_CHOICES, default="paper",
                        help="scoring procedure of the E2E and WebNLG numbers (default: paper); "
                             "official writes REPRODUCTION__official.md")
    args = parser.parse_args(argv)
    if not tables.has_records(args.results):
        return 2
    try:
        text = render(args.results, args.procedure)
    except tables.RecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = OUT_NAME if args.procedure == "paper" else f"REPRODUCTION__{args.procedure}.md"
    (args.results / name).write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {args.results / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
