"""Score a file of predictions with the official E2E or WebNLG metrics; print one JSON object.

    python -m deltalora_repro.score task=e2e predictions=FILE [procedure=paper|official]
                                    [references=FILE] [data_dir=DIR]
    python -m deltalora_repro.score task=webnlg predictions=FILE [procedure=paper|official]
                                    [references=FILE] [data_dir=DIR]

procedure (default paper) names how the numbers are made, and the output says which:
- E2E paper: the LoRA repository's: the tokenised test references (lora_format/test.txt form),
  measure_scores.py -p (Python mteval). official: the E2E challenge's: the raw references of
  testset_w_refs.csv, measure_scores.py with the Perl mteval-v13a (metrics/e2e.py).
- WebNLG paper: the LoRA repository's decode step (lowercase, split on non-word characters,
  references padded to 6 with the first) before GenerationEval; official: GenerationEval on the
  plain texts (needs nltk's punkt data) (metrics/webnlg.py).

predictions: one prediction per line, one line per distinct test input in test-set order (630
lines for E2E, 1862 for WebNLG), or for E2E a CSV with columns mr,prediction (the mr column may
hold the raw MR, name[...], or the LoRA form, name : ...; rows are matched to the test inputs).
An empty line is an empty prediction, scored as the official tools score it; the output counts
them (n_empty). E2E lines break as e2e-metrics breaks them (any Unicode line boundary).
references: replaces the procedure's references (the output then names the file). For E2E either
e2e-metrics format: blocks of references separated by one blank line, one block per prediction,
or a CSV/TSV with an MR and a reference column (the official testset_w_refs.csv as it is;
consecutive rows with the same MR are one input's references). Without it the test set is loaded
(from data_dir, or the hub when data_dir is not given) and grouped by input. WebNLG prints
bleu/meteor/ter for the seen, unseen and all subsets when the test set is loaded, and for all
entries only with a references file.

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
PROCEDURE_NAMES = ("paper", "official")
KEYS = {"task", "predictions", "references", "data_dir", "procedure"}
# Keys of earlier versions, whose choice is now part of a named procedure.
RETIRED = {
    "mteval": "mteval= is set by procedure=: paper uses the Python mteval (measure_scores.py -p), "
              "official the Perl mteval-v13a",
    "lora_preprocess": "lora_preprocess= is set by procedure=: paper runs the LoRA decode step "
                       "(lora_preprocess=true), official does not (false)",
}


class UsageError(Exception):
    """Bad command line or input file; main() prints it and exits with status 2."""


def parse_args(argv: list[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep:
            raise UsageError(f"arguments are key=value pairs, got {item!r}; keys: {', '.join(sorted(KEYS))}")
        if key in RETIRED:
            raise UsageError(f"{RETIRED[key]}; valid keys: {', '.join(sorted(KEYS))}")
        if key not in KEYS:
            raise UsageError(f"unknown argument {key!r}; valid keys: {', '.join(sorted(KEYS))}")
        args[key] = value
    if "task" not in args:
        raise UsageError(f"missing task=...; valid tasks: {', '.join(TASKS)}")
    if args["task"] not in TASKS:
        raise UsageError(f"unknown task {args['task']!r}; valid tasks: {', '.join(TASKS)}")
    if not args.get("predictions"):
        raise UsageError("missing predictions=FILE")
    args.setdefault("procedure", "paper")
    if args["procedure"] not in PROCEDURE_NAMES:
        raise UsageError(f"unknown procedure {args['procedure']!r}; valid: {', '.join(PROCEDURE_NAMES)}")
    return args


def read_text(path: str, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} file not found: {p.resolve()}")
    try:
        return p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {what} file {p.resolve()}: {exc}") from None


def read_prediction_lines(text: str, path: str, task: str) -> list[str]:
    """One prediction per line; an empty line is an empty prediction. E2E: lines as e2e-metrics'
    read_lines gives them (any Unicode line boundary, each stripped). WebNLG: lines split at "\\n"
    only, as GenerationEval splits its files, a final newline ending the last line."""
    if task == "e2e":
        from deltalora_repro.metrics.e2e import split_lines
        lines = split_lines(text)
    else:
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the newline that ends the last line
        lines = [line.rstrip("\r") for line in lines]
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
        if row.get("prediction") is None:
            raise UsageError(f"{path}: line {reader.line_num} has no prediction field")
        rows.append((reader.line_num, row["mr"].strip(), row["prediction"]))
    if not rows:
        raise UsageError(f"{path}: no predictions")
    return rows


def read_references(path: str, task: str) -> tuple[list[list[str]], str]:
    """(reference groups, what the file was read as) from references=FILE."""
    text = read_text(path, "references")
    if task == "e2e":
        from deltalora_repro.metrics import e2e
        try:
            if e2e.looks_like_reference_table(path, text):
                rows = e2e.read_reference_table(text, path)
                return e2e.group_consecutive(rows), f"{path} (table of {len(rows)} MR, reference rows)"
            groups = e2e.read_reference_blocks(text, path)
        except ValueError as exc:
            raise UsageError(f"{exc}; references must be e2e-metrics' blank-line-separated blocks "
                             f"or a CSV/TSV with an MR and a reference column") from None
        return groups, f"{path} (blank-line-separated blocks)"
    return read_webnlg_reference_blocks(text), f"{path} (blank-line-separated blocks)"


def read_webnlg_reference_blocks(text: str) -> list[list[str]]:
    """Stripped lines, blocks split at blank lines."""
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
    return group_references(split.examples), split.source


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


def e2e_test_references(procedure: str, groups, source: str, data_dir: str | None):
    """The procedure's references for the loaded test groups, and a description of them."""
    from deltalora_repro.metrics import e2e
    if procedure == "paper":
        return e2e.paper_references([refs for _, refs in groups]), f"tokenised test references, {source}"
    try:
        raw, raw_source = e2e.official_test_references(data_dir)
    except (ValueError, OSError) as exc:
        raise UsageError(f"cannot load the raw E2E test references: {exc}") from None
    missing = [ex.group for ex, _ in groups if ex.group not in raw]
    if missing:
        raise UsageError(f"{raw_source}: no references for the test MR {missing[0]!r} "
                         f"({len(missing)} MRs missing)")
    return [raw[ex.group] for ex, _ in groups], f"raw test references, {raw_source}"


