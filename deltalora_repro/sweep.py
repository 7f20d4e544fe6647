"""What a sweep (`python -m deltalora_repro -m ...`) did, job by job, and its exit status.

Hydra's multirun goes on when a job fails, and exits 0 whatever happened. Each job therefore
leaves `job.json` in its own output folder (written by the entrypoint: status, record, metric or
error), and `SweepSummary`, a Hydra callback, reads them all once every job has returned: it
prints one line per job and exits non-zero when any job did not complete. The job files are
read from disk, not collected in memory, so the summary also covers jobs that a launcher ran in
other processes or on other machines sharing the sweep folder.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

JOB_FILE = "job.json"


def write_job_file(output_dir: str | Path, info: dict) -> None:
    path = Path(output_dir) / JOB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1, default=str) + "\n", encoding="utf-8")


def read_jobs(sweep_dir: str | Path) -> list[dict]:
    """Every job file under the sweep folder (one level of job sub-folders), in job order."""
    jobs = []
    for path in Path(sweep_dir).glob(f"*/{JOB_FILE}"):
        try:
            jobs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            jobs.append({"job": path.parent.name, "status": "unreadable", "error": str(exc)})
    return sorted(jobs, key=lambda j: (str(j.get("job", "")).zfill(8)))


def summarise(jobs: list[dict], expected: int | None = None) -> tuple[list[str], bool]:
    """(lines to print, all completed)."""
    lines = [f"sweep: {len(jobs)} job(s)" + (f" of {expected}" if expected is not None else "")]
    ok = bool(jobs) and (expected is None or len(jobs) == expected)
    for j in jobs:
        status = j.get("status", "?")
        ok &= status == "completed"
        detail = (f"{j.get('metric_name', 'metric')}={j['metric']:.4f}" if isinstance(j.get("metric"), float)
                  else (j.get("error") or ""))
        lines.append(f"  job {j.get('job', '?')}: {status:<11} {j.get('overrides', '')}  {detail}  "
                     f"{j.get('record') or ''}".rstrip())
    if expected is not None and len(jobs) < expected:
        lines.append(f"  {expected - len(jobs)} job(s) left no {JOB_FILE} (killed before the end?)")
    return lines, ok


class SweepSummary(Callback):
    """Hydra callback (configs/config.yaml, hydra.callbacks): the summary after a multirun."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        jobs = read_jobs(sweep_dir)
        lines, ok = summarise(jobs)
        print("\n".join(lines), file=sys.stderr)
        if not ok:
            print(f"error: not every job of the sweep completed (job files under {sweep_dir})",
                  file=sys.stderr)
            # SystemExit passes through Hydra's error reporting: the sweep's exit status is 1.
            raise SystemExit(1)
