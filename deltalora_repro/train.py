"""The training loop: short and explicit; everything method-specific happens in the method's hooks,
everything GPU-specific in the fast path (fastpath.py), resolved once before the loop starts.

Hot path rules (see README "Speed"): no .item() or other host synchronisation per step (the
running loss stays on the device and is read only every `log_every` steps), batches padded to
buckets so few shapes occur, and the Delta-LoRA update runs for all layers in one hook call.

One optimizer step: `forward_backward` for each micro-batch, then `optimizer_step` (divergence
flag, clipping, AdamW); the scheduler and the method's hooks around it. On the CUDA-graph path the
same `body` (one micro-batch) is what a recorded graph replays.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import get_linear_schedule_with_warmup

from . import fastpath, sharding
from .errors import ConfigError
from .fastpath import FastPath, GraphSteps
from .methods import Method
from .progress import Board, bar
from .tasks.base import Task
from .world import World

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss (or the state about to be checkpointed) became inf or NaN."""

    def __init__(self, first_step: int, last_step: int, what: str = "the loss became non-finite"):
        self.first_step, self.last_step = first_step, last_step
        window = (f"at optimizer step {last_step}" if first_step == last_step else
                  f"between optimizer steps {first_step} and {last_step}")
        super().__init__(f"training diverged: {what} {window}")


class TrainingInterrupted(RuntimeError):
    """SIGINT, SIGTERM or SIGUSR2: the run stopped at a step boundary (after writing a
    checkpoint). `handler`: the signal's handler from before the run (a job scheduler's, such as
    submitit's requeue on SIGUSR2), for the caller to hand the signal on to once the run's
    record is written; None when there was none."""

    def __init__(self, signum: int, step: int, handler: Callable | None = None):
        self.signum, self.step, self.handler = signum, step, handler
        super().__init__(f"interrupted by {signal.Signals(signum).name} at optimizer step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum          # the shell's convention: 130 SIGINT, 143 SIGTERM


# Asks to stop with a checkpoint: Ctrl-C, a scheduler's SIGTERM, SLURM's SIGUSR2 before the time
# limit (SIGUSR2 does not exist on Windows).
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR2", None))
                     if s is not None)


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


def check_batch_split(cfg: Any, processes: int) -> None:
    """train.batch_size (the global batch) must split evenly into grad_accum micro-batches in
    each of the processes."""
    if cfg.batch_size % (cfg.grad_accum * processes):
        raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by "
                          f"train.grad_accum {cfg.grad_accum}" +
                          (f" x {processes} processes" if processes > 1 else ""))


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ConfigError(f"train.precision {precision!r}; valid: fp32, bf16")