def score(args: dict[str, str]) -> dict:
    task, pred_path, procedure = args["task"], args["predictions"], args["procedure"]
    text = read_text(pred_path, "predictions")
    is_csv = task == "e2e" and (pred_path.lower().endswith(".csv") or text.lstrip().lower().startswith("mr,"))
    if is_csv and "references" in args:
        raise UsageError("a prediction CSV is matched to the test set by mr; do not pass references=")

    seen = None
    if "references" in args:
        references, ref_source = read_references(args["references"], task)
        predictions = read_prediction_lines(text, pred_path, task)
    else:
        groups, source = load_test_groups(task, args.get("data_dir"))
        if is_csv:
            predictions = align_csv(read_prediction_csv(text, pred_path), groups, pred_path)
        else:
            predictions = read_prediction_lines(text, pred_path, task)
        if task == "e2e":
            references, ref_source = e2e_test_references(procedure, groups, source, args.get("data_dir"))
        else:
            references, ref_source = [refs for _, refs in groups], f"test references, {source}"
            seen = [bool(example.seen) for example, _ in groups]
    if len(predictions) != len(references):
        raise UsageError(f"{len(predictions)} predictions ({pred_path}) but {len(references)} reference "
                         f"groups ({args.get('references', 'test set')}); one prediction per input is needed")

    out = {"task": task, "procedure": procedure, "references": ref_source, "n": len(predictions),
           "n_empty": sum(1 for p in predictions if not p.strip())}
    if task == "e2e":
        from deltalora_repro.metrics.e2e import get_procedure, score_procedure
        out["description"] = get_procedure(procedure).description
        return {**out, **score_procedure(procedure, predictions, references)}
    from deltalora_repro.metrics.webnlg import get_procedure as webnlg_procedure
    from deltalora_repro.metrics.webnlg import webnlg_metrics_by_split
    spec = webnlg_procedure(procedure)
    out["description"] = spec.description
    return {**out, **webnlg_metrics_by_split(predictions, references, seen,
                                             lora_preprocess=spec.lora_preprocess)}


def main(argv: list[str] | None = None) -> int:
    from deltalora_repro.metrics.java import MetricToolError

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return 0
    try:
        metrics = score(parse_args(argv))
    except (UsageError, MetricToolError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
