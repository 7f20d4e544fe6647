"""Export a finished run as a merged Hugging Face model directory (loadable with from_pretrained).

    python -m deltalora_repro.export RUN_OUTPUT_DIR EXPORT_DIR

The run's output directory holds run.json (the record, with the full config) and
weights.safetensors (only what differs from the pretrained model). The export rebuilds the
pretrained model, applies the method, loads those tensors and folds every low-rank branch into W:
for Delta-LoRA the effective weight is W_T + s * B_T A_T, where W_T already carries the updates.
GPT-2's c_attn, split into q, k, v modules for a PEFT method, is fused back: the export loads as a
plain GPT-2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from .adapters import LoRALayer, Site, weight_slice
from .build import build
from .errors import ConfigError
from .fused_qkv import fuse_qkv


def read_run(run_dir: Path) -> tuple[dict, object]:
    """(record, config) of a finished run's output directory that kept its weights."""
    record_file, weights = run_dir / "run.json", run_dir / "weights.safetensors"
    for f in (record_file, weights):
        if not f.is_file():
            raise ConfigError(f"{f} not found: pass the output directory of a finished run")
    record = json.loads(record_file.read_text())
    return record, OmegaConf.create(record["config"])


def load_trained(run_dir: Path, **build_kwargs):
    """(model with the run's weights, tokenizer, record). `build_kwargs` go to build() (Figure 3
    hands in the pretrained model it has already loaded)."""
    record, cfg = read_run(run_dir)
    built = build(cfg, data=False, total_steps=record["total_steps"], **build_kwargs)
    load_weights(built.model, run_dir / "weights.safetensors")
    return built.model, built.tokenizer, record


def load_weights(model, weights: Path) -> None:
    """Copy a run's saved tensors (what differs from the pretrained model) into `model`."""
    state = load_file(str(weights))
    missing = set(state) - set(dict(model.named_parameters()))
    if missing:
        raise ConfigError(f"{weights} has tensors this model lacks: {sorted(missing)[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


@torch.no_grad()
def merge(model):
    """Fold each low-rank branch into its W and put the plain module back."""
    if hasattr(model, "merge_and_unload"):          # PEFT (AdaLoRA)
        # GPT-2's c_attn was split into q, k, v for PEFT: fuse it back into a plain GPT-2.
        return fuse_qkv(model.merge_and_unload())
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALayer):
            continue
        for i, (start, stop) in enumerate(module.slices):
            weight_slice(module, Site(name, "", start, stop)).add_(module.merged_weight_delta(i))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deltalora_repro.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("export_dir", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.export_dir.exists() and any(args.export_dir.iterdir()):
            raise ConfigError(f"{args.export_dir} exists and is not empty; nothing was written")
        model, tok, record = load_trained(args.run_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = merge(model)
    model.save_pretrained(args.export_dir)
    tok.save_pretrained(args.export_dir)
    print(f"exported run {record['run_id']} ({record['method']} on {record['task']}) to {args.export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
