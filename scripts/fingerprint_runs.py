"""Fingerprint a fixed set of tiny CPU runs: the SHA-256 of every tensor after training and every
metric, so that a refactor can show it changed no computed number (bit for bit).

    python scripts/fingerprint_runs.py --out FILE.json [--data ../shared/data]
    python scripts/fingerprint_runs.py --compare OLD.json NEW.json

The set: every method on tiny-roberta RTE; lora, delta-lora and adalora on tiny-gpt2 E2E; lora on
tiny-bart XSum (the 321-article sample carved into splits); 2 epochs each, seed 0, fp32 on CPU.
Runs go to a temporary folder; nothing is written to results/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RTE = ["task=glue/rte", "model=tiny-roberta", "task.train_max_examples=48",
       "task.eval_max_examples=32", "task.max_length=48", "train.batch_size=8"]
E2E = ["task=e2e", "model=tiny-gpt2", "task.train_max_examples=32", "task.eval_max_examples=16",
       "task.test_max_groups=4", "train.batch_size=8", "task.decoding.num_beams=2",
       "task.decoding.max_new_tokens=8", "task.score=false", "train.warmup_steps=1"]
XSUM = ["task=xsum", "model=tiny-bart", "task.local_file=test_sample.jsonl",
        "task.local_split={train:[0,24],validation:[24,32],test:[300,304]}", "train.batch_size=8",
        "train.warmup_steps=1", "task.decoding.max_new_tokens=8", "task.decoding.num_beams=2",
        "task.score=false"]
METHOD_ARGS = {"delta-lora": ["method.start_steps=2"],
               "adalora": ["method.tinit=1", "method.tfinal=2", "method.target_rank=2"]}


def fixed_set(data: Path) -> dict[str, list[str]]:
    runs = {}
    for m in ("lora", "delta-lora", "dylora", "adalora", "ft", "ft-noembed", "ft-qv"):
        runs[f"rte/{m}"] = [*RTE, f"data_dir={data / 'glue'}", f"method={m}", *METHOD_ARGS.get(m, [])]
    for m in ("lora", "delta-lora", "adalora"):
        runs[f"e2e/{m}"] = [*E2E, f"data_dir={data / 'e2e'}", f"method={m}", *METHOD_ARGS.get(m, [])]
    runs["xsum/lora"] = [*XSUM, f"data_dir={data / 'xsum'}", "method=lora"]
    return runs


def fingerprint(overrides: list[str], workdir: Path) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict
    from safetensors.torch import load_file

    from deltalora_repro.run import run

    with initialize_config_dir(config_dir=str(ROOT / "deltalora_repro" / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "train.epochs=2", "seed=0", "device=cpu",
                                           "train.precision=fp32", "train.checkpoint=false"])
    with open_dict(cfg):
        cfg.output_dir = str(workdir / "out")
        cfg.results_dir = str(workdir / "results")
        cfg.experiment_name = None
    record = run(cfg)
    tensors = load_file(str(workdir / "out" / "weights.safetensors"))
    digest = {name: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
              for name, t in sorted(tensors.items())}
    metrics = record["metrics"]
    return {"tensors": digest, "evals": metrics["evals"],
            "final": {k: v for k, v in metrics["final"].items() if not isinstance(v, dict)}}


def compare(old: dict, new: dict) -> list[str]:
    problems = []
    for name in sorted(set(old["runs"]) | set(new["runs"])):
        a, b = old["runs"].get(name), new["runs"].get(name)
        if a is None or b is None:
            problems.append(f"{name}: only in {'new' if a is None else 'old'}")
            continue
        for key in ("tensors", "evals", "final"):
            if a[key] != b[key]:
                problems.append(f"{name}: {key} differ")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/fingerprint_runs.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = ap.parse_args(argv)
    if args.compare:
        old, new = (json.loads(p.read_text()) for p in args.compare)
        problems = compare(old, new)
        print("\n".join(problems) or f"identical: {len(old['runs'])} runs, every tensor and metric")
        return 1 if problems else 0
    if args.out is None:
        ap.error("--out FILE.json (or --compare OLD NEW)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from deltalora_repro import records
    out = {"git": records.git_state(), "runs": {}}
    for name, overrides in fixed_set(args.data.resolve()).items():
        with tempfile.TemporaryDirectory() as tmp:
            out["runs"][name] = fingerprint(overrides, Path(tmp))
        print(f"{name}: {len(out['runs'][name]['tensors'])} tensors", file=sys.stderr)
    args.out.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
