"""Load the 8 GLUE tasks of Delta-LoRA's RoBERTa table, from the hub or from GLUE's own files.

Every split comes back as plain rows ``{"text_a", "text_b", "label"}`` with the labels numbered as
the hub (``nyu-mll/glue``) numbers them, so a model trained on local files and one trained on hub
data agree on what class 0 means. Tokenisation and batching live elsewhere; this module only reads.

The paper reports GLUE on the dev sets (test labels are hidden), so the eval split of each task is
its validation split; MNLI has two (matched is the one the paper's table reports).

Local files are read by hand rather than with ``csv`` or pandas: GLUE's TSVs contain unbalanced
quotes, so any quote-aware reader silently merges rows. We split on tab only and check the field
count of every line, so a damaged file fails loudly with its line number instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from deltalora_repro.errors import ConfigError, DataError

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueSpec:
    """What the rest of the toolkit needs to know about one GLUE task."""

    name: str  # our key, e.g. "rte"
    hub_config: str  # config name of nyu-mll/glue
    text_keys: tuple[str, str | None]  # hub column names of the one or two input texts
    num_labels: int  # 1 for STS-B, which is regression
    metric: str  # primary metric key, as returned by deltalora_repro.metrics.glue.glue_metrics
    eval_split: str  # the split the paper's table reports


GLUE_SPECS: dict[str, GlueSpec] = {
    spec.name: spec
    for spec in (
        GlueSpec("mnli", "mnli", ("premise", "hypothesis"), 3, "accuracy", "validation_matched"),
        GlueSpec("sst2", "sst2", ("sentence", None), 2, "accuracy", "validation"),
        GlueSpec("mrpc", "mrpc", ("sentence1", "sentence2"), 2, "accuracy", "validation"),
        GlueSpec("cola", "cola", ("sentence", None), 2, "matthews_correlation", "validation"),
        GlueSpec("qnli", "qnli", ("question", "sentence"), 2, "accuracy", "validation"),
        GlueSpec("qqp", "qqp", ("question1", "question2"), 2, "accuracy", "validation"),
        GlueSpec("rte", "rte", ("sentence1", "sentence2"), 2, "accuracy", "validation"),
        GlueSpec("stsb", "stsb", ("sentence1", "sentence2"), 1, "pearson", "validation"),
    )
}


@dataclass
class GlueSplit:
    """One split as plain rows, with where it came from (recorded with every run)."""

    rows: list[dict]  # each {"text_a": str, "text_b": str | None, "label": int | float}
    source: str  # human-readable provenance
    note: str | None = None  # a caveat that must travel with the results (MRPC fallback)


def valid_splits(name: str) -> tuple[str, ...]:
    """Splits load_glue_split accepts for a task: train and the labelled dev split(s)."""
    spec = _get_spec(name)
    if spec.name == "mnli":
        return ("train", "validation_matched", "validation_mismatched")
    return ("train", spec.eval_split)


def load_glue_split(name: str, split: str, data_dir: str | Path | None = None) -> GlueSplit:
    """Load one split of one GLUE task.

    data_dir None reads ``nyu-mll/glue`` from the Hugging Face hub (needs network or a warm
    cache); otherwise data_dir is the folder holding GLUE's per-task subfolders (MNLI, SST-2, ...).
    """
    spec = _get_spec(name)
    if split not in valid_splits(name):
        raise ConfigError(
            f"unknown split {split!r} for GLUE task {name!r}; valid splits: {', '.join(valid_splits(name))}"
        )
    if data_dir is None:
        return _load_from_hub(spec, split)
    task_dir = _find_task_dir(spec, Path(data_dir))
    if spec.name == "cola":
        return _load_cola(task_dir, split)
    if spec.name == "stsb":
        return _load_stsb(task_dir, split)
    if spec.name == "mrpc":
        return _load_mrpc(task_dir, split)
    return _load_header_task(spec.name, task_dir, split)


# --------------------------------------------------------------------------------------------
# Hub


def _load_from_hub(spec: GlueSpec, split: str) -> GlueSplit:
    from deltalora_repro.tasks.base import load_hub_dataset
    dataset = load_hub_dataset(HUB_DATASET, spec.hub_config, split=split,
                               local_hint="point data_dir at a folder of GLUE task folders (e.g. "
                                          "data_dir=../shared/data/glue with RTE/train.tsv, dev.tsv)")
    key_a, key_b = spec.text_keys
    # Column access is much faster than iterating examples (MNLI train has 393k rows).
    texts_a = list(dataset[key_a])
    texts_b = list(dataset[key_b]) if key_b is not None else [None] * len(texts_a)
    cast = float if spec.num_labels == 1 else int
    rows = [
        {"text_a": a, "text_b": b, "label": cast(label)}
        for a, b, label in zip(texts_a, texts_b, dataset["label"], strict=True)
    ]
    return GlueSplit(rows, f"hub {HUB_DATASET} {spec.hub_config} {split} ({len(rows)} rows)")


# --------------------------------------------------------------------------------------------
# Local files: where they are


# Folder names as GLUE's download script ships them; our own key is accepted as a second choice.
_GLUE_DIR_NAMES = {
    "mnli": "MNLI",
    "sst2": "SST-2",
    "mrpc": "MRPC",
    "cola": "CoLA",
    "qnli": "QNLI",
    "qqp": "QQP",
    "rte": "RTE",
    "stsb": "STS-B",
}

# GLUE's file name for each split; MNLI's two dev sets have their own files.
_GLUE_FILE_NAMES = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
}


def _get_spec(name: str) -> GlueSpec:
    if name not in GLUE_SPECS:
        raise ConfigError(f"unknown GLUE task {name!r}; valid names: {', '.join(GLUE_SPECS)}")
    return GLUE_SPECS[name]


def _find_task_dir(spec: GlueSpec, data_dir: Path) -> Path:
    candidates = [data_dir / _GLUE_DIR_NAMES[spec.name], data_dir / spec.name]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise DataError(f"no folder for GLUE task {spec.name!r}; looked for: {looked}")


def _first_existing(paths: list[Path], what: str) -> Path:
    for path in paths:
        if path.is_file():
            return path
    looked = ", ".join(str(p.resolve()) for p in paths)
    raise DataError(f"missing data file for {what}; looked for: {looked}")


# --------------------------------------------------------------------------------------------
# Local files: reading lines and labels


def _tsv_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (1-based line number, tab-separated fields), skipping blank lines.

    utf-8-sig drops the byte-order mark the raw MSRP files start with. Lines are split on "\\n"
    alone (bytes, decoded line by line), so a stray carriage return inside a sentence cannot split
    a row in two, and a byte that is not UTF-8 is reported with its line.
    """
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise _malformed(path, line_number, f"not UTF-8 text (byte {raw[exc.start]:#04x} at "
                                 f"column {exc.start + 1})") from None
            line = line.rstrip("\r\n")
            if line:
                yield line_number, line.split("\t")


