"""The GPU fast path, resolved once per run: CUDA-graph steps and compiled blocks.

At the paper's batch sizes a training step is bound by kernel launches, not arithmetic (README
"Speed"). Two things remove them, both chosen here from `train.cuda_graph` and `train.compile`
and handed as one plain `FastPath` object to the training loop and to the method:

- graph: the whole optimizer step (forward, backward, gradient clipping, AdamW, zeroing the
  gradients) is recorded once per batch shape as one CUDA graph and replayed (`GraphSteps`). The
  same kernels run on the same data in the same order as the plain step; AdamW runs in its
  capturable form (step count and learning rate live on the device).
- compiled blocks: each repeated transformer block is compiled (regional compilation), so the
  recorded step runs inductor's fused kernels. Evaluation and decoding run them eagerly.

The plain step (train.py) stays the reference; tests/test_fast_path.py compares the two.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

COMPILE_CHOICES = ("auto", "false", "true", "model", "blocks")


def compile_scope(cfg: Any) -> str | None:
    """train.compile: false | true (= model: the whole loss function) | blocks (each repeated
    transformer block) | auto (blocks when the step is recorded as a CUDA graph, else false;
    settled by `resolve`). Returns None, "model", "blocks" or "auto"."""
    choice = cfg.get("compile", False)
    key = str(choice).lower() if isinstance(choice, (bool, str)) else None
    if key not in COMPILE_CHOICES:
        raise ConfigError(f"train.compile {choice!r}; valid: {', '.join(COMPILE_CHOICES)}")
    return {"false": None, "true": "model", "model": "model", "blocks": "blocks", "auto": "auto"}[key]


def graph_safe_methods() -> list[str]:
    from .methods.base import METHODS
    return [n for n, m in METHODS.items() if m.graph_safe]


def graph_path(cfg: Any, device: torch.device, method: Any) -> bool:
    """Whether this run takes the CUDA-graph step (train.cuda_graph: auto | true | false).

    auto takes it whenever it applies and says so in the log; true demands it and names what
    stands in the way; false keeps the plain step."""
    choice = cfg.get("cuda_graph", False)
    if choice not in (True, False, "auto"):
        raise ConfigError(f"train.cuda_graph {choice!r}; valid: auto, true, false")
    if choice is False:
        return False
    reasons = []
    if device.type != "cuda":
        reasons.append(f"it needs a CUDA device (this run uses {device.type})")
    if cfg.get("fsdp", False):
        reasons.append("train.fsdp=true: the recorded step would not hold FSDP's all-gathers "
                       "and reduce-scatters")
    if cfg.grad_accum != 1:
        reasons.append(f"it records whole steps of one micro-batch (train.grad_accum={cfg.grad_accum})")
    if not method.graph_safe:
        reasons.append(f"method {method.name!r} changes the computation from step to step on the "
                       "host (graph-safe methods: " + ", ".join(sorted(graph_safe_methods())) + ")")
    scope = compile_scope(cfg)
    if scope == "model":
        reasons.append("train.compile=true compiles the whole step's forward (use "
                       "train.compile=blocks with CUDA graphs)")
    if scope in ("blocks", "auto") and \
            cfg.get("compile_mode") not in (None, "default", "max-autotune-no-cudagraphs"):
        reasons.append(f"train.compile_mode={cfg.compile_mode} records CUDA graphs of its own "
                       "(valid with CUDA graphs: null, default, max-autotune-no-cudagraphs)")
    if reasons:
        if choice is True:
            raise ConfigError("train.cuda_graph=true cannot be used: " + "; ".join(reasons))
        log.info("plain step (train.cuda_graph=auto): %s", "; ".join(reasons))
        return False
    log.info("CUDA-graph step: one graph per batch shape (train.cuda_graph=%s)", choice)
    return True


@dataclass(frozen=True)
class FastPath:
    """What the run's step does beyond the plain reference, settled before training starts."""

    cuda_graph: bool = False           # the optimizer step is recorded and replayed
    compile: str | None = None         # None | "model" (the loss function) | "blocks"
    graph_update: bool = False         # Delta-LoRA's explicit W update as one CUDA graph
    fsdp: bool = False                 # train.fsdp: parameters sharded (sharding.py)
    backend: str = "inductor"
    mode: str | None = None
    dynamic: bool | None = None
    options: dict | None = None

    def describe(self) -> dict:
        return {"cuda_graph": self.cuda_graph, "compile": self.compile, "fsdp": self.fsdp}

    def wrap_loss(self, loss_fn: Callable, model: torch.nn.Module) -> Callable:
        """The loss function the step calls: compiled whole (compile=model), or as it is with
        the model's repeated blocks compiled in place (compile=blocks), or untouched."""
        if self.compile == "model":
            return torch.compile(loss_fn, backend=self.backend, mode=self.mode,
                                 dynamic=self.dynamic, options=self.options)
        if self.compile == "blocks":
            # Each repeated block (a transformer layer) is compiled, once for all layers of its
            # class; the rest stays eager. Compiles in a fraction of the whole model's time and
            # fuses what costs most at small batches: the many small elementwise kernels (norms,
            # casts, bias, activation, residuals, LoRA scaling) of every layer, both directions.
            n = compile_blocks(model, self.backend, self.mode, self.dynamic, self.options)
            log.info("train.compile=blocks: compiled %d repeated blocks", n)
        return loss_fn

    def eager(self):
        """Run compiled code as plain eager code: evaluation and decoding. Their shapes (eval
        batches, one-token decode steps with a KV cache) are not the training step's, would only
        pile up recompilations (dynamo stops at its recompile limit and warns), and gain little."""
        if self.compile in ("blocks", "model"):
            return torch.compiler.set_stance("force_eager")
        return contextlib.nullcontext()


