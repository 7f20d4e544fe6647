"""Delta-LoRA in anyone's Hugging Face / PEFT training code, and any result as a standard PEFT adapter.

    from deltalora_repro import DeltaLoRA, DeltaLoRACallback, export_peft_adapter

    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, lora_dropout=0.0, ...))
    delta = DeltaLoRA(model, update_ratio=2.0, start_steps=500)
    Trainer(model=model, ..., callbacks=[DeltaLoRACallback(delta)]).train()
    export_peft_adapter(delta, "adapter/", base_model=untouched_base)

`DeltaLoRA` attaches the paper's update (Algorithm 1: after optimizer steps K+1..T,
W <- W + lambda * s * (B_{t+1} A_{t+1} - B_t A_t)) to the `lora.Linear` layers of a PEFT LoRA model;
`DeltaLoRACallback` calls it once per real optimizer step of a `transformers.Trainer` and puts W in
the Trainer's checkpoints; `export_peft_adapter` writes what was trained as a plain PEFT LoRA
adapter that loads onto the untouched pretrained model with `PeftModel.from_pretrained`.

Why an exported Delta-LoRA adapter can stand for the changed W: the updates telescope. After step T,
W_T = W_0 + lambda s (B_T A_T - B_K A_K), with (A_K, B_K) the factors after step K (the factors at
the start when K = 0). The trained model computes with W_T + s B_T A_T = W_0 + s B' A' for the
rank-2r factors B' = [(1 + lambda) B_T, -lambda B_K] and A' = [A_T; A_K]: a LoRA adapter of rank 2r
on the untouched W_0. That is why DeltaLoRA keeps one extra copy of the factors, the one taken
after step K (adapter-sized, next to the copy of the previous step's factors the update needs).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

DELTA_FILE = "delta_lora.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _lora_linear_class():
    from peft.tuners.lora import Linear
    return Linear


def _out_in(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """A view of W in (out, in) orientation (GPT-2's Conv1D stores it as (in, out))."""
    return weight.t() if fan_in_fan_out else weight


@dataclass
class _Site:
    """One adapted PEFT layer: its name (relative to the base model), W and the factors."""

    name: str
    layer: nn.Module
    weight: torch.Tensor          # the base layer's weight, as stored
    lora_A: torch.Tensor          # r x in
    lora_B: torch.Tensor          # out x r
    scaling: float                # the layer's own scaling[adapter] (alpha/r, or alpha/sqrt(r) for rsLoRA)
    fan_in_fan_out: bool


def _model_relative(name: str) -> str:
    """A module name inside a PeftModel, relative to the wrapped base model."""
    return name.removeprefix("base_model.model.")


def _lora_sites(peft_model: nn.Module, adapter: str | None, allow_dropout: bool,
                need_fp32: bool) -> tuple[str, list[_Site]]:
    from peft.tuners.lora import LoraLayer
    linear = _lora_linear_class()
    layers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ConfigError(
            f"{type(peft_model).__name__} has no PEFT LoRA layer: wrap the model first, e.g. "
            "peft.get_peft_model(model, peft.LoraConfig(r=..., lora_alpha=..., target_modules=[...]))")
    if adapter is None:
        active = getattr(peft_model, "active_adapter", None)
        active = active if isinstance(active, str) else getattr(layers[0][1], "active_adapters", [None])[0]
        adapter = active
    sites = []
    for name, layer in layers:
        if type(layer) is not linear:
            raise ConfigError(f"{name} is a {type(layer).__module__}.{type(layer).__name__}; Delta-LoRA "
                              "supports PEFT's LoRA on linear layers only (peft.tuners.lora.Linear, "
                              "GPT-2's Conv1D included), not AdaLoRA, DoRA's, quantised or conv layers")
        if adapter not in layer.lora_A:
            continue
        if layer.use_dora.get(adapter, False):
            raise ConfigError(f"{name}: adapter {adapter!r} uses DoRA (use_dora=True); Delta-LoRA "
                              "needs plain LoRA (use_dora=False)")
        if layer.lora_bias.get(adapter, False):
            raise ConfigError(f"{name}: adapter {adapter!r} has a bias in lora_B (lora_bias=True); "
                              "Delta-LoRA's update covers B A only: use lora_bias=False")
        if layer.merged:
            raise ConfigError(f"{name}: the adapter is merged into W; call model.unmerge_adapter() first")
        dropout = layer.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout) and dropout.p > 0 and not allow_dropout:
            # Sec. 4.2: the branch must see the undropped input so that the factors' gradient is
            # the one W would get; with dropout it is the paper's Table 5 ablation only.
            raise ConfigError(
                f"{name}: LoraConfig(lora_dropout={dropout.p}) but Delta-LoRA removes the dropout "
                "of the low-rank branch (Sec. 4.2); set lora_dropout=0.0, or pass "
                "DeltaLoRA(..., allow_dropout=True) for the 'Delta-LoRA + LoRA module' ablation")
        weight = layer.get_base_layer().weight
        if need_fp32 and weight.dtype != torch.float32:
            raise ConfigError(
                f"{name}: W is {weight.dtype}, but Delta-LoRA needs W in float32 (its small "
                "updates vanish in bf16/fp16): load the base model with dtype=torch.float32 and "
                "train in bf16 through autocast (TrainingArguments(bf16=True)), not by casting it")
        sites.append(_Site(_model_relative(name), layer, weight, layer.lora_A[adapter].weight,
                           layer.lora_B[adapter].weight, float(layer.scaling[adapter]),
                           bool(layer.fan_in_fan_out)))
    if not sites:
        raise ConfigError(f"no LoRA layer carries adapter {adapter!r}; adapters: "
                          f"{sorted(layers[0][1].lora_A.keys())}")
    return adapter, sites


