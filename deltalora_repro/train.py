"""The training loop: short and explicit; everything method-specific happens in the method's hooks.

Hot path rules (see README "Speed"): no .item() or other host synchronisation per step (the
running loss stays on the device and is read only every `log_every` steps), batches padded to
buckets so few shapes occur, and the Delta-LoRA update runs for all layers in one hook call.

Two ways to run a step, chosen by `train.cuda_graph`:
- plain: forward, backward, AdamW, scheduler and the method's hooks, launched kernel by kernel.
  This is the reference.
- graph (CUDA only): the whole optimizer step (forward, backward, gradient clipping, AdamW and
  zeroing the gradients) is recorded once per batch shape as one CUDA graph and replayed, so a
  step costs one launch instead of thousands. At the paper's batch sizes the plain step is bound
  by those launches (README "Speed"). The same kernels run on the same data in the same order;
  AdamW runs in its capturable form (step count and learning rate live on the device).
  tests/test_fast_path.py compares both paths step by step.

On top of the graph path, `train.compile=blocks` (the default `auto` picks it whenever the graph
path is taken) compiles each repeated transformer block, so the recorded step runs inductor's
fused kernels; evaluation and decoding run those blocks eagerly (`Trainer.eager`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf
from transformers import get_linear_schedule_with_warmup

from .errors import ConfigError
from .methods import Method
from .progress import Board, bar
from .tasks.base import Task

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss (or the state about to be checkpointed) became inf or NaN."""

    def __init__(self, first_step: int, last_step: int, what: str = "the loss became non-finite"):
        self.first_step, self.last_step = first_step, last_step
        window = (f"at optimizer step {last_step}" if first_step == last_step else
                  f"between optimizer steps {first_step} and {last_step}")
        super().__init__(f"training diverged: {what} {window}")


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM: the run stopped at a step boundary (after writing a checkpoint)."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"interrupted by {signal.Signals(signum).name} at optimizer step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum          # the shell's convention: 130 SIGINT, 143 SIGTERM


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases or LayerNorm weights (the usual convention)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def total_steps(cfg: Any, n_examples: int) -> int:
    """Optimizer steps of the run: one per `batch_size` examples (the last batch may be short)."""
    per_epoch = math.ceil(n_examples / cfg.batch_size)
    total = per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ConfigError(f"train.precision {precision!r}; valid: fp32, bf16")