def _malformed(path: Path, line_number: int, problem: str) -> DataError:
    return DataError(f"{path.resolve()}, line {line_number}: {problem}")


def _read_header_tsv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a TSV with a header line, as (line number, {column: value}).

    Columns are found by header name because GLUE's files differ in column order and extras
    (MNLI carries parse trees and five annotator labels we do not need).
    """
    lines = _tsv_lines(path)
    header_line = next(lines, None)
    if header_line is None:
        raise DataError(f"{path.resolve()} is empty; expected a header with columns {list(required)}")
    _, header = header_line
    missing = [column for column in required if column not in header]
    if missing:
        raise DataError(f"{path.resolve()}: header lacks columns {missing}; header is {header}")
    rows = []
    for line_number, fields in lines:
        if len(fields) != len(header):
            problem = f"expected {len(header)} tab-separated fields, found {len(fields)}"
            raise _malformed(path, line_number, problem)
        rows.append((line_number, dict(zip(header, fields))))
    if not rows:
        raise DataError(f"{path.resolve()} has a header but no rows")
    return rows


# A label parser turns the file's label text into the hub's label; ValueError means a bad value.
LabelParser = Callable[[str], int | float]


def _binary_label(text: str) -> int:
    if text not in ("0", "1"):
        raise ValueError(f"label {text!r} is not 0 or 1")
    return int(text)


def _named_label(names: tuple[str, ...]) -> LabelParser:
    """Map label names to their index in `names`, which follows the hub's ClassLabel order."""

    def parse(text: str) -> int:
        if text not in names:
            raise ValueError(f"label {text!r} is not one of {list(names)}")
        return names.index(text)

    return parse