class DeltaLoRA:
    """Delta-LoRA's update of W for a PEFT LoRA model: call `step()` after every optimizer step.

    `update_ratio` is lambda, `start_steps` is K: the update applies after optimizer steps
    K+1, K+2, ... from the change of B A since the previous call (steps are counted here, one per
    `step()` call). Each adapted W must be float32 and W is changed in place with one rank-2r
    GEMM per layer (B1 A1 - B0 A0 = [B1, -B0] [A1; A0]), nothing of W's size allocated. The scaling
    is the one PEFT uses for the layer (`scaling[adapter]`: alpha/r, or alpha/sqrt(r) with rsLoRA).

    State besides W (adapter-sized): the factors after the previous call, and the factors after
    step K (kept for `export_peft_adapter`, which writes the result as a rank-2r adapter).

    Data parallel (DDP, accelerate): every process calls `step()` after the same reduced optimizer
    step, with the same factors, so every process applies the same update and W stays identical
    everywhere; no communication is needed. `step()` never synchronises with the host: it can sit
    in a training step whose host-side work overlaps the device's.
    """

    def __init__(self, peft_model: nn.Module, update_ratio: float, start_steps: int,
                 allow_dropout: bool = False, adapter_name: str | None = None):
        if isinstance(update_ratio, bool) or not isinstance(update_ratio, (int, float)) or update_ratio < 0:
            raise ConfigError(f"update_ratio (lambda) must be a number >= 0, got {update_ratio!r}")
        if isinstance(start_steps, bool) or not isinstance(start_steps, int) or start_steps < 0:
            raise ConfigError(f"start_steps (K) must be an integer >= 0, got {start_steps!r}")
        self.model = peft_model
        self.update_ratio = float(update_ratio)
        self.start_steps = int(start_steps)
        self.adapter, self.sites = _lora_sites(peft_model, adapter_name, allow_dropout, need_fp32=True)
        self.steps = 0
        with torch.no_grad():
            self._prev_a = [s.lora_A.detach().clone() for s in self.sites]
            self._prev_b = [s.lora_B.detach().clone() for s in self.sites]
            # The factors after step K; with K = 0 the starting factors.
            self._k_a = [a.clone() for a in self._prev_a]
            self._k_b = [b.clone() for b in self._prev_b]

    def _follow_device(self) -> None:
        """The copies follow the factors when the model moved (e.g. Trainer put it on the GPU);
        comparing devices reads no tensor, so this costs no synchronisation."""
        if self._prev_a[0].device != self.sites[0].lora_A.device:
            for lst in (self._prev_a, self._prev_b, self._k_a, self._k_b):
                for i, (t, s) in enumerate(zip(lst, self.sites)):
                    lst[i] = t.to(s.lora_A.device)

    @torch.no_grad()
    def step(self) -> None:
        """After the optimizer step has updated A and B (and before anything else changes them)."""
        self._follow_device()
        self.steps += 1
        cur_a = [s.lora_A.detach() for s in self.sites]
        cur_b = [s.lora_B.detach() for s in self.sites]
        if self.steps > self.start_steps and self.update_ratio != 0.0:
            for s, a1, b1, a0, b0 in zip(self.sites, cur_a, cur_b, self._prev_a, self._prev_b):
                left = torch.cat([b1, -b0], 1).to(s.weight.dtype)       # out x 2r
                right = torch.cat([a1, a0], 0).to(s.weight.dtype)       # 2r x in
                coef = self.update_ratio * s.scaling
                if s.fan_in_fan_out:         # W stored (in, out): add (left @ right)^T
                    s.weight.addmm_(right.t(), left.t(), alpha=coef)
                else:
                    s.weight.addmm_(left, right, alpha=coef)
        torch._foreach_copy_(self._prev_a, cur_a)
        torch._foreach_copy_(self._prev_b, cur_b)
        if self.steps == self.start_steps:
            torch._foreach_copy_(self._k_a, cur_a)
            torch._foreach_copy_(self._k_b, cur_b)

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything an exact resume needs, as tensors (safetensors-ready): the step count, the
        settings (checked on load), both copies of the factors and the current W of every adapted
        layer (PEFT's own save writes the adapter only: W's updates would be lost)."""
        out = {"steps": torch.tensor(self.steps, dtype=torch.int64),
               "update_ratio": torch.tensor(self.update_ratio, dtype=torch.float64),
               "start_steps": torch.tensor(self.start_steps, dtype=torch.int64)}
        for i, s in enumerate(self.sites):
            out[f"W.{s.name}"] = s.weight.detach().contiguous()
            out[f"prev_A.{s.name}"] = self._prev_a[i]
            out[f"prev_B.{s.name}"] = self._prev_b[i]
            out[f"K_A.{s.name}"] = self._k_a[i]
            out[f"K_B.{s.name}"] = self._k_b[i]
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise ConfigError(f"Delta-LoRA state does not fit this model ({len(missing)} missing, "
                              f"{len(extra)} unexpected entries; first: {(missing or extra)[0]})")
        for key in ("update_ratio", "start_steps"):
            if float(state[key]) != float(own[key]):
                raise ConfigError(f"the Delta-LoRA state was written with {key}={float(state[key]):g}, "
                                  f"this DeltaLoRA has {key}={float(own[key]):g}; use the same value")
        self._follow_device()
        for i, s in enumerate(self.sites):
            s.weight.copy_(state[f"W.{s.name}"])
            self._prev_a[i].copy_(state[f"prev_A.{s.name}"])
            self._prev_b[i].copy_(state[f"prev_B.{s.name}"])
            self._k_a[i].copy_(state[f"K_A.{s.name}"])
            self._k_b[i].copy_(state[f"K_B.{s.name}"])
        self.steps = int(state["steps"])

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(path), metadata=metadata)

    def load(self, path: str | Path) -> dict[str, str]:
        """Restore from `save`'s file; returns its metadata."""
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            self.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
        return meta


