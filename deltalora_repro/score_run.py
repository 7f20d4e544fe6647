"""Score a finished run's kept predictions and write a score record beside the run records.

    python -m deltalora_repro.score_run RECORD.json [--predictions FILE.jsonl] [--results DIR]
                                        [--data-dir DIR] [--procedures paper,official]

For runs decoded where the official scorers cannot run (no Java on the GPU machine:
`task.score=false`), and for adding a scoring procedure to a run scored before. The predictions
file is the run's `predictions.jsonl` (one line per distinct test input: context, prediction,
references, group, seen); its SHA-256 is stored with the scores, so the score record is tied to
exactly those outputs. The run record itself is never modified: tables merge
`results/scores/.../<run_id>.json` into the run's final metrics.

E2E and WebNLG scores are kept per named procedure (metrics/e2e.py, metrics/webnlg.py):
`procedures` holds each one's metrics and provenance, `procedure` names the one in `metrics`
(paper when present). An existing score record keeps its procedures and gains the missing ones;
one written before procedures had names is kept under the name its code implies (E2E: "legacy",
tokenised references with the Perl mteval; WebNLG: "paper"). Default procedures: E2E paper and
official (the official one reads the raw references of testset_w_refs.csv from --data-dir, by
default the run's data_dir); WebNLG paper (official needs nltk's punkt data).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from . import records



class ScoreRunError(Exception):
    """Bad arguments or inputs; main() prints it and exits with status 2."""


def _task_class(run: dict):
    """The run's task family (registered in tasks/), which scores its kept outputs."""
    from .tasks import task_class
    family = ((run.get("config") or {}).get("task") or {}).get("family") or run["task"]
    try:
        cls = task_class(family)
    except Exception as exc:
        raise ScoreRunError(str(exc)) from None
    if not cls.decodes:
        raise ScoreRunError(f"run task {run['task']!r} has no decoded outputs to score (tasks "
                            "that decode: e2e, webnlg, xsum)")
    return cls


def _existing_procedures(cls, task: str, old: dict) -> dict[str, dict]:
    """The procedures of an existing score record, each with its own provenance."""
    if "procedures" in old:
        return dict(old["procedures"])
    # Written before procedures had names: one set of metrics, provenance at the top level.
    return {name: {"metrics": metrics, "description": cls.describe_procedure(name), "git": old.get("git"),
                   "command": old.get("command"), "scored_at": old.get("scored_at")}
            for name, metrics in records.scores_by_procedure(task, old.get("metrics", {})).items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deltalora_repro.score_run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("record", type=Path)
    ap.add_argument("--predictions", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=None,
                    help="the results folder of the run (default: the one RECORD lies in, "
                         "<results>/records/<task>/<model>/<method>/<run_id>.json)")
    ap.add_argument("--data-dir", default=None,
                    help="E2E official procedure: folder with testset_w_refs.csv (default: the run's data_dir)")
    ap.add_argument("--procedures", default=None,
                    help="comma-separated procedure names (default: E2E paper,official; WebNLG paper)")
    args = ap.parse_args(argv)
    try:
        return _main(args, sys.argv[1:] if argv is None else argv)
    except ScoreRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args, argv: list[str]) -> int:
    if not args.record.is_file():
        raise ScoreRunError(f"run record {args.record} not found")
    run = json.loads(args.record.read_text())
    if args.results is None:
        parts = args.record.resolve().parts
        if len(parts) < 6 or parts[-5] != "records":
            raise ScoreRunError(f"{args.record} is not under <results>/records/<task>/<model>/"
                                "<method>/; say where its results folder is with --results")
        args.results = Path(*parts[:-5])
    task = run["task"]
    cls = _task_class(run)
    names: list[str] = []
    if cls.procedures:
        valid = cls.procedures
        names = args.procedures.split(",") if args.procedures else list(cls.default_procedures)
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise ScoreRunError(f"unknown {task} procedure(s) {unknown}; valid: {', '.join(valid)}")
    elif args.procedures:
        raise ScoreRunError(f"{task} has no named scoring procedures; drop --procedures")
    pred_file = args.predictions or (
        args.results / run["predictions"] if run.get("predictions")
        else Path(run["output_dir"]) / "predictions.jsonl")
    if not pred_file.is_file():
        raise ScoreRunError(f"predictions {pred_file} not found (pass --predictions)")
    data = pred_file.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    test = run["data"]["test"]
    expected = test.get("groups_decoded", test.get("rows_used"))   # NLG: distinct inputs; XSum: rows
    if len(rows) != expected:
        raise ScoreRunError(f"{pred_file} has {len(rows)} predictions, the run decoded {expected}")

    dst = args.results / "scores" / task / run["model"] / run["method"] / f"{run['run_id']}.json"
    old = json.loads(dst.read_text()) if dst.is_file() else None
    if old is not None and old.get("predictions", {}).get("sha256") != sha256:
        raise ScoreRunError(f"{dst} scores other predictions (sha256 {old.get('predictions', {}).get('sha256')}, "
                            f"{pred_file} has {sha256}); move it away to score these")
    command = " ".join(["python", "-m", "deltalora_repro.score_run", *argv])
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    git = records.git_state()
    out = {"kind": "score", "run_id": run["run_id"], "task": task, "model": run["model"],
           "method": run["method"]}
    if not cls.procedures:
        if old is not None:
            raise ScoreRunError(f"{dst} exists: this run is scored")
        out["metrics"] = cls.score(rows)
    else:
        procedures = _existing_procedures(cls, task, old) if old is not None else {}
        # A run scored when it ran (task.score=true) keeps its scores in its own record.
        in_run = records.scores_by_procedure(task, (run.get("metrics") or {}).get("final") or {})
        missing = [n for n in names if n not in procedures and n not in in_run]
        if not missing:
            print(f"run {run['run_id']} is already scored with procedure(s) {', '.join(names)}", file=sys.stderr)
            return 0
        data_dir = args.data_dir or (run.get("config") or {}).get("data_dir")
        try:
            scored = cls.score(rows, missing, data_dir)["procedures"]
        except (OSError, ValueError) as exc:
            raise ScoreRunError(f"{exc} (the official E2E procedure reads testset_w_refs.csv: pass "
                                "--data-dir, the folder of the official E2E CSVs)") from None
        for name, metrics in scored.items():
            procedures[name] = {"metrics": metrics, "description": cls.describe_procedure(name),
                                "git": git, "command": command, "scored_at": now}
        # The reported numbers are the paper procedure's when scored, never the legacy ones.
        primary = next(n for n in ("paper", "official") if n in procedures)
        out.update({"procedure": primary, "metrics": procedures[primary]["metrics"], "procedures": procedures})
    out.update({"predictions": {"path": str(pred_file), "sha256": sha256, "n": len(rows)},
                "git": git, "machine": records.machine(torch.device("cpu")),
                "versions": records.versions(), "command": command, "scored_at": now})
    records.write_json_atomic(dst, out, overwrite=old is not None)
    print(json.dumps({k: out[k] for k in ("procedure", "metrics") if k in out}))
    print(f"score record: {dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