def resolve(cfg: Any, device: torch.device, method: Any) -> FastPath:
    """The run's FastPath from its train config, device and method (errors name the keys)."""
    graphs = graph_path(cfg, device, method)
    scope = compile_scope(cfg)
    if scope == "auto":
        # Compiled blocks inside the recorded step is the fastest GPU path measured (README
        # "Speed"); without graphs (CPU, DyLoRA, AdaLoRA, grad_accum > 1) nothing is compiled.
        scope = "blocks" if graphs else None
        log.info("train.compile=auto: %s", scope or "false (no CUDA-graph step)")
    fsdp = bool(cfg.get("fsdp", False))
    if fsdp and scope is not None:
        # sharding.check_config refuses an explicit choice before anything loads.
        raise ConfigError(f"train.fsdp=true cannot be used with train.compile={scope}")
    backend = cfg.get("compile_backend", "inductor")
    mode = cfg.get("compile_mode") if backend == "inductor" else None
    options = dict(cfg.get("compile_options") or {}) or None
    if options and mode:
        raise ConfigError("train.compile_mode and train.compile_options cannot both be set "
                          "(torch.compile takes one or the other)")
    return FastPath(cuda_graph=graphs, compile=scope, fsdp=fsdp,
                    graph_update=device.type == "cuda" and bool(cfg.get("graph_update", True))
                    and not fsdp,
                    backend=backend, mode=mode, dynamic=cfg.get("compile_dynamic"), options=options)


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The elements of every ModuleList of two or more modules of one class (transformer layers:
    GPT-2's `h`, Llama's `layers`, BERT's `layer`, BART's encoder and decoder `layers`),
    outermost lists only."""
    blocks, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 and \
                len({type(m) for m in module}) == 1:
            blocks.extend(module)
            inside.add(name)
    return blocks


def compile_blocks(model: torch.nn.Module, backend: str, mode: str | None, dynamic,
                   options: dict | None = None) -> int:
    blocks = repeated_blocks(model)
    if not blocks:
        raise ConfigError(f"train.compile=blocks: {type(model).__name__} has no repeated blocks "
                          "(no ModuleList of same-class layers); use train.compile=true")
    for block in blocks:
        block.compile(backend=backend, mode=mode, dynamic=dynamic, options=options)
    return len(blocks)


class _StepGraph:
    """One recorded optimizer step: the graph, its static input buffers and its loss output."""

    def __init__(self, graph, inputs: dict[str, torch.Tensor], loss: torch.Tensor,
                 weight: torch.Tensor | None = None):
        self.graph, self.inputs, self.loss, self.weight = graph, inputs, loss, weight


class GraphSteps:
    """Optimizer steps recorded as CUDA graphs, one per batch shape, and replayed.

    `loop` is the training loop: `body(batch)` runs one whole step (what a graph records);
    `params`, `optimizer` and `nonfinite` are what a warm-up changes and `_capture` restores."""

    def __init__(self, loop: Any, fast: FastPath):
        self.loop, self.fast = loop, fast
        self.device = loop.device
        self.stream = torch.cuda.Stream(self.device)   # one stream for every capture: one cuBLAS workspace
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple, _StepGraph] = {}
        self._phase = None

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, micro_batches: list[dict]) -> torch.Tensor:
        """One recorded step (recorded first if its shape or the method's phase is new).

        Several processes: each one's step holds a gradient all-reduce, so all must record at
        the same steps (a warm-up's all-reduce against a replay's would not pair up). They key
        their graphs by the whole step's shape in every process (StepBatches.key, the same in
        all), so a shape new to one is new to all; the share of the loss is a graph input."""
        (batch,) = micro_batches          # graph_path() guarantees grad_accum == 1
        phase = self.loop.method.graph_phase()
        if phase != self._phase:
            # The method's step changed (Delta-LoRA's deferred sum began): record anew.
            self._graphs.clear()
            self._phase = phase
        key = getattr(micro_batches, "key", None) or \
            tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))
        weights = getattr(micro_batches, "weights", None)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(batch, weighted=weights is not None)
        for k, v in batch.items():
            entry.inputs[k].copy_(v.pin_memory(), non_blocking=True)
        if entry.weight is not None:
            entry.weight.copy_(torch.tensor(weights[0], dtype=torch.float32).pin_memory(),
                               non_blocking=True)
        entry.graph.replay()
        return entry.loss.clone()

    def _snapshot(self) -> tuple:
        loop = self.loop
        params = [p.detach().clone() for p in loop.params]
        state = {p: {k: v.clone() for k, v in loop.optimizer.state[p].items()}
                 for p in loop.params if p in loop.optimizer.state}
        return (params, state, torch.get_rng_state(), torch.cuda.get_rng_state(self.device),
                loop.nonfinite.clone())

    @torch.no_grad()
    def _restore(self, snap: tuple) -> None:
        loop = self.loop
        params, state, cpu_rng, cuda_rng, nonfinite = snap
        loop.nonfinite.copy_(nonfinite)
        torch._foreach_copy_(loop.params, params)
        for p in loop.params:
            for k, v in loop.optimizer.state.get(p, {}).items():
                # AdamW's fresh state is all zeros (step, exp_avg, exp_avg_sq).
                v.copy_(state[p][k]) if p in state else v.zero_()
        torch.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state(cuda_rng, self.device)

    def _capture(self, batch: dict[str, torch.Tensor], weighted: bool = False) -> _StepGraph:
        """Record one step for this batch shape. Two warm-up steps on a side stream initialise
        what is created lazily (cuBLAS workspaces, AdamW state, autograd streams); everything they
        change (parameters, optimizer state, random state) is restored before recording, so the
        run's numbers do not depend on when shapes are first seen."""
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        # The step's share of the global batch's loss, read by the graph at each replay.
        weight = torch.ones((), device=self.device) if weighted else None
        args = (inputs,) if weight is None else (inputs, weight)
        snap = self._snapshot()
        side = self.stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.loop.body(*args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._restore(snap)
        graph = torch.cuda.CUDAGraph()
        # Compiled blocks were compiled for this shape by the warm-up; a recompilation here would
        # run inside the capture, which CUDA refuses with an unhelpful error. Fail clearly instead.
        no_recompile = (torch.compiler.set_stance("fail_on_recompile")
                        if self.fast.compile == "blocks" else contextlib.nullcontext())
        with no_recompile, torch.cuda.graph(graph, pool=self.pool, stream=side):
            loss = self.loop.body(*args)
        log.info("recorded a CUDA graph for batch shape %s (%d so far)",
                 {k: tuple(v.shape) for k, v in batch.items()}, len(self._graphs) + 1)
        return _StepGraph(graph, inputs, loss, weight)
