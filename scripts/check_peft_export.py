"""Check a run's PEFT adapter export end to end: the untouched pretrained model + the exported
adapter (PeftModel.from_pretrained) must decode the run's test inputs as the run itself did.

    python scripts/check_peft_export.py RUN_OUTPUT_DIR --data-dir ../shared/data/e2e --n 100

Exports the run (LoRA or Delta-LoRA, data-to-text task) into a temporary folder, loads the
pretrained model the run started from, wraps it with the adapter, decodes the first N test inputs
with the run's decoding settings (the task's beam search) and compares with the first N rows of
the run's predictions.jsonl. Prints one JSON object: exact matches, the adapter's size in bytes and
the size of the W the method changed (float32 bytes; 0 for LoRA), with the machine, commit and
versions that made it; `--out FILE` also writes it there (never over an existing file). Exit
status 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import open_dict

from deltalora_repro.build import backbone
from deltalora_repro.errors import ConfigError, DataError
from deltalora_repro.export import peft_adapter_of_run, read_run
from deltalora_repro.tasks import build_task


def check(run_dir: Path, data_dir: Path, n: int, device: str) -> dict:
    from peft import PeftModel
    record, cfg = read_run(run_dir)
    predictions_file = run_dir / "predictions.jsonl"
    if not predictions_file.is_file():
        raise ConfigError(f"{predictions_file} not found: the run kept no decoded test outputs")
    if not data_dir.is_dir():
        raise ConfigError(f"--data-dir {str(data_dir)!r} is not a directory")
    with open_dict(cfg):
        cfg.data_dir = str(data_dir)
    task = build_task(cfg.task, cfg.data_dir)
    if not getattr(task, "decodes", False):
        raise ConfigError(f"task {cfg.task.name!r} does not decode text; this check is for the "
                          "data-to-text tasks (e2e, webnlg)")
    rows = [json.loads(line) for line in predictions_file.read_text().splitlines()[:n]]
    task.load()
    contexts = [ex.context for ex, _ in task.test_groups[:len(rows)]]
    if [r["context"] for r in rows] != contexts:
        raise DataError(f"{predictions_file}'s inputs are not the first {len(rows)} test inputs of "
                        f"{data_dir}: another data version?")
    with tempfile.TemporaryDirectory() as tmp:
        report = peft_adapter_of_run(run_dir, Path(tmp) / "adapter")
        base, tokenizer, _ = backbone(cfg, task)
        model = PeftModel.from_pretrained(base, str(Path(tmp) / "adapter")).to(device).eval()
    # decode() needs only the tokenizer: prepare() would also encode every training row.
    task.tokenizer = tokenizer
    decoded = task.decode(model, contexts)
    matches = [d == r["prediction"] for d, r in zip(decoded, rows)]
    updated = record.get("params", {}).get("extra_updated", 0) if record["method"] == "delta-lora" else 0
    return {"run_id": record["run_id"], "method": record["method"], "n": len(rows),
            "exact_match": sum(matches), "adapter_bytes": report["adapter_bytes"],
            "changed_w_bytes": 4 * updated, "adapter_rank": report["rank"],
            "residual": report["residual"],
            "mismatches": [{"context": c, "run": r["prediction"], "adapter": d}
                           for c, r, d, ok in zip(contexts, rows, decoded, matches) if not ok][:5]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--data-dir", type=Path, required=True, help="the task's data folder")
    ap.add_argument("--n", type=int, default=100, help="test inputs to decode (default 100)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="also write the result to this new file")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"--n must be >= 1, got {args.n}")
    if args.out is not None and args.out.exists():
        ap.error(f"--out {str(args.out)!r} exists; nothing is overwritten")
    try:
        result = check(args.run_dir, args.data_dir, args.n, args.device)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from deltalora_repro import records
    result.update({"kind": "peft-export-check", "machine": records.machine(torch.device(args.device)),
                   "git": records.git_state(), "versions": records.versions(),
                   "command": " ".join(["python", "scripts/check_peft_export.py",
                                        *(sys.argv[1:] if argv is None else argv)]),
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    print(json.dumps(result))                 # first: a failed write must not lose the result
    if args.out is not None:
        records.write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
