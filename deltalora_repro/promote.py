"""Copy finished runs into the committed results folder, on purpose.

    python -m deltalora_repro.promote RECORD.json [RECORD.json ...] [--to results]

Runs write their records to an ignored folder (results_dir, default outputs/results), so trial
and test runs never reach the tables in results/. A run meant for the tables is promoted: its
record, its kept predictions and its score records (if any) are copied to the same places under
--to. Only completed runs with finite metrics are promoted, nothing existing is replaced, and
nothing is written unless every named run can be promoted. Exit status 2 with a message otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from . import records


class PromoteError(Exception):
    pass


def _finite(value) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def plan(record_file: Path, dest: Path) -> list[tuple[Path, Path]]:
    """(source, destination) pairs for one run; raises PromoteError naming what is wrong."""
    try:
        run = json.loads(record_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PromoteError(f"{record_file}: not a readable run record ({exc})") from None
    parts = record_file.resolve().parts
    if len(parts) < 6 or parts[-5] != "records" or run.get("run_id") != record_file.stem:
        raise PromoteError(f"{record_file}: not a run record in <results>/records/<task>/<model>/"
                           "<method>/<run_id>.json")
    if run.get("status") != "completed":
        raise PromoteError(f"{record_file}: status {run.get('status')!r}; only completed runs are "
                           "promoted")
    if not _finite(run.get("metrics")):
        raise PromoteError(f"{record_file}: non-finite metrics; not promoted")
    source = Path(*parts[:-5])
    rel = Path(*parts[-4:-1])
    pairs = [(record_file, dest / "records" / rel / record_file.name)]
    if run.get("predictions"):
        pairs.append((source / run["predictions"], dest / run["predictions"]))
    score = source / "scores" / rel / record_file.name
    if score.is_file():
        pairs.append((score, dest / "scores" / rel / record_file.name))
    for src, dst in pairs:
        if not src.is_file():
            raise PromoteError(f"{record_file}: {src} is missing")
        if dst.exists():
            raise PromoteError(f"{dst} exists; nothing is replaced")
    return pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deltalora_repro.promote", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", nargs="+", type=Path, help="run record JSON files")
    ap.add_argument("--to", type=Path, default=records.PROJECT_ROOT / "results",
                    help="the results folder to copy into (default: the project's results/)")
    args = ap.parse_args(argv)
    try:
        pairs = [pair for record in args.records for pair in plan(record, args.to)]
    except PromoteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        print(f"{src} -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