def _trainer_callback_base():
    from transformers import TrainerCallback
    return TrainerCallback


class DeltaLoRACallback(_trainer_callback_base()):
    """`transformers.Trainer` callback: Delta-LoRA's update once per real optimizer step, and W in
    the Trainer's checkpoints.

    The update runs in `on_optimizer_step`, which the Trainer calls right after `optimizer.step()`
    and only at the end of a gradient-accumulation cycle (`on_step_end` comes later, after the
    gradients are cleared; either would see the new factors, this one is the optimizer step itself).
    A step the optimizer skipped (fp16 GradScaler on inf/NaN gradients: accelerate's
    `optimizer.step_was_skipped`) is not counted and does not touch W.

    Checkpoints: `on_save` writes `checkpoint-<global_step>/delta_lora.safetensors` under
    `args.output_dir` (W of every adapted layer, the factor copies, the step count), since the
    Trainer's PEFT save keeps the adapter only. `on_train_begin` of a resumed run (global_step > 0,
    restored by the Trainer from the checkpoint's trainer_state.json) reads it back from
    `args.output_dir/checkpoint-<global_step>`, or from `resume_from` when the checkpoint lives
    elsewhere; a resumed run without that file stops with an error rather than continue from the
    pretrained W.
    """

    def __init__(self, delta: DeltaLoRA, resume_from: str | Path | None = None):
        if not isinstance(delta, DeltaLoRA):
            raise ConfigError(f"DeltaLoRACallback needs a DeltaLoRA, got {type(delta).__name__}")
        self.delta = delta
        self.resume_from = resume_from
        self.skipped = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        folder = Path(self.resume_from) if self.resume_from else \
            Path(args.output_dir) / f"checkpoint-{state.global_step}"
        path = folder / DELTA_FILE
        if not path.is_file():
            raise ConfigError(
                f"resuming at global step {state.global_step}, but {path} is missing: without it W "
                "would restart from the pretrained weights; pass DeltaLoRACallback(delta, "
                "resume_from=<the checkpoint folder>) if it is not under args.output_dir")
        meta = self.delta.load(path)
        if meta.get("global_step") not in (None, str(state.global_step)):
            raise ConfigError(f"{path} was written at global step {meta['global_step']}, the Trainer "
                              f"resumes at {state.global_step}: another checkpoint's file")

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if getattr(optimizer, "step_was_skipped", False):
            self.skipped += 1        # the factors did not move: no update, no count
            return
        self.delta.step()

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        self.delta.save(folder / DELTA_FILE, metadata={"global_step": str(state.global_step)})


