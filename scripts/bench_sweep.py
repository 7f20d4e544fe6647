"""Wall time of one sweep run two ways: its jobs side by side, one per GPU (launch=gpus, Hydra's
joblib launcher), and the same jobs one after another (Hydra's basic launcher). One record in
results/bench/ with both times, their ratio, each job's train time, the machine and the commit.

    python scripts/bench_sweep.py --data ../shared/data --jobs 4

The default job is a RoBERTa-base-sized model (random init, the committed tiny tokenizer) on
the real RTE rows, LoRA, 150 optimizer steps: long enough for the GPUs' work to show, short
enough for a benchmark. Any override replaces or adds to it: --set train.max_steps=300.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deltalora_repro import records  # noqa: E402

JOB = ["model=tiny-roberta", "model.config.hidden_size=768", "model.config.num_hidden_layers=12",
       "model.config.num_attention_heads=12", "model.config.intermediate_size=3072",
       "task=glue/rte", "method=lora", "train.max_steps=150", "train.progress=false",
       "train.checkpoint=false", "train.tensorboard=false", "save_weights=false"]


def sweep(overrides: list[str], seeds: str, where: Path, launcher: list[str]) -> tuple[float, list[dict]]:
    cmd = [sys.executable, "-m", "deltalora_repro", "-m", *overrides, f"seed={seeds}",
           f"results_dir={where / 'results'}", f"hydra.sweep.dir={where / 'multirun'}", *launcher]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path})
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"the sweep {' '.join(launcher) or '(basic launcher)'} failed "
                         f"(exit {done.returncode}); its output is above")
    runs = [json.loads(p.read_text()) for p in (where / "results").rglob("records/**/*.json")]
    return wall, sorted(runs, key=lambda r: r["seed"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--jobs", type=int, default=4, help="jobs in the sweep (seeds 0 .. N-1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override of every job (repeatable)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = ap.parse_args(argv)
    if args.jobs < 2:
        ap.error("--jobs must be at least 2")
    merged = {o.split("=", 1)[0]: o for o in [*JOB, f"data_dir={args.data / 'glue'}", *args.set]}
    overrides = list(merged.values())
    seeds = ",".join(str(s) for s in range(args.jobs))
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        side_wall, side_runs = sweep(overrides, seeds, Path(tmp) / "side", ["launch=gpus"])
        seq_wall, seq_runs = sweep(overrides, seeds, Path(tmp) / "sequential", [])
    run_id = records.new_run_id()
    record = {
        "run_id": run_id, "kind": "bench-sweep", "jobs": args.jobs, "overrides": overrides,
        "command": " ".join(["python", "scripts/bench_sweep.py", *(sys.argv[1:] if argv is None else argv)]),
        "gpus": torch.cuda.device_count(),
        "side_by_side": {"launcher": "launch=gpus (joblib)", "wall_s": side_wall,
                         "devices": [r["machine"].get("device_name", "cpu") + " " + r["config"]["device"]
                                     for r in side_runs],
                         "train_time_s": [r["train_time_s"] for r in side_runs]},
        "one_after_another": {"launcher": "basic", "wall_s": seq_wall,
                              "train_time_s": [r["train_time_s"] for r in seq_runs]},
        "speed_up": seq_wall / side_wall,
        # The launcher decides where jobs run, not what they compute.
        "same_metrics": [a["metrics"]["final"] == b["metrics"]["final"]
                         for a, b in zip(side_runs, seq_runs, strict=True)],
        "git": records.git_state(), "machine": records.machine(device), "versions": records.versions(),
    }
    records.write_json_atomic(args.out / f"{run_id}.json", record)
    print(f"{args.jobs} jobs on {record['gpus']} GPUs: side by side {side_wall:.1f} s, one after "
          f"another {seq_wall:.1f} s, {record['speed_up']:.2f}x; record {args.out / (run_id + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
