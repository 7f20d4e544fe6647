"""Score a finished run's kept predictions and write a score record beside the run records.

    python -m deltalora_repro.score_run RECORD.json [--predictions FILE.jsonl] [--results DIR]

For runs decoded where the official scorers cannot run (no Java on the GPU machine:
`task.score=false`). The predictions file is the run's `predictions.jsonl` (one line per distinct
test input: context, prediction, references, seen); its SHA-256 is stored with the scores, so the
score record is tied to exactly those outputs. The run record itself is never modified: tables
merge `results/scores/.../<run_id>.json` into the run's final metrics.
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


def score_predictions(task: str, rows: list[dict]) -> dict:
    preds = [r["prediction"] for r in rows]
    if task == "xsum":
        from .metrics.xsum import xsum_rouge
        return xsum_rouge(preds, [r["reference"] for r in rows])
    refs = [r["references"] for r in rows]
    if task == "e2e":
        from .metrics.e2e import e2e_metrics
        return e2e_metrics(preds, refs)
    if task == "webnlg":
        from .metrics.webnlg import webnlg_metrics_by_split
        return webnlg_metrics_by_split(preds, refs, [bool(r["seen"]) for r in rows])
    raise SystemExit(f"error: run task {task!r} has no decoded outputs to score (e2e, webnlg, xsum)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deltalora_repro.score_run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("record", type=Path)
    ap.add_argument("--predictions", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=records.PROJECT_ROOT / "results")
    args = ap.parse_args(argv)
    run = json.loads(args.record.read_text())
    pred_file = args.predictions or (
        args.results / run["predictions"] if run.get("predictions")
        else Path(run["output_dir"]) / "predictions.jsonl")
    if not pred_file.is_file():
        print(f"error: predictions {pred_file} not found (pass --predictions)", file=sys.stderr)
        return 2
    data = pred_file.read_bytes()
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    test = run["data"]["test"]
    expected = test.get("groups_decoded", test.get("rows_used"))   # NLG: distinct inputs; XSum: rows
    if len(rows) != expected:
        print(f"error: {pred_file} has {len(rows)} predictions, the run decoded {expected}",
              file=sys.stderr)
        return 2
    metrics = score_predictions(run["task"], rows)
    out = {"kind": "score", "run_id": run["run_id"], "task": run["task"], "model": run["model"],
           "method": run["method"], "metrics": metrics,
           "predictions": {"path": str(pred_file), "sha256": hashlib.sha256(data).hexdigest(),
                           "n": len(rows)},
           "git": records.git_state(), "machine": records.machine(torch.device("cpu")),
           "versions": records.versions(), "command": " ".join(["python", "-m",
                                                                "deltalora_repro.score_run", *sys.argv[1:]]),
           "scored_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    dst = args.results / "scores" / run["task"] / run["model"] / run["method"] / f"{run['run_id']}.json"
    records.write_json_atomic(dst, out)
    print(json.dumps(metrics))
    print(f"score record: {dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
