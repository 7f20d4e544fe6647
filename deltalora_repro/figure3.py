"""Figure 3: per transformer block, the cosine similarity between the fine-tuned and the pretrained
Wq and Wv, for fine-tuning, LoRA (merged: W + s B A) and Delta-LoRA (W_T + s B_T A_T), and any
other method whose run kept its weights.

    python -m deltalora_repro.figure3 --results results      # every task x model with saved runs
    python -m deltalora_repro.figure3 RUN_DIR [RUN_DIR ...] --out results/figures/figure3_e2e__gpt2-medium

`make tables` runs the first after the tables. With --results, the latest completed run of each
method, for each task x model, whose record points at saved weights goes into
RESULTS/figures/figure3_<task>__<model>.{csv,png}; runs without weights are passed over, so a
results folder with none draws nothing. A run directory is a finished run's output_dir with
`save_weights=true` (run.json and weights.safetensors). The pretrained weights are rebuilt the
way the run built them (the hub or package model, or the seeded random init of a tiny model), so
the comparison needs nothing else. Writes a CSV (one row per run x adapted weight) and a PNG (one
line per run and projection).
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

from .errors import ConfigError
from .tables import scan_records

FIELDS = ["run_id", "task", "model", "method", "module", "stack", "block", "proj", "cosine"]


def _block(module_name: str) -> tuple[str, int]:
    """(stack, block index): BART has an encoder and a decoder stack, the others one."""
    match = re.search(r"(?:^|\.)(\d+)\.", module_name)
    if match is None:
        raise ConfigError(f"no block index in module name {module_name!r}")
    stack = "decoder" if ".decoder." in f".{module_name}" else "encoder" if ".encoder." in f".{module_name}" else ""
    if "encoder_attn" in module_name:
        stack = "decoder-cross"
    return stack, int(match.group(1))


def similarities(run_dir: Path) -> list[dict]:
    """One row per adapted Wq / Wv slice of the run: cos(W_finetuned, W_pretrained)."""
    # torch and the model code load here, only when a run with weights is drawn: `make tables`
    # calls this command on every results folder, most of which hold no saved weights.
    import torch

    from .adapters import find_sites, weight_slice
    from .build import backbone
    from .export import load_trained, merge, read_run
    from .tasks import build_task

    with torch.no_grad():
        _, cfg = read_run(run_dir)
        # The pretrained model is loaded once: its Wq / Wv are kept, then the run is built on it.
        task = build_task(cfg.task, cfg.data_dir)
        pretrained = backbone(cfg, task)
        sites = find_sites(pretrained[0])
        before = [weight_slice(pretrained[0].get_submodule(s.module_name), s).float().flatten().clone()
                  for s in sites]
        model, _, record = load_trained(run_dir, task=task, model=pretrained)
        merged = merge(model)
        rows = []
        for site, w0 in zip(sites, before):
            w1 = weight_slice(merged.get_submodule(site.module_name), site).float().flatten()
            stack, block = _block(site.module_name)
            rows.append({"run_id": record["run_id"], "task": record["task"], "model": record["model"],
                         "method": record["method"], "module": site.module_name, "stack": stack,
                         "block": block, "proj": site.proj,
                         "cosine": float(torch.nn.functional.cosine_similarity(w0, w1, dim=0))})
    return rows


def write(rows: list[dict], out: Path) -> list[Path]:
    """out.csv and out.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    panels = sorted({(r["stack"], r["proj"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (stack, proj) in zip(axes[0], panels):
        for run_id in dict.fromkeys(r["run_id"] for r in rows):
            pts = sorted((r["block"], r["cosine"]) for r in rows
                         if r["run_id"] == run_id and r["stack"] == stack and r["proj"] == proj)
            if pts:
                method = next(r["method"] for r in rows if r["run_id"] == run_id)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                        label=f"{method} ({run_id[-6:]})")
        ax.set_title(f"W{proj}" + (f", {stack}" if stack else ""))
        ax.set_xlabel("block")
        ax.set_ylabel("cos(fine-tuned, pretrained)")
        ax.legend(fontsize=7)
    first = rows[0]
    fig.suptitle(f"Figure 3: {first['task']}, {first['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    return [out.with_suffix(".csv"), out.with_suffix(".png")]


def runs_with_weights(results_dir: Path) -> dict[tuple[str, str], list[Path]]:
    """Completed runs whose saved weights still exist, by (task, model); one per method: the
    latest run at the paper's settings (a protocol run, no departing learning rate, alpha or
    other method setting: reproduction.departures) if there is one, else the latest run."""
    from .reproduction import departures
    from .tables import exclusion_reasons
    found: dict[tuple[str, str], dict[str, tuple[tuple[bool, str], Path]]] = {}
    # The tables' reader: the same records count, and a broken file is passed over (the tables
    # command names it) rather than stopping the figure.
    for record in scan_records(results_dir).completed:
        weights = Path((record.get("weights") or {}).get("path", ""))
        if not weights.is_file():
            continue
        rank = (not exclusion_reasons(record) and not departures(record), record["run_id"])
        slot = found.setdefault((record["task"], record["model"]), {})
        if record["method"] not in slot or slot[record["method"]][0] < rank:
            slot[record["method"]] = (rank, weights.parent)
    return {key: [d for _, d in sorted(v.values(), key=lambda x: x[0][1])]
            for key, v in found.items()}


def render_all(results_dir: Path) -> list[Path]:
    """Figure 3 of every task x model with saved runs under `results_dir`; the files written."""
    written = []
    for (task, model), dirs in sorted(runs_with_weights(results_dir).items()):
        rows = [row for d in dirs for row in similarities(d)]
        stem = f"figure3_{task.replace('/', '-')}__{model}"
        written += write(rows, results_dir / "figures" / stem)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deltalora_repro.figure3", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", type=Path, nargs="*", metavar="RUN_DIR",
                    help="output_dir of a finished run saved with save_weights=true")
    ap.add_argument("--out", type=Path, help="with RUN_DIRs: path stem, writes STEM.csv and STEM.png")
    ap.add_argument("--results", type=Path,
                    help="instead of RUN_DIRs: the folder holding records/; writes RESULTS/figures/")
    args = ap.parse_args(argv)
    if args.results is not None and (args.run_dirs or args.out is not None):
        print("error: give either --results RESULTS or RUN_DIR [RUN_DIR ...] --out STEM, not both",
              file=sys.stderr)
        return 2
    if args.results is None and not (args.run_dirs and args.out is not None):
        print("error: nothing to draw: give --results RESULTS (every saved run of a results "
              "folder) or RUN_DIR [RUN_DIR ...] with --out STEM", file=sys.stderr)
        return 2
    if args.results is not None and not (args.results / "records").is_dir():
        print(f"error: no run records under {args.results / 'records'} (--results names the folder "
              "holding records/, e.g. results or outputs/results)", file=sys.stderr)
        return 2
    try:
        if args.results is not None:
            written = render_all(args.results)
        else:
            written = write([row for d in args.run_dirs for row in similarities(d)], args.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    if args.results is not None and not written:
        print(f"no Figure 3: no completed run under {args.results / 'records'} "
              "has its saved weights (train with save_weights=true)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