def _similarity_score(text: str) -> float:
    try:
        score = float(text)
    except ValueError:
        raise ValueError(f"score {text!r} is not a number") from None
    # STS-B scores are human ratings on a 0..5 scale; anything else means a shifted column.
    if math.isnan(score) or not 0.0 <= score <= 5.0:
        raise ValueError(f"score {text!r} is outside 0..5")
    return score


def _parse_label(parse: LabelParser, text: str, path: Path, line_number: int) -> int | float:
    try:
        return parse(text)
    except ValueError as error:
        raise _malformed(path, line_number, str(error)) from None


def _split_from_rows(rows: list[dict], path: Path, note: str | None = None) -> GlueSplit:
    return GlueSplit(rows, f"{path.resolve()} ({len(rows)} rows)", note)


# --------------------------------------------------------------------------------------------
# Local files: one reader per file layout


@dataclass(frozen=True)
class _HeaderLayout:
    """Which header columns of a GLUE TSV hold the texts and the label."""

    text_a: str
    text_b: str | None
    label: str
    parse_label: LabelParser


# Label orders copy the hub's ClassLabel names, so index == hub label id.
_HEADER_LAYOUTS = {
    "sst2": _HeaderLayout("sentence", None, "label", _binary_label),
    "rte": _HeaderLayout("sentence1", "sentence2", "label", _named_label(("entailment", "not_entailment"))),
    "qnli": _HeaderLayout("question", "sentence", "label", _named_label(("entailment", "not_entailment"))),
    "mnli": _HeaderLayout(
        "sentence1", "sentence2", "gold_label", _named_label(("entailment", "neutral", "contradiction"))
    ),
    "qqp": _HeaderLayout("question1", "question2", "is_duplicate", _binary_label),
    "stsb": _HeaderLayout("sentence1", "sentence2", "score", _similarity_score),
    # GLUE-format MRPC keeps MSRP's header: Quality, #1 ID, #2 ID, #1 String, #2 String.
    "mrpc": _HeaderLayout("#1 String", "#2 String", "Quality", _binary_label),
}


def _read_with_layout(
    path: Path, layout: _HeaderLayout, extra: tuple[str, ...] = ()
) -> list[tuple[dict, dict[str, str]]]:
    """(row, raw fields) pairs; the raw fields let MRPC see its pair ids."""
    required = (layout.text_a,) + ((layout.text_b,) if layout.text_b else ()) + (layout.label,) + extra
    out = []
    for line_number, fields in _read_header_tsv(path, required):
        row = {
            "text_a": fields[layout.text_a],
            "text_b": fields[layout.text_b] if layout.text_b else None,
            "label": _parse_label(layout.parse_label, fields[layout.label], path, line_number),
        }
        out.append((row, fields))
    return out


def _load_header_task(name: str, task_dir: Path, split: str) -> GlueSplit:
    path = _first_existing([task_dir / _GLUE_FILE_NAMES[split]], f"{name} {split}")
    rows = [row for row, _ in _read_with_layout(path, _HEADER_LAYOUTS[name])]
    return _split_from_rows(rows, path)


def _load_cola(task_dir: Path, split: str) -> GlueSplit:
    # CoLA's train/dev files have no header: source, label, original_label, sentence.
    path = _first_existing([task_dir / _GLUE_FILE_NAMES[split]], f"cola {split}")
    rows = []
    for line_number, fields in _tsv_lines(path):
        if len(fields) != 4:
            columns = "source, label, original_label, sentence"
            problem = f"expected 4 tab-separated fields ({columns}), found {len(fields)}"
            raise _malformed(path, line_number, problem)
        label = _parse_label(_binary_label, fields[1], path, line_number)
        rows.append({"text_a": fields[3], "text_b": None, "label": label})
    return _split_from_rows(rows, path)


def _load_stsb(task_dir: Path, split: str) -> GlueSplit:
    # GLUE's dev.tsv is sometimes missing; the STS-benchmark release it was built from holds the
    # same pairs in its own layout, so fall back to that rather than fail.
    glue_path = task_dir / _GLUE_FILE_NAMES[split]
    original_name = {"train": "sts-train.tsv", "validation": "sts-dev.tsv"}[split]
    path = _first_existing([glue_path, task_dir / "original" / original_name], f"stsb {split}")
    if path == glue_path:
        return _load_header_task("stsb", task_dir, split)
    # STS-benchmark layout, no header: genre, file, year, id, score, sentence1, sentence2, and on
    # some lines extra source columns, which we ignore.
    rows = []
    for line_number, fields in _tsv_lines(path):
        if len(fields) < 7:
            problem = f"expected at least 7 tab-separated fields, found {len(fields)}"
            raise _malformed(path, line_number, problem)
        score = _parse_label(_similarity_score, fields[4], path, line_number)
        rows.append({"text_a": fields[5], "text_b": fields[6], "label": score})
    return _split_from_rows(rows, path)


