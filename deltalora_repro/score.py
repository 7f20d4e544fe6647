"""Score a file of predictions with the official E2E or WebNLG metrics; print one JSON object.

    python -m deltalora_repro.score task=e2e predictions=FILE [references=FILE] [data_dir=DIR]
                                    [mteval=perl|python]
    python -m deltalora_repro.score task=webnlg predictions=FILE [references=FILE] [data_dir=DIR]
                                    [lora_preprocess=true|false]

predictions: one prediction per line, one line per distinct test input in test-set order (630
lines for E2E, 1862 for WebNLG), or for E2E a CSV with columns mr,prediction (the mr column may
hold the raw MR, name[...], or the LoRA form, name : ...; rows are matched to the test inputs).
references: blocks of references separated by blank lines, one block per prediction (the
format of e2e-metrics). Without it the test set is loaded (from data_dir, or the hub when
data_dir is not given) and grouped by input. WebNLG prints bleu/meteor/ter for the seen, unseen
and all subsets when the test set is loaded, and for all entries only with a references file.

Metrics are fractions except NIST and CIDEr (metrics/e2e.py, metrics/webnlg.py). Exit status 2
on bad arguments or input files, with a message saying what is wrong.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

TASKS = ("e2e", "webnlg")
KEYS = {"task", "predictions", "references", "data_dir", "mteval", "lora_preprocess"}


class UsageError(Exception):
    """Bad command line or input file; main() prints it and exits with status 2."""


def parse_args(argv: list[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep:
            raise UsageError(f"arguments are key=value pairs, got {item!r}; keys: {', '.join(sorted(KEYS))}")
        if key not in KEYS:
            raise UsageError(f"unknown argument {key!r}; valid keys: {', '.join(sorted(KEYS))}")
        args[key] = value
    if "task" not in args:
        raise UsageError(f"missing task=...; valid tasks: {', '.join(TASKS)}")
    if args["task"] not in TASKS:
        raise UsageError(f"unknown task {args['task']!r}; valid tasks: {', '.join(TASKS)}")
    if not args.get("predictions"):
        raise UsageError("missing predictions=FILE")
    return args


def read_text(path: str, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} file not found: {p.resolve()}")
    try:
        return p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {what} file {p.resolve()}: {exc}") from None


def read_prediction_lines(text: str, path: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    lines = [line.rstrip("\r") for line in lines]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise UsageError(f"{path}: line {number} is empty; every line must hold one prediction")
    if not lines:
        raise UsageError(f"{path}: no predictions")
    return lines


def read_prediction_csv(text: str, path: str) -> list[tuple[int, str, str]]:
    """(line number, mr, prediction) rows of a CSV with columns mr and prediction."""
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if "mr" not in columns or "prediction" not in columns:
        raise UsageError(f"{path}: a prediction CSV needs the columns mr,prediction; found {columns}")
    reader.fieldnames = columns
    rows = []
    for row in reader:
        if not (row.get("prediction") or "").strip():
            raise UsageError(f"{path}: line {reader.line_num} has an empty prediction")
        rows.append((reader.line_num, row["mr"].strip(), row["prediction"]))
    if not rows:
        raise UsageError(f"{path}: no predictions")
    return rows


def read_reference_blocks(text: str) -> list[list[str]]:
    """e2e-metrics' read_lines(multi_ref=True): stripped lines, blocks split at blank lines."""
    blocks: list[list[str]] = [[]]
    for line in text.split("\n"):
        line = line.strip()
        if line:
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    if not blocks[-1]:
        blocks.pop()
    return blocks


def load_test_groups(task: str, data_dir: str | None):
    """[(example, references)] of the test set, one per distinct input, in test order."""
    try:
        from deltalora_repro.tasks.e2e_data import group_references
        if task == "e2e":
            from deltalora_repro.tasks.e2e_data import load_e2e as load
        else:
            from deltalora_repro.tasks.webnlg_data import load_webnlg as load
    except ImportError as exc:
        raise UsageError(f"cannot load the {task} test set ({exc}); pass references=FILE") from None
    try:
        split = load("test", data_dir)
    except (ValueError, OSError) as exc:
        raise UsageError(f"cannot load the {task} test set from {data_dir or 'the hub'}: {exc}") from None
    return group_references(split.examples)


def align_csv(rows: list[tuple[int, str, str]], groups, path: str) -> list[str]:
    """Predictions in test order from CSV rows keyed by raw (group) or LoRA-form (context) MR."""
    index = {}
    for i, (example, _) in enumerate(groups):
        index.setdefault(example.group, i)
        index.setdefault(example.context.strip(), i)
    predictions: list[str | None] = [None] * len(groups)
    for line, mr, prediction in rows:
        if mr not in index:
            raise UsageError(f"{path}: line {line}: mr {mr!r} is not a test-set input")
        i = index[mr]
        if predictions[i] is not None:
            raise UsageError(f"{path}: line {line}: a second prediction for mr {mr!r}")
        predictions[i] = prediction
    missing = [i for i, p in enumerate(predictions) if p is None]
    if missing:
        raise UsageError(f"{path}: {len(rows)} predictions but {len(groups)} test inputs; "
                         f"no prediction for mr {groups[missing[0]][0].group!r} and {len(missing) - 1} more")
    return predictions  # type: ignore[return-value]


def score(args: dict[str, str]) -> dict[str, float]:
    task, pred_path = args["task"], args["predictions"]
    text = read_text(pred_path, "predictions")
    is_csv = task == "e2e" and (pred_path.lower().endswith(".csv") or text.lstrip().lower().startswith("mr,"))
    if is_csv and "references" in args:
        raise UsageError("a prediction CSV is matched to the test set by mr; do not pass references=")

    seen = None
    if "references" in args:
        references = read_reference_blocks(read_text(args["references"], "references"))
        predictions = read_prediction_lines(text, pred_path)
    else:
        groups = load_test_groups(task, args.get("data_dir"))
        references = [refs for _, refs in groups]
        if is_csv:
            predictions = align_csv(read_prediction_csv(text, pred_path), groups, pred_path)
        else:
            predictions = read_prediction_lines(text, pred_path)
        if task == "webnlg":
            seen = [bool(example.seen) for example, _ in groups]
    if len(predictions) != len(references):
        raise UsageError(f"{len(predictions)} predictions ({pred_path}) but {len(references)} reference "
                         f"groups ({args.get('references', 'test set')}); one prediction per input is needed")

    if task == "e2e":
        from deltalora_repro.metrics.e2e import MTEVAL_VARIANTS, e2e_metrics
        mteval = args.get("mteval", "perl")
        if mteval not in MTEVAL_VARIANTS:
            raise UsageError(f"unknown mteval={mteval!r}; valid: {', '.join(MTEVAL_VARIANTS)}")
        return e2e_metrics(predictions, references, mteval=mteval)
    from deltalora_repro.metrics.webnlg import webnlg_metrics_by_split
    flag = args.get("lora_preprocess", "true").lower()
    if flag not in ("true", "false"):
        raise UsageError(f"lora_preprocess must be true or false, got {flag!r}")
    return webnlg_metrics_by_split(predictions, references, seen, lora_preprocess=flag == "true")


def main(argv: list[str] | None = None) -> int:
    from deltalora_repro.metrics.java import MetricToolError

    try:
        metrics = score(parse_args(sys.argv[1:] if argv is None else argv))
    except (UsageError, MetricToolError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