# -- export -------------------------------------------------------------------------------------------
@dataclass
class _Piece:
    """Rows [start, stop) of the (out x in) weight of `target` change by B @ A (scaling folded in)."""

    target: str
    out_features: int
    fan_in_fan_out: bool
    start: int
    stop: int
    B: torch.Tensor               # (stop - start) x R, float64, s folded in
    A: torch.Tensor               # R x in, float64


def _fused_target(peft_model: nn.Module, name: str) -> tuple[str, int, int] | None:
    """GPT-2's split c_attn (fused_qkv.SplitQKV): (c_attn's name, row offset, total rows) of child q/k/v."""
    from .fused_qkv import PROJECTIONS, SplitQKV
    parent_name, _, child = name.rpartition(".")
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    if not parent_name or child not in PROJECTIONS:
        return None
    parent = base.get_submodule(parent_name)
    if not isinstance(parent, SplitQKV):
        return None
    width = parent.q.get_base_layer().weight.shape[1] if hasattr(parent.q, "get_base_layer") \
        else parent.q.weight.shape[1]
    return parent_name, PROJECTIONS.index(child) * width, 3 * width


def _piece(peft_model, site: _Site, B: torch.Tensor, A: torch.Tensor) -> _Piece:
    w = _out_in(site.weight, site.fan_in_fan_out)
    fused = _fused_target(peft_model, site.name)
    if fused is None:
        return _Piece(site.name, w.shape[0], site.fan_in_fan_out, 0, w.shape[0], B, A)
    target, offset, total = fused
    return _Piece(target, total, site.fan_in_fan_out, offset, offset + w.shape[0], B, A)


def _base_weight(base_model: nn.Module, piece: _Piece) -> torch.Tensor:
    """W_0 rows of a piece from an untouched model (fused or split GPT-2 alike), (out x in)."""
    from .fused_qkv import PROJECTIONS, SplitQKV
    module = base_model.get_submodule(piece.target)
    if isinstance(module, SplitQKV):
        w = torch.cat([_out_in(getattr(module, p).weight, True) for p in PROJECTIONS], 0)
    else:
        w = _out_in(module.weight, piece.fan_in_fan_out)
    return w[piece.start:piece.stop]


def export_peft_adapter(trained: Any, out_dir: str | Path, *, base_model: nn.Module | None = None,
                        base_model_name_or_path: str | None = None, task_type: str | None = None,
                        quiet: bool = False) -> dict:
    """Write `trained` as a standard PEFT LoRA adapter directory (adapter_config.json +
    adapter_model.safetensors) that `PeftModel.from_pretrained(untouched_base, out_dir)` loads.

    `trained`: a DeltaLoRA (its model's W updated) or a PEFT LoRA model (plain LoRA: its factors
    as they are, rank r). Delta-LoRA: rank 2r per layer, B' = [(1 + lambda) B_T, -lambda B_K],
    A' = [A_T; A_K], exact when W_T - W_0 = lambda s (B_T A_T - B_K A_K), which the explicit
    updates satisfy up to their rounding. With `base_model` (the untouched pretrained model) that
    rounding is measured: `residual` = max|W_T - W_0 - lambda s (B_T A_T - B_K A_K)| /
    max|W_T - W_0| over all adapted layers (None without base_model).

    GPT-2 trained on the toolkit's split c_attn (q, k, v children; fused_qkv.split_fused_qkv)
    becomes one adapter per fused `c_attn` (fan_in_fan_out) whose B is zero on k's rows, so the
    adapter loads on a plain GPT2LMHeadModel.
    """
    if isinstance(trained, DeltaLoRA):
        delta, model = trained, trained.model
        sites = delta.sites
    else:
        delta, model = None, trained
        _, sites = _lora_sites(model, None, allow_dropout=True, need_fp32=False)
    pieces, num, den = [], 0.0, 0.0
    with torch.no_grad():
        for i, s in enumerate(sites):
            a_t, b_t = s.lora_A.detach().double(), s.lora_B.detach().double()
            if delta is None:
                B, A = b_t * s.scaling, a_t
            else:
                # Before step K+1 no update has happened yet (W_T = W_0): the plain adapter, at
                # the same rank 2r.
                lam = delta.update_ratio if delta.steps > delta.start_steps else 0.0
                a_k, b_k = delta._k_a[i].double(), delta._k_b[i].double()
                B = torch.cat([(1 + lam) * b_t, -lam * b_k], 1) * s.scaling
                A = torch.cat([a_t, a_k], 0)
                if base_model is not None:
                    p = _piece(model, s, B, A)
                    w0 = _base_weight(base_model, p).double().to(a_t.device)
                    change = _out_in(s.weight, s.fan_in_fan_out).double() - w0
                    predicted = lam * s.scaling * (b_t @ a_t - b_k @ a_k)
                    num = max(num, float((change - predicted).abs().max()))
                    den = max(den, float(change.abs().max()))
            pieces.append(_piece(model, s, B, A))
    residual = None
    if delta is not None and base_model is not None:
        residual = num / den if den > 0 else (0.0 if num == 0 else math.inf)
    peft_config = _peft_config_of(model)
    report = write_adapter(pieces, out_dir,
                           base_model_name_or_path=base_model_name_or_path or
                           getattr(peft_config, "base_model_name_or_path", None),
                           task_type=task_type or _task_type_name(getattr(peft_config, "task_type", None)),
                           scaling=sites[0].scaling)
    report.update(method="delta-lora" if delta is not None else "lora", residual=residual,
                  residual_abs=num if residual is not None else None,
                  max_weight_change=den if residual is not None else None)
    if not quiet:
        print(json.dumps({k: report[k] for k in ("out_dir", "method", "rank", "residual")}))
    return report


