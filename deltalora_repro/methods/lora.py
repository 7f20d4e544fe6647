"""LoRA (Hu et al., 2022) and Delta-LoRA (Algorithm 1 of the paper) on Wq and Wv."""
from __future__ import annotations

import logging
import warnings

from torch import nn

from ..adapters import DeltaUpdater, inject_lora
from ..errors import ConfigError
from .base import Method, register, set_trainable


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)

log = logging.getLogger(__name__)


@register("lora")
class LoRA(Method):
    graph_safe = True

    @classmethod
    def config_checks(cls, cfg):
        return [("method.rank", cfg.get("rank"), lambda v: isinstance(v, int) and v > 0,
                 "a positive integer"),
                ("method.alpha", cfg.get("alpha"), lambda v: _number(v) and v > 0, "> 0"),
                ("method.lora_dropout", cfg.get("lora_dropout"), lambda v: _number(v) and 0 <= v < 1,
                 "in [0, 1)")]

    def apply(self, model: nn.Module, head_names: list[str]) -> nn.Module:
        set_trainable(model, prefixes=head_names)
        self.sites = inject_lora(model, self.cfg.rank, self.cfg.alpha, self.cfg.lora_dropout)
        return model


@register("delta-lora")
class DeltaLoRAMethod(LoRA):
    """LoRA plus the in-place update of the frozen W by the change of B A each optimizer step.

    W keeps requires_grad = False: it has no gradient and no optimizer state (Sec. 4.1).
    """

    def apply(self, model: nn.Module, head_names: list[str]) -> nn.Module:
        if self.cfg.lora_dropout > 0:
            # Sec. 4.2 removes the branch dropout so that dL/dW equals dL/d(sBA); keeping it is
            # only the paper's "Delta-LoRA + LoRA module" ablation (Table 5).
            warnings.warn(f"delta-lora with lora_dropout={self.cfg.lora_dropout}: this is the "
                          "Table 5 ablation, not the paper's method", stacklevel=2)
        super().apply(model, head_names)
        self.updater = DeltaUpdater(self.sites, self.cfg.update_ratio, self.cfg.start_steps)
        return model

    UPDATES = ("auto", "explicit", "deferred")

    @classmethod
    def config_checks(cls, cfg):
        return super().config_checks(cfg) + [
            ("method.update_ratio", cfg.get("update_ratio"), lambda v: _number(v) and v >= 0, ">= 0"),
            ("method.start_steps", cfg.get("start_steps"),
             lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
            ("method.update", cfg.get("update", "auto"), lambda v: v in cls.UPDATES,
             "one of " + ", ".join(cls.UPDATES))]

    def resolve_update(self, fast) -> str:
        """method.update: explicit writes W after every step (Algorithm 1 as printed); deferred
        carries the telescoped sum in the rank-3r branch and writes W once at the end (same
        function, no W traffic: adapters.LoRALayer._deferred_factors); auto = deferred when the
        transformer blocks are compiled (train.compile=blocks fuses the sum's few extra small ops)
        and the branch has no dropout, explicit otherwise."""
        choice = self.cfg.get("update", "auto")
        if choice not in self.UPDATES:
            raise ConfigError(f"method.update {choice!r}; valid: {', '.join(self.UPDATES)}")
        if getattr(fast, "fsdp", False):
            # Sharded W (train.fsdp): only the deferred form, which never writes W while training
            # and needs no per-step gather of the factors; explicit is refused.
            if choice == "explicit" or self.cfg.lora_dropout > 0:
                raise ConfigError(
                    "train.fsdp=true runs Delta-LoRA in its deferred form only (W is sharded; "
                    "the explicit per-step write would gather the factors every step): use "
                    "method.update=auto or deferred, with method.lora_dropout=0 (got "
                    f"method.update={choice}, method.lora_dropout={self.cfg.lora_dropout})")
            return "deferred"
        if choice != "auto":
            return choice
        blocks = fast.compile == "blocks"
        return "deferred" if blocks and self.cfg.lora_dropout == 0 else "explicit"

    def on_train_start(self, world, fast, graphs=None) -> None:
        mode = self._restored_mode or self.resolve_update(fast)
        if mode == "deferred":
            self.updater.use_deferred()
            self.updater.begin_if_due(0)          # K = 0: the sum starts before the first step
        elif fast.graph_update:
            self.updater.capture_cuda_graphs(*(graphs or ()))
        self.update_mode = mode

    def after_optimizer_step(self, step: int) -> None:
        self.updater.step(step)
        self._last_step = step

    _last_step = 0

    def on_train_end(self) -> None:
        self.updater.materialise()
        updates = max(0, self._last_step - self.cfg.start_steps) if self.cfg.update_ratio else 0
        log.info("delta-lora: W updated after %d of %d optimizer steps (K=%d, lambda=%s, %s)",
                 updates, self._last_step, self.cfg.start_steps, self.cfg.update_ratio,
                 self.update_mode)

    def graph_phase(self):
        return self.updater.begun

    _restored_mode: str | None = None

    def state_dict(self) -> dict:
        return {"update": self.update_mode, "begun": self.updater.begun}

    def load_state_dict(self, state: dict) -> None:
        # A run resumes in the mode it was written in: a deferred checkpoint holds W_K and the
        # snapshot, not W_t.
        restored = state.get("update") or "explicit"
        asked = self.cfg.get("update", "auto")
        if asked not in ("auto", restored):
            raise ConfigError(f"method.update={asked} but the checkpoint resumed from was written "
                              f"with method.update={restored}; resume with "
                              f"method.update={restored} (or auto)")
        self._restored_mode = restored
        self.updater.set_begun(state.get("begun", False))

    def run_warnings(self) -> list[str]:
        k, lam = self.cfg.start_steps, self.cfg.update_ratio
        if lam != 0 and k >= self.total_steps:
            # The update applies after optimizer steps K+1..T only: none here, so W never moves.
            return [f"delta-lora: method.start_steps (K={k}) >= the run's {self.total_steps} "
                    "optimizer steps, so W is never updated and this run is LoRA without branch "
                    "dropout; lower method.start_steps or train longer"]
        return []

    def extra_updated(self) -> int:
        return self.updater.numel_updated()

    def changed_base_params(self, model: nn.Module) -> list[str]:
        names = {id(p): n for n, p in model.named_parameters()}
        return sorted({names[id(layer.base.weight)] for layer, *_ in self.sites})


@register("scaled-lora")
class ScaledLoRA(DeltaLoRAMethod):
    """A control for Delta-LoRA: LoRA whose branch scaling is s before step K and s (1 + lambda)
    after it, with the constant offset -lambda s B_K A_K that keeps the function continuous at K.

    Delta-LoRA's W updates telescope, so after step K its layer computes
    W_0 + s (1 + lambda) B_t A_t - lambda s B_K A_K: exactly this function. The one difference is
    that here the factors get the gradients of that branch as it is, (1 + lambda) times those
    Delta-LoRA gives them (Algorithm 1 hands them the gradient of s B A alone). Under Adam, which
    normalises a gradient's scale, that changes little (its moments carried across K, gradient
    clipping). If this control matches Delta-LoRA, the gain comes from the branch's scale, not
    from updating W. It runs as Delta-LoRA's deferred form without its gradient rescaling; the
    offset and the extra scale are written into W at the end, so the exported model is an
    ordinary one.
    """

    UPDATES = ("auto", "deferred")

    def apply(self, model: nn.Module, head_names: list[str]) -> nn.Module:
        if self.cfg.lora_dropout > 0:
            raise ConfigError("scaled-lora needs method.lora_dropout=0 (it is Delta-LoRA's function, "
                              "whose deferred form sees the undropped input)")
        super().apply(model, head_names)
        for layer, *_ in self.sites:
            layer.deferred_grad_rescale = False
        return model

    def resolve_update(self, fast) -> str:
        super().resolve_update(fast)        # the checks (an unknown method.update, train.fsdp)
        return "deferred"