class Trainer:
    """Holds the run's mutable state so that it can be checkpointed and resumed exactly."""

    def __init__(self, model, method: Method, task: Task, cfg: Any, world: World, seed: int,
                 n_total_steps: int, fast: FastPath | None = None):
        self.model, self.method, self.task, self.cfg, self.world = model, method, task, cfg, world
        self.device = device = world.device
        # The processes share evaluation and decoding; with a sharded model (train.fsdp) each one
        # computes all of it, since each forward needs every process (World.split).
        task.world = world if not sharding.model_is_sharded(model) else \
            dataclasses.replace(world, split=False)
        check_batch_split(cfg, world.size)
        # train.batch_size is the global batch of one optimizer step, whatever the processes.
        self.micro_batch = cfg.batch_size // world.size // cfg.grad_accum
        self.total_steps = n_total_steps
        self.fast = fast if fast is not None else fastpath.resolve(cfg, device, method)
        if self.fast.cuda_graph:
            # Capturable AdamW: the step count and the learning rate are device tensors, so the
            # recorded step reads their current values (the scheduler fills the lr tensor in place).
            opt_kwargs = {"fused": True, "capturable": True}
            lr = torch.tensor(float(cfg.lr), device=device)
        else:
            opt_kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
            lr = cfg.lr
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8,
            **opt_kwargs)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(
            cfg.warmup_ratio * n_total_steps)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, n_total_steps)
        self.loss_fn = self.fast.wrap_loss(task.loss, model)
        self.graphs: GraphSteps | None = None       # created by start() on the graph path
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
        # Several processes: a checksum of every weight at each epoch end, compared across them.
        self.checksums: list[dict] = []

    @property
    def use_graphs(self) -> bool:
        return self.fast.cuda_graph

    # -- checkpointing ---------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        """train.fsdp: the model's parameters are sharded over the processes (sharding.py)."""
        return sharding.model_is_sharded(self.model)

    def state_dict(self) -> dict:
        """Everything a resume needs, nested; checkpoint.save splits it into JSON + safetensors.
        Sharded (train.fsdp): without the model and optimizer, which every process writes as
        shards (sharding.save_checkpoint)."""
        own = {} if self.sharded else {"model": self.model.state_dict(),
                                        "optimizer": self.optimizer.state_dict()}
        return {**own, "scheduler": self.scheduler.state_dict(),
                "epoch_generator": self.epoch_generator_state,
                "generator": self.generator.get_state(),
                "method": self.method.state_dict(), "step": self.step, "epoch": self.epoch,
                "position": self.position, "evals": self.evals,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def load_state_dict(self, state: dict) -> None:
        if self.sharded:
            # train.fsdp: every process reads its shards of the model and optimizer.
            if "shards" not in state:
                raise ConfigError("resume: train.fsdp=true but the checkpoint holds no shard "
                                  "folder (written without FSDP?)")
            sharding.load_checkpoint(self.model, self.optimizer, Path(state["shards"]))
        else:
            self._load_model_and_optimizer(state)
        self._load_rest(state)

    def _load_model_and_optimizer(self, state: dict) -> None:
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

    def _load_rest(self, state: dict) -> None:
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
        """This process's micro-batches of each optimizer step, in a seeded random order (the
        same in every process), from step `skip` of the epoch on (a mid-epoch resume: same
        permutation, done steps not collated). Each process takes its contiguous share of the
        step's global batch; each micro-batch carries its weight in the step's loss: its loss
        units (examples, or target tokens) over the whole global batch's, so that any split over
        micro-batches and processes gives the gradient of the global batch's mean loss."""
        order = torch.randperm(len(examples), generator=self.generator).tolist()
        rank, size, micro = self.world.rank, self.world.size, self.micro_batch
        for i in range(skip * self.cfg.batch_size, len(order), self.cfg.batch_size):
            chunk = order[i:i + self.cfg.batch_size]
            # Even shares (a short last batch too), so no process idles while others work.
            bounds = [r * len(chunk) // size for r in range(size + 1)]
            lo, hi = bounds[rank], bounds[rank + 1]
            if size == 1:
                step = StepBatches(self.task.collate([examples[j] for j in chunk[a:a + micro]])
                                   for a in range(0, len(chunk), micro))
            else:
                # The whole global batch is collated (padded to its bucket) and each process
                # takes its rows: every process's batches then have the same padded length, so
                # their steps have the same shapes. The CUDA-graph step needs that (its recorded
                # gradient all-reduce must pair up across processes), and equal shapes make
                # equal work. Padding a row further changes none of its real positions.
                whole = self.task.collate([examples[j] for j in chunk])
                step = StepBatches({k: v[a:min(a + micro, hi)] for k, v in whole.items()}
                                   for a in range(lo, hi, micro))
                # What every process's step looks like, known to all of them: a CUDA-graph step
                # is recorded by all at once, when this changes (GraphSteps).
                step.key = (tuple(bounds), tuple((k, tuple(v.shape[1:])) for k, v in
                                                 sorted(whole.items())))
            if size > 1 or len(step) > 1:
                units = [self.task.loss_units(examples[j]) for j in chunk]
                total = sum(units)
                step.weights = [sum(units[a:min(a + micro, hi)]) / total
                                for a in range(lo, hi, micro)]
            yield step

    def forward_backward(self, batch: dict[str, torch.Tensor], weight: float = 1.0) -> torch.Tensor:
        """The task's loss plus the method's extra term, and the backward of it times `weight`
        (the micro-batch's share of the step's global batch); returns weight x loss, detached."""
        with autocast(self.device, self.cfg.precision):
            loss = self.loss_fn(self.model, batch)
            extra = self.method.extra_loss(self.model)
            if extra is not None:
                loss = loss + extra
        if isinstance(weight, torch.Tensor) or weight != 1.0:   # a tensor: the graph step's input
            loss = loss * weight
        loss.backward()
        return loss.detach()

    def reduce(self, loss: torch.Tensor) -> None:
        """Several processes: sum every trainable gradient and the step's loss over them, as one
        flat all-reduce (the weights made each process's part a share of the global mean)."""
        if self.world.size == 1:
            return
        # train.fsdp: FSDP has already summed the sharded parameters' gradients (reduce-scatter).
        params = sharding.unsharded(self.params)
        for p in params:
            if p.grad is None:            # a parameter this process's batch did not reach
                p.grad = torch.zeros_like(p)
        self.world.all_reduce_sum_([p.grad for p in params] + [loss])

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Fold the step's loss (and gradient norm) into the divergence flag, clip, AdamW."""
        self._fold_nonfinite(loss)
        if self.cfg.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm, foreach=True)
            self._fold_nonfinite(sharding.full(norm))   # train.fsdp: the norm is a DTensor
        self.optimizer.step()

    def body(self, batch: dict[str, torch.Tensor], weight: torch.Tensor | float = 1.0) -> torch.Tensor:
        """One whole step of one micro-batch, gradients cleared at its end: what a CUDA graph
        records (clearing inside the graph keeps gradients alive only during a replay, so every
        shape's graph can share one memory pool). `weight`: this process's share of the global
        batch's loss (several processes; a device tensor that the graph reads)."""
        loss = self.forward_backward(batch, weight)
        self.reduce(loss)
        self.optimizer_step(loss)
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def train_step(self, micro_batches: list[dict]) -> torch.Tensor:
        """One optimizer step; returns the loss as a device tensor (never read here: no sync)."""
        self.method.on_step_start(self.step)
        if self.graphs is not None:
            loss = self.graphs.run(micro_batches)
        else:
            n = len(micro_batches)
            weights = getattr(micro_batches, "weights", None)
            if weights is None:
                weights = [1.0 / n] * n
            loss = torch.zeros((), device=self.device)
            for batch, weight in zip(micro_batches, weights):
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                loss += self.forward_backward(batch, weight)
            self.reduce(loss)
            self.optimizer_step(loss)
        self.scheduler.step()
        self.step += 1
        self.method.after_optimizer_step(self.step)   # e.g. Delta-LoRA's W update
        if self.graphs is None:
            self.optimizer.zero_grad(set_to_none=True)
        return loss

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

    def eager(self):
        """Compiled code runs eagerly inside (evaluation, decoding): FastPath.eager."""
        return self.fast.eager()

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
            # Every process starts from the main one's weights (they agree already when built
            # from the same seed; this makes it a guarantee).
            # (train.fsdp: sharded parameters are skipped; each process holds its own shard of
            # the same seeded init.)
            self.world.broadcast_([p.data for p in sharding.unsharded(list(self.model.parameters()))])
            if self.fast.cuda_graph:
                self.graphs = GraphSteps(self, self.fast)
            graphs = (self.graphs.stream, self.graphs.pool) if self.graphs is not None else None
            self.method.on_train_start(self.world, self.fast, graphs)
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
                    self._stop_if_asked(save, boundary=self.step % cfg.log_every == 0)
                    ends_epoch = self.position >= per_epoch or self.step >= self.total_steps
                    # An epoch end checkpoints right after its evaluation: not twice.
                    if periodic and every and self.step % every == 0 and not ends_epoch:
                        self.check_finite()
                        periodic(self)
                    if self.step >= self.total_steps:
                        break
                self.check_finite()
                self.check_same_weights()
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

    def _stop_if_asked(self, save, saved: bool = False, boundary: bool = True) -> None:
        signum = self.stop_signal
        if self.world.size > 1:
            # Every process must stop after the same step: they agree at log points and epoch
            # ends only (a host synchronisation, which the hot path does not pay every step).
            if not boundary:
                return
            signum = next((s for s in self.world.gather(self.stop_signal) if s), None)
        if signum is None:
            return
        self.check_finite()
        if save is not None and not saved:
            save(self)
        raise TrainingInterrupted(signum, self.step, self._handed_on.get(signum))

    def check_same_weights(self) -> None:
        """Several processes: every weight (Delta-LoRA's W included) must be the same in all of
        them after an epoch; a checksum of each process's weights is compared and recorded."""
        if self.world.size == 1:
            return
        if self.sharded:
            sums = self.world.gather(sharding.checksum(self.model, self.device))
            self._record_checksums(sums)
            return
        with torch.no_grad():
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for i, p in enumerate(self.model.parameters()):
                # Position-weighted, so that swapped or offset values change the sum.
                flat = p.detach().reshape(-1).double()
                total += (flat * torch.arange(1, flat.numel() + 1, device=flat.device,
                                              dtype=torch.float64)).sum() * (i + 1)
            sums = self.world.gather(float(total))
        self._record_checksums(sums)

    def _record_checksums(self, sums: list[float]) -> None:
        self.checksums.append({"epoch": self.epoch + 1, "step": self.step, "checksums": sums,
                               "equal": len(set(sums)) == 1})
        if len(set(sums)) != 1:
            raise RuntimeError(f"the processes' weights differ after epoch {self.epoch + 1} "
                               f"(checksums {sums}): data-parallel training went out of step")

    _handed_on: dict = {}

    @contextlib.contextmanager
    def stop_on_signals(self, signals=STOP_SIGNALS):
        """SIGINT/SIGTERM (a scheduler's notice before preemption) and SIGUSR2 (SLURM's notice
        before the time limit, as submitit asks for it) during training ask the loop to stop at
        the next step boundary, checkpoint and raise TrainingInterrupted; outside the loop
        (evaluation after training, test decoding), or at a second signal, it is raised at once.
        A handler that was there before (submitit's requeue) is not lost: it rides on the
        exception, to be called once the run's record is written. Installed only in the main
        thread (Python delivers signals there alone)."""
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
            raise TrainingInterrupted(signum, self.step, self._handed_on.get(signum))

        previous = {s: signal.signal(s, handler) for s in signals}
        self._handed_on = {s: h for s, h in previous.items() if callable(h) and
                           h not in (signal.default_int_handler,)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


class StepBatches(list):
    """One optimizer step's micro-batches (collated) and, when they are not equal shares of one
    process's whole batch, each one's weight in the step's loss. `key` (several processes): the
    shape of the whole step in every process, the same in all of them."""

    weights: list[float] | None = None
    key: tuple | None = None


def batch_tokens(micro_batches: list[dict]) -> int:
    """Tokens of one optimizer step (padding excluded), for tokens/s. Read from the collated
    batches while they are still host tensors: counting costs no device synchronisation."""
    n = 0
    for batch in micro_batches:
        mask = batch.get("attention_mask")
        n += int(mask.numpy().sum()) if mask is not None else batch["input_ids"].numel()
    return n