def _peft_config_of(model):
    configs = getattr(model, "peft_config", None) or {}
    adapter = getattr(model, "active_adapter", "default")
    return configs.get(adapter) if isinstance(adapter, str) else None


def _task_type_name(task_type) -> str | None:
    return getattr(task_type, "value", task_type)


def write_adapter(pieces: list[_Piece], out_dir: str | Path, *, base_model_name_or_path: str | None,
                  task_type: str | None, scaling: float,
                  modules_to_save: dict[str, torch.Tensor] | None = None,
                  modules_to_save_names: list[str] | None = None) -> dict:
    """Assemble per-target factors (block structure over row ranges) and write the adapter.

    Several pieces on one target (GPT-2's q and v rows of c_attn) stack their A's and place their
    B's block-diagonally on their own rows; rows no piece covers (k) stay zero. Every target gets
    the same rank (the largest; zero-padded), so one LoraConfig describes it. The pieces' B carry
    their own scaling; the adapter's is `scaling` (the trained one: lora_alpha = scaling x rank,
    use_rslora off, so PEFT computes exactly that), and B is divided by it."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    out = Path(out_dir)
    by_target: dict[str, list[_Piece]] = {}
    for p in pieces:
        by_target.setdefault(p.target, []).append(p)
    ranks = {t: sum(p.A.shape[0] for p in ps) for t, ps in by_target.items()}
    rank = max(ranks.values())
    fifo = {p.fan_in_fan_out for p in pieces}
    if len(fifo) != 1:
        raise ConfigError("adapted layers mix Linear and Conv1D weights; one adapter cannot describe both")
    tensors = {}
    for target, ps in by_target.items():
        in_features = ps[0].A.shape[1]
        A = torch.zeros(rank, in_features, dtype=torch.float64)
        B = torch.zeros(ps[0].out_features, rank, dtype=torch.float64)
        col = 0
        for p in ps:
            r = p.A.shape[0]
            A[col:col + r] = p.A.cpu()
            B[p.start:p.stop, col:col + r] = p.B.cpu() / scaling
            col += r
        prefix = f"base_model.model.{target}"
        tensors[f"{prefix}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.float().contiguous()
    for name, t in (modules_to_save or {}).items():
        tensors[f"base_model.model.{name}"] = t.detach().float().cpu().contiguous()
    config = LoraConfig(r=rank, lora_alpha=scaling * rank, lora_dropout=0.0, use_rslora=False,
                        target_modules=sorted(by_target), fan_in_fan_out=fifo.pop(), bias="none",
                        task_type=task_type, modules_to_save=modules_to_save_names or None,
                        base_model_name_or_path=base_model_name_or_path)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    size = (out / ADAPTER_WEIGHTS).stat().st_size
    return {"out_dir": str(out), "rank": rank, "targets": len(by_target), "adapter_bytes": size}
