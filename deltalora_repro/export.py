"""Export a finished run as a merged Hugging Face model directory (loadable with from_pretrained).

    python -m deltalora_repro.export RUN_OUTPUT_DIR EXPORT_DIR
    python -m deltalora_repro.export RUN_OUTPUT_DIR EXPORT_DIR --peft   # a PEFT LoRA adapter instead

The run's output directory holds run.json (the record, with the full config) and
weights.safetensors (only what differs from the pretrained model). The export rebuilds the
pretrained model, applies the method, loads those tensors and folds every low-rank branch into W:
for Delta-LoRA the effective weight is W_T + s * B_T A_T, where W_T already carries the updates.
GPT-2's c_attn, split into q, k, v modules for a PEFT method, is fused back: the export loads as a
plain GPT-2.

--peft writes a standard PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for
the untouched pretrained model instead (LoRA and Delta-LoRA runs; see `peft_adapter_of_run`).
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


PEFT_METHODS = ("lora", "delta-lora")


@torch.no_grad()
def peft_adapter_of_run(run_dir: Path, out_dir: Path) -> dict:
    """A finished LoRA or Delta-LoRA run as a PEFT LoRA adapter on its pretrained model.

    LoRA: each q/v slice's factors as they are (rank r). Delta-LoRA: the run's weights hold W_T
    but not the factors after step K (the toolkit keeps only the previous step's copy, and not in
    the saved weights), so the telescoped form B' = [(1+lambda) B_T, -lambda B_K] cannot be written
    down. The adapter must make W_0 + s B'A' equal the trained W_T + s B_T A_T, i.e. represent
    M = (W_T - W_0) + s B_T A_T = (1 + lambda) s B_T A_T - lambda s B_K A_K, of rank <= 2r: a
    truncated SVD of M (float64) at rank 2r is exact up to rounding, whatever K, lambda or update
    mode (explicit or deferred) the run used. `residual` = max|M - s B'A'| / max|W_T - W_0| over
    all slices (what the discarded singular values and the rounding leave).

    GPT-2: the q and v slices of each fused c_attn become one adapter on c_attn (B zero on k's
    rows). A classification head trained with the run is written as a PEFT module to save.
    """
    from safetensors.torch import load_file as load_tensors

    from .hf import _Piece, write_adapter
    from .models import resolve_location
    record, cfg = read_run(run_dir)
    if record["method"] not in PEFT_METHODS:
        raise ConfigError(f"--peft exports {' and '.join(PEFT_METHODS)} runs; this run is "
                          f"{record['method']!r}: export it merged (without --peft)")
    # The pretrained model (W_0) with the method's modules in place, the run's tensors read
    # beside it: one model in memory.
    built = build(cfg, data=False, total_steps=record["total_steps"])
    model = built.model
    state = load_tensors(str(run_dir / "weights.safetensors"))
    delta = record["method"] == "delta-lora"
    pieces, num, den, scaling, sigma = [], 0.0, 0.0, None, 0.0
    for name, layer in model.named_modules():
        if not isinstance(layer, LoRALayer):
            continue
        conv = not isinstance(layer.base, torch.nn.Linear)
        w0_all = layer.base.weight.t() if conv else layer.base.weight
        w_t_all = state.get(f"{name}.base.weight")
        if w_t_all is not None and conv:
            w_t_all = w_t_all.t()
        s = layer.scaling
        scaling = s if scaling is None else scaling
        for i, (start, stop) in enumerate(layer.slices):
            a = state[f"{name}.lora_A.{i}"].double()
            b = state[f"{name}.lora_B.{i}"].double()
            if not delta:
                pieces.append(_Piece(name, w0_all.shape[0], conv, start, stop, s * b, a))
                continue
            change = (w_t_all[start:stop].double() - w0_all[start:stop].double()
                      if w_t_all is not None else torch.zeros_like(b @ a))
            target = change + s * (b @ a)
            u, sv, vh = torch.linalg.svd(target, full_matrices=False)
            k = 2 * layer.rank
            root = sv[:k].sqrt()
            bp, ap = u[:, :k] * root, root[:, None] * vh[:k]
            num = max(num, float((target - bp @ ap).abs().max()))
            den = max(den, float(change.abs().max()))
            if len(sv) > k and sv[0] > 0:
                sigma = max(sigma, float(sv[k] / sv[0]))
            pieces.append(_Piece(name, w0_all.shape[0], conv, start, stop, bp, ap))
    heads = {n: t for n, t in state.items() if any(n.startswith(h) for h in built.heads)}
    # The hub id, local path or package folder it was loaded from (a tiny random-init model has none).
    base_id = resolve_location(cfg.model)[0] if cfg.model.source != "tiny" else None
    task_types = {"causal-lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "classification": "SEQ_CLS"}
    report = write_adapter(pieces, out_dir, base_model_name_or_path=base_id,
                           task_type=task_types[built.task.head], scaling=scaling,
                           modules_to_save=heads,
                           modules_to_save_names=sorted({h.rstrip(".") for h in built.heads}))
    residual = (num / den if den > 0 else 0.0) if delta else None
    report.update(method=record["method"], run_id=record["run_id"], residual=residual,
                  residual_abs=num if delta else None, max_weight_change=den if delta else None,
                  discarded_singular_value_ratio=sigma if delta else None)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deltalora_repro.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--peft", action="store_true",
                    help="write a PEFT LoRA adapter for the untouched pretrained model (LoRA and "
                         "Delta-LoRA runs) instead of a merged model")
    args = ap.parse_args(argv)
    try:
        if args.export_dir.exists() and any(args.export_dir.iterdir()):
            raise ConfigError(f"{args.export_dir} exists and is not empty; nothing was written")
        if args.peft:
            report = peft_adapter_of_run(args.run_dir, args.export_dir)
            print(json.dumps(report))
            return 0
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