MRPC_NO_DEV_IDS_NOTE = (
    "GLUE's MRPC dev ids (mrpc_dev_ids.tsv) were not found, so train is the whole MSRP train file "
    "and the eval set is the MSRP test set, not GLUE's dev split (408 pairs held out of MSRP train); "
    "scores are not directly comparable to GLUE dev numbers."
)


def _load_mrpc(task_dir: Path, split: str) -> GlueSplit:
    glue_path = task_dir / _GLUE_FILE_NAMES[split]
    if glue_path.is_file():
        return _load_header_task("mrpc", task_dir, split)

    # Raw MSRP release. GLUE built its dev split by holding out a fixed list of train pairs; with
    # that list we rebuild GLUE's split exactly, without it we fall back to MSRP's own test set.
    raw_train = task_dir / "msr_paraphrase_train.txt"
    raw_test = task_dir / "msr_paraphrase_test.txt"
    ids_path = task_dir / "mrpc_dev_ids.tsv"
    id_columns = ("#1 ID", "#2 ID")
    layout = _HEADER_LAYOUTS["mrpc"]

    if ids_path.is_file():
        dev_ids = _read_mrpc_dev_ids(ids_path)
        # Both splits come out of MSRP train; glue_path is listed only to name it in the error.
        path = _first_existing([glue_path, raw_train], f"mrpc {split}")
        pairs = _read_with_layout(path, layout, id_columns)
        found = {(fields["#1 ID"], fields["#2 ID"]) for _, fields in pairs}
        absent = sorted(dev_ids - found)
        if absent:
            # A list that does not match the train file means a wrong file; a silently smaller
            # dev set would give numbers nobody can compare with.
            raise DataError(
                f"{ids_path.resolve()}: {len(absent)} of {len(dev_ids)} dev id pairs are not in "
                f"{path.resolve()}, e.g. {absent[0]}"
            )
        in_dev = split == "validation"
        rows = [row for row, fields in pairs if ((fields["#1 ID"], fields["#2 ID"]) in dev_ids) == in_dev]
        role = "GLUE dev ids" if in_dev else "minus GLUE dev ids"
        return GlueSplit(rows, f"{path.resolve()} {role} from {ids_path.resolve()} ({len(rows)} rows)")

    if (task_dir / _GLUE_FILE_NAMES["validation"]).is_file() and split == "train":
        # Raw MSRP train contains GLUE's dev pairs: training on it and evaluating on dev.tsv leaks.
        raise DataError(
            f"{task_dir.resolve()} has GLUE's dev.tsv but neither train.tsv nor mrpc_dev_ids.tsv; "
            f"the raw MSRP train file contains the dev pairs, so add one of those two files"
        )
    raw = raw_train if split == "train" else raw_test
    path = _first_existing([glue_path, raw], f"mrpc {split}")
    # Python's default filter shows a warning once per (text, location); the location is always
    # the call in load_glue_split, so a run that loads both splits warns once. The note on the
    # split carries the caveat into the run record.
    warnings.warn(f"MRPC in {task_dir.resolve()}: {MRPC_NO_DEV_IDS_NOTE}", UserWarning, stacklevel=2)
    rows = [row for row, _ in _read_with_layout(path, layout)]
    return _split_from_rows(rows, path, MRPC_NO_DEV_IDS_NOTE)


def _read_mrpc_dev_ids(path: Path) -> set[tuple[str, str]]:
    """GLUE's dev id list: one `id1<TAB>id2` line per held-out MSRP train pair."""
    ids = set()
    for line_number, fields in _tsv_lines(path):
        fields = [field.strip() for field in fields]
        if len(fields) != 2 or not all(fields):
            raise _malformed(path, line_number, f"expected 'id1<TAB>id2', found {len(fields)} fields")
        ids.add((fields[0], fields[1]))
    return ids