class Trainer:
    """Holds the run's mutable state so that it can be checkpointed and resumed exactly."""

    def __init__(self, model, method: Method, task: Task, cfg: Any, device: torch.device,
                 seed: int, n_total_steps: int):
        self.model, self.method, self.task, self.cfg, self.device = model, method, task, cfg, device
        if cfg.batch_size % cfg.grad_accum:
            raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by "
                              f"train.grad_accum {cfg.grad_accum}")
        self.micro_batch = cfg.batch_size // cfg.grad_accum
        self.total_steps = n_total_steps
        fused = device.type == "cuda"
        self.use_graphs = graph_path(cfg, device, method)
        if compile_scope(cfg) == "auto":
            # Compiled blocks inside the recorded step is the fastest GPU path measured (README
            # "Speed"); without graphs (CPU, DyLoRA, AdaLoRA, grad_accum > 1) nothing is compiled.
            resolved = "blocks" if self.use_graphs else False
            log.info("train.compile=auto: %s", "blocks" if resolved else "false (no CUDA-graph step)")
            cfg = self.cfg = OmegaConf.merge(cfg, {"compile": resolved})
        if self.use_graphs:
            # Capturable AdamW: the step count and the learning rate are device tensors, so the
            # recorded step reads their current values (the scheduler fills the lr tensor in place).
            opt_kwargs = {"fused": True, "capturable": True}
            lr = torch.tensor(float(cfg.lr), device=device)
        else:
            opt_kwargs = {"fused": True} if fused else {"foreach": True}
            lr = cfg.lr
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8,
            **opt_kwargs)
        self._graphs: dict[tuple, _StepGraph] = {}
        self._graph_phase = None
        self._graph_pool = None
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(
            cfg.warmup_ratio * n_total_steps)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, n_total_steps)
        # Fast path (train.compile): forward + backward through torch.compile. Batches are padded
        # to buckets, so with mode=reduce-overhead each bucket gets one CUDA graph. The plain path
        # stays the reference; tests/test_fast_path.py checks both give the same numbers.
        self.loss_fn = task.loss
        scope = compile_scope(cfg)
        mode = cfg.compile_mode if cfg.compile_backend == "inductor" else None
        options = dict(cfg.get("compile_options") or {}) or None
        if options and mode:
            raise ConfigError("train.compile_mode and train.compile_options cannot both be set "
                              "(torch.compile takes one or the other)")
        if scope == "model":
            self.loss_fn = torch.compile(task.loss, backend=cfg.compile_backend, mode=mode,
                                         dynamic=cfg.compile_dynamic, options=options)
        elif scope == "blocks":
            # Regional compilation: each repeated block (a transformer layer) is compiled, once
            # for all layers of its class, and the rest stays eager. Compiles in a fraction of the
            # whole model's time and fuses what costs most at small batches: the many small
            # elementwise kernels (norms, casts, bias, activation, residuals, LoRA scaling) of
            # every layer, forward and backward. Under train.cuda_graph the compiled kernels are
            # recorded in the step graph like any others.
            n = compile_blocks(model, backend=cfg.compile_backend, mode=mode,
                               dynamic=cfg.compile_dynamic, options=options)
            log.info("train.compile=blocks: compiled %d repeated blocks", n)
        # The data order depends on the seed alone and is restored on resume: each epoch's
        # permutation is drawn from the generator state at the epoch's start (kept, so that a
        # mid-epoch resume draws the same permutation and skips the steps already done).
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_generator_state = self.generator.get_state()
        self.step = 0          # optimizer steps done
        self.epoch = 0         # epochs done
        self.position = 0      # optimizer steps done in the current epoch
        self.evals: list[dict] = []
        # Divergence: every step folds "this loss (and gradient norm) is not finite" into one
        # device flag, read only where the loop synchronises anyway (log points, checkpoints,
        # epoch ends), so the step stays free of host syncs and legal inside a CUDA graph.
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.checked_step = 0  # the flag was last read (and clear) after this step
        # Set by a SIGINT/SIGTERM handler (signal number); acted on at the next step boundary.
        self.stop_signal: int | None = None
        self.in_loop = False

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resume needs, nested; checkpoint.save splits it into JSON + safetensors."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "epoch_generator": self.epoch_generator_state,
                "generator": self.generator.get_state(),
                "method": self.method.state_dict(), "step": self.step, "epoch": self.epoch,
                "position": self.position, "evals": self.evals,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def load_state_dict(self, state: dict) -> None:
        own = self.model.state_dict()
        theirs = state["model"]
        missing, extra = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
        shapes = sorted(k for k in set(own) & set(theirs) if own[k].shape != theirs[k].shape)
        if missing or extra or shapes:
            # The config check normally catches another model or method first; this is the
            # backstop for a checkpoint whose tensors do not fit this model.
            first = (missing or extra or shapes)[0]
            raise ConfigError(
                f"resume: the checkpoint's model tensors do not fit this model ({len(missing)} "
                f"missing, {len(extra)} unexpected, {len(shapes)} of another shape; first: "
                f"{first}): a checkpoint of another model or method?")
        self.model.load_state_dict(theirs)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for group in self.optimizer.param_groups:
            if self.use_graphs:
                # A checkpoint may come from the plain path (lr a float) or another device; the
                # recorded steps must read the lr from a device tensor that the scheduler updates.
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
            elif isinstance(group["lr"], torch.Tensor):
                group["lr"] = float(group["lr"])        # a graph-path checkpoint on the plain path
        as_tensor = (lambda v: torch.as_tensor(float(v), device=self.device)) if self.use_graphs \
            else float
        self.scheduler.base_lrs = [as_tensor(v) for v in self.scheduler.base_lrs]
        self.scheduler._last_lr = [as_tensor(v) for v in self.scheduler._last_lr]
        self.epoch_generator_state = state["epoch_generator"]
        self.generator.set_state(state["generator"])
        self.method.load_state_dict(state["method"])
        self.step, self.epoch, self.evals = state["step"], state["epoch"], state["evals"]
        self.position = state["position"]
        self.checked_step = self.step
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    # -- the loop ------------------------------------------------------------------------------------
    def step_batches(self, examples: list[dict], skip: int = 0):
        """One list of micro-batches per optimizer step, in a seeded random order, from step
        `skip` of the epoch on (a mid-epoch resume: same permutation, done steps not collated)."""
        order = torch.randperm(len(examples), generator=self.generator).tolist()
        for i in range(skip * self.cfg.batch_size, len(order), self.cfg.batch_size):
            chunk = order[i:i + self.cfg.batch_size]
            yield [self.task.collate([examples[j] for j in chunk[k:k + self.micro_batch]])
                   for k in range(0, len(chunk), self.micro_batch)]

    def train_step(self, micro_batches: list[dict]) -> torch.Tensor:
        """One optimizer step; returns the loss as a device tensor (never read here: no sync)."""
        if self.use_graphs:
            return self._graph_step(micro_batches)
        cfg, model, device = self.cfg, self.model, self.device
        self.method.on_step_start(self.step)
        total = torch.zeros((), device=device)
        for batch in micro_batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(device, cfg.precision):
                loss = self.loss_fn(model, batch)
                extra = self.method.extra_loss(model)
                if extra is not None:
                    loss = loss + extra
            (loss / len(micro_batches)).backward()
            total += loss.detach() / len(micro_batches)
        self._fold_nonfinite(total)
        if cfg.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm, foreach=True)
            self._fold_nonfinite(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.method.after_optimizer_step(self.step)   # e.g. Delta-LoRA's W update
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _fold_nonfinite(self, value: torch.Tensor) -> None:
        """flag |= not finite(value), on the device and in place: no sync, capturable."""
        torch.logical_or(self.nonfinite, ~torch.isfinite(value.detach()), out=self.nonfinite)

    def check_finite(self) -> None:
        """Read the divergence flag (a host sync: only at log points, checkpoints, epoch ends and
        stops); raise TrainingDiverged naming the steps since the last clear reading."""
        if self.step == self.checked_step:
            return
        if bool(self.nonfinite):
            raise TrainingDiverged(self.checked_step + 1, self.step)
        self.checked_step = self.step

    # -- the graph path ---------------------------------------------------------------------------
    def _step_body(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward, backward, clip, AdamW, zero grads: what one CUDA graph records."""
        with autocast(self.device, self.cfg.precision):
            loss = self.loss_fn(self.model, batch)
            extra = self.method.extra_loss(self.model)
            if extra is not None:
                loss = loss + extra
        loss.backward()
        self._fold_nonfinite(loss.detach())
        if self.cfg.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm, foreach=True)
            self._fold_nonfinite(norm)
        self.optimizer.step()
        # Inside the graph, so that the gradients live only during a replay and every shape's
        # graph can share one memory pool.
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _graph_step(self, micro_batches: list[dict]) -> torch.Tensor:
        (batch,) = micro_batches          # graph_path() guarantees grad_accum == 1
        self.method.on_step_start(self.step)
        phase = self.method.graph_phase()
        if phase != self._graph_phase:
            # The method's step changed (Delta-LoRA's deferred sum began): record anew.
            self._graphs.clear()
            self._graph_phase = phase
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(batch)
        for k, v in batch.items():
            entry.inputs[k].copy_(v.pin_memory(), non_blocking=True)
        entry.graph.replay()
        self.scheduler.step()
        self.step += 1
        self.method.after_optimizer_step(self.step)
        return entry.loss.clone()

    def _snapshot(self) -> tuple:
        params = [p.detach().clone() for p in self.params]
        state = {p: {k: v.clone() for k, v in self.optimizer.state[p].items()}
                 for p in self.params if p in self.optimizer.state}
        return (params, state, torch.get_rng_state(), torch.cuda.get_rng_state(self.device),
                self.nonfinite.clone())

    @torch.no_grad()
    def _restore(self, snap: tuple) -> None:
        params, state, cpu_rng, cuda_rng, nonfinite = snap
        self.nonfinite.copy_(nonfinite)
        torch._foreach_copy_(self.params, params)
        for p in self.params:
            for k, v in self.optimizer.state.get(p, {}).items():
                # AdamW's fresh state is all zeros (step, exp_avg, exp_avg_sq).
                v.copy_(state[p][k]) if p in state else v.zero_()
        torch.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state(cuda_rng, self.device)

    def _capture(self, batch: dict[str, torch.Tensor]) -> "_StepGraph":
        """Record one step for this batch shape. Two warm-up steps on a side stream initialise
        what is created lazily (cuBLAS workspaces, AdamW state, autograd streams); everything they
        change (parameters, optimizer state, random state) is restored before recording, so the
        run's numbers do not depend on when shapes are first seen."""
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        snap = self._snapshot()
        side = self._side                 # one stream for every capture: one cuBLAS workspace
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step_body(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._restore(snap)
        graph = torch.cuda.CUDAGraph()
        # Compiled blocks were compiled for this shape by the warm-up; a recompilation here would
        # run inside the capture, which CUDA refuses with an unhelpful error. Fail clearly instead.
        no_recompile = (torch.compiler.set_stance("fail_on_recompile")
                        if compile_scope(self.cfg) == "blocks" else contextlib.nullcontext())
        with no_recompile, torch.cuda.graph(graph, pool=self._graph_pool, stream=side):
            loss = self._step_body(inputs)
        log.info("recorded a CUDA graph for batch shape %s (%d so far)",
                 {k: tuple(v.shape) for k, v in batch.items()}, len(self._graphs) + 1)
        return _StepGraph(graph, inputs, loss)

    def eager(self):
        """Run compiled blocks as plain eager code: evaluation and decoding. Their shapes (eval
        batches, one-token decode steps with a KV cache) are not the training step's, would only
        pile up recompilations (dynamo stops at its recompile limit and warns), and gain little."""
        if compile_scope(self.cfg) in ("blocks", "model"):
            return torch.compiler.set_stance("force_eager")
        return contextlib.nullcontext()

    def evaluate(self) -> dict:
        self.model.eval()
        results = {}
        with self.eager():
            for suffix, setting in self.method.eval_settings():
                setting()
                metrics = self.task.evaluate(self.model, self.device, self.cfg.eval_batch_size)
                results.update({(f"{suffix}/{k}" if suffix else k): v for k, v in metrics.items()})
        self.model.train()
        return results

    def start(self) -> None:
        """Set-up that needs the model on its device (idempotent)."""
        if not getattr(self, "_started", False):
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            graphs = None
            if self.use_graphs:
                self._side = torch.cuda.Stream(self.device)
                self._graph_pool = torch.cuda.graph_pool_handle()
                graphs = (self._side, self._graph_pool)
            self.method.on_train_start(self.device, self.cfg, graphs)
            self._started = True

    def fit(self, save: Callable[["Trainer"], None] | None = None,
            log_dir: Path | None = None) -> None:
        """Train to the end. `save(trainer)` writes a checkpoint: every `train.checkpoint_every`
        optimizer steps and at every epoch end when `train.checkpoint` is on, and always when a
        SIGINT/SIGTERM has asked to stop (then TrainingInterrupted is raised). The divergence
        flag is read first each time, so a checkpoint is never written after a non-finite loss.
        `log_dir`: where the TensorBoard log goes (None: none is written); it is closed on the
        way out, whatever ends the run."""
        cfg = self.cfg
        examples = self.task.train_examples()
        per_epoch = math.ceil(len(examples) / cfg.batch_size)
        periodic = save if cfg.get("checkpoint", True) else None
        every = cfg.get("checkpoint_every")
        self.start()
        self.model.train()
        running = torch.zeros((), device=self.device)
        t_log, n_log, tokens = time.perf_counter(), 0, 0
        # On resume, what the interrupted run logged after its checkpoint is dropped; the
        # checkpoint's own step (its loss and evaluation) was logged before it was written.
        board = Board(log_dir, purge_step=self.step + 1 if self.step else None)
        steps_bar = bar(total=self.total_steps, initial=self.step, desc="train", unit="step")
        self.in_loop = True
        try:
            while self.epoch < cfg.epochs and self.step < self.total_steps:
                if self.position:
                    self.generator.set_state(self.epoch_generator_state)   # mid-epoch resume
                else:
                    self.epoch_generator_state = self.generator.get_state()
                for micro_batches in self.step_batches(examples, skip=self.position):
                    tokens += batch_tokens(micro_batches)
                    running += self.train_step(micro_batches)
                    self.position += 1
                    n_log += 1
                    steps_bar.update(1)           # a host counter: no device read
                    if self.step % cfg.log_every == 0:
                        # The only host synchronisation of a plain step, once every log_every.
                        self.check_finite()
                        dt = time.perf_counter() - t_log
                        loss = (running / n_log).item()
                        lr = float(self.scheduler.get_last_lr()[0])   # a device tensor on the graph path
                        log.info("step %d/%d epoch %d loss %.4f lr %.2e %.1f ms/step", self.step,
                                 self.total_steps, self.epoch + 1, loss, lr, 1000 * dt / n_log)
                        steps_bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                              tok_s=f"{tokens / dt:.0f}")
                        board.scalars({"loss": loss, "lr": lr, "tokens_per_s": tokens / dt},
                                      self.step, "train")
                        running.zero_()
                        t_log, n_log, tokens = time.perf_counter(), 0, 0
                    self._stop_if_asked(save)
                    ends_epoch = self.position >= per_epoch or self.step >= self.total_steps
                    # An epoch end checkpoints right after its evaluation: not twice.
                    if periodic and every and self.step % every == 0 and not ends_epoch:
                        self.check_finite()
                        periodic(self)
                    if self.step >= self.total_steps:
                        break
                self.check_finite()
                self.epoch += 1
                self.position = 0
                self.epoch_generator_state = self.generator.get_state()
                metrics = self.evaluate()
                self.evals.append({"epoch": self.epoch, "step": self.step, **metrics})
                log.info("epoch %d step %d eval %s", self.epoch, self.step,
                         {k: round(v, 4) for k, v in metrics.items()})
                board.scalars(metrics, self.step, "eval")
                board.flush()                     # an epoch's curves on disk before the next one
                if periodic:
                    periodic(self)
                self._stop_if_asked(save, saved=periodic is not None)
        finally:
            self.in_loop = False
            steps_bar.close()
            board.close()
        self.method.on_train_end()

    def _stop_if_asked(self, save, saved: bool = False) -> None:
        if self.stop_signal is None:
            return
        self.check_finite()
        if save is not None and not saved:
            save(self)
        raise TrainingInterrupted(self.stop_signal, self.step)

    @contextlib.contextmanager
    def stop_on_signals(self, signals=(signal.SIGINT, signal.SIGTERM)):
        """SIGINT/SIGTERM (a scheduler's notice before preemption) during training ask the loop
        to stop at the next step boundary, checkpoint and raise TrainingInterrupted; outside the
        loop (evaluation after training, test decoding), or at a second signal, it is raised at
        once. Installed only in the main thread (Python delivers signals there alone)."""
        import threading
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.in_loop and self.stop_signal is None:
                self.stop_signal = signum
                log.warning("%s: stopping after this optimizer step, with a checkpoint "
                            "(send it again to stop at once)", signal.Signals(signum).name)
                return
            raise TrainingInterrupted(signum, self.step)

        previous = {s: signal.signal(s, handler) for s in signals}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def batch_tokens(micro_batches: list[dict]) -> int:
    """Tokens of one optimizer step (padding excluded), for tokens/s. Read from the collated
    batches while they are still host tensors: counting costs no device synchronisation."""
    n = 0
    for batch in micro_batches:
        mask = batch.get("attention_mask")
        n += int(mask.numpy().sum()) if mask is not None else batch["input_ids"].numel()
    return n


class _StepGraph:
    """One recorded optimizer step: the graph, its static input buffers and its loss output."""

    def __init__(self, graph, inputs: dict[str, torch.Tensor], loss: torch.Tensor):
        self.graph, self.inputs, self.loss = graph, inputs, loss


def graph_path(cfg: Any, device: torch.device, method: Method) -> bool:
    """Whether this run takes the CUDA-graph path (train.cuda_graph: auto | true | false).

    auto takes it whenever it applies and says so in the log; true demands it and names what
    stands in the way; false keeps the plain path."""
    choice = cfg.get("cuda_graph", False)
    if choice not in (True, False, "auto"):
        raise ConfigError(f"train.cuda_graph {choice!r}; valid: auto, true, false")
    if choice is False:
        return False
    reasons = []
    if device.type != "cuda":
        reasons.append(f"it needs a CUDA device (this run uses {device.type})")
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


COMPILE_CHOICES = ("auto", "false", "true", "model", "blocks")


def compile_scope(cfg: Any) -> str | None:
    """train.compile: false | true (= model: the whole loss function) | blocks (each repeated
    transformer block) | auto (blocks when the step is recorded as a CUDA graph, else false;
    resolved by the Trainer, which writes the outcome back into its config). Returns None,
    "model", "blocks" or "auto"."""
    choice = cfg.get("compile", False)
    key = str(choice).lower() if isinstance(choice, (bool, str)) else None
    if key not in COMPILE_CHOICES:
        raise ConfigError(f"train.compile {choice!r}; valid: {', '.join(COMPILE_CHOICES)}")
    return {"false": None, "true": "model", "model": "model", "blocks": "blocks", "auto": "auto"}[key]


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


def graph_safe_methods() -> list[str]:
    from .methods.base import METHODS
    return [n for n, m in METHODS.items() if m.graph_safe]
