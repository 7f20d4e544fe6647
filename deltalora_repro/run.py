"""run(cfg) -> record: validate, build, train, evaluate, save, and write the run record.

Called by the command line (`python -m deltalora_repro ...`) and directly by tests and sweeps.
"""
from __future__ import annotations

import json
import logging
import resource
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from . import checkpoint, fastpath, records, sharding
from .build import build
from .errors import ConfigError, DataError
from .methods import METHODS
from .models import canonical_name
from .progress import disable_flag, progress_bars
from .train import Trainer, TrainingDiverged, TrainingInterrupted, check_batch_split
from .world import World

log = logging.getLogger(__name__)


def _positive(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _optional(ok):
    return lambda v: v is None or ok(v)


def validate(cfg: Any) -> None:
    """Every check that can fail on the config alone, before anything is loaded."""
    m, t = cfg.method, cfg.train
    if m.name not in METHODS:
        raise ConfigError(f"unknown method {m.name!r}; valid: {sorted(METHODS)}")
    checks = METHODS[m.name].config_checks(m) + [
        ("train.lr", t.lr, lambda v: v > 0, "> 0"),
        ("train.batch_size", t.batch_size, lambda v: isinstance(v, int) and v > 0, "a positive integer"),
        ("train.grad_accum", t.grad_accum, lambda v: isinstance(v, int) and v > 0, "a positive integer"),
        ("train.epochs", t.epochs, lambda v: isinstance(v, int) and v > 0, "a positive integer"),
        ("train.weight_decay", t.weight_decay, lambda v: v >= 0, ">= 0"),
        ("train.precision", t.precision, lambda v: v in ("fp32", "bf16", "auto"), "fp32, bf16 or auto"),
        ("device", cfg.device, lambda v: v == "auto" or v == "cpu" or str(v).startswith("cuda"),
         "auto, cpu or cuda[:N]"),
        ("seed", cfg.seed, _count, "an integer >= 0"),
        ("train.warmup_steps", t.warmup_steps, _optional(_count), "null or an integer >= 0"),
        ("train.warmup_ratio", t.warmup_ratio, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("train.max_grad_norm", t.max_grad_norm, _optional(lambda v: v > 0), "null or > 0"),
        ("train.max_steps", t.max_steps, _optional(_positive), "null or a positive integer"),
        ("train.eval_batch_size", t.eval_batch_size, _positive, "a positive integer"),
        ("train.log_every", t.log_every, _positive, "a positive integer"),
        ("train.checkpoint", t.checkpoint, lambda v: isinstance(v, bool), "true or false"),
        ("train.tensorboard", t.get("tensorboard", True), lambda v: isinstance(v, bool),
         "true or false"),
        ("save_weights", cfg.save_weights, lambda v: isinstance(v, bool), "true or false"),
    ]
    task = cfg.task
    for key in ("max_length", "max_source_length", "max_target_length"):
        if key in task:
            checks.append((f"task.{key}", task[key], _positive, "a positive integer"))
    for key in ("train_max_examples", "eval_max_examples", "test_max_groups", "test_max_examples"):
        if key in task:
            checks.append((f"task.{key}", task[key], _optional(_positive), "null or a positive integer"))
    if "decoding" in task:
        d = task.decoding
        checks += [("task.decoding.num_beams", d.num_beams, _positive, "a positive integer"),
                   ("task.decoding.max_new_tokens", d.max_new_tokens, _positive, "a positive integer"),
                   ("task.decoding.batch_size", d.batch_size, _positive, "a positive integer"),
                   ("task.decoding.no_repeat_ngram_size", d.no_repeat_ngram_size, _count,
                    "an integer >= 0"),
                   ("task.decoding.length_penalty", d.length_penalty,
                    lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")]
    for key, value, ok, want in checks:
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"{key} must be {want}, got {value!r}")
    fastpath.compile_scope(t)              # train.compile: a clear error before loading anything
    sharding.check_config(t)               # train.fsdp and what it cannot be combined with
    disable_flag(t.get("progress", "auto"))   # train.progress: auto | true | false
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        raise ConfigError(f"data_dir {cfg.data_dir!r} is not a directory")


def _writable(path: Path, key: str) -> None:
    """The folder (or the nearest existing parent) can take new files: checked before training,
    so that a run's record is never lost at the end for an unwritable location."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise OSError(f"{probe} is not a folder")
        # Permission bits say nothing for root or on special file systems: try it.
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}={str(path)!r} cannot be written ({exc})") from None


def check_outputs(cfg: Any, output_dir: Path, results_dir: Path) -> None:
    """Before anything loads: the output folder is this run's alone, and both folders are
    writable. A run's folder is written into again only by resume= (the run continues there)."""
    if not cfg.results_dir:
        raise ConfigError("results_dir must name a folder for the run record (default: outputs/results)")
    for key, path in (("output_dir", output_dir), ("results_dir", results_dir)):
        _writable(path, key)
    resume = resume_path(cfg, output_dir)
    resuming_here = resume is not None and Path(resume).resolve() in (
        output_dir.resolve(), (output_dir / checkpoint.INDEX).resolve())
    if resuming_here and cfg.resume == "auto" and (output_dir / "run.json").is_file() and \
            json.loads((output_dir / "run.json").read_text()).get("status") == "completed":
        raise ConfigError(f"resume=auto: the run in {str(output_dir)!r} has completed; nothing "
                          "to continue")
    taken = [name for name in ("run.json", checkpoint.INDEX, "weights.safetensors")
             if (output_dir / name).exists()]
    if taken and not resuming_here:
        raise ConfigError(f"output_dir={str(output_dir)!r} already holds a run ({', '.join(taken)}); "
                          "choose a new output_dir, or continue that run with "
                          f"resume={output_dir}")


def resume_path(cfg: Any, output_dir: Path) -> str | None:
    """What `resume` points at. `resume=auto`: the run's own output folder when it holds a
    checkpoint (a requeued cluster job continuing where it stopped), else nothing (a fresh
    start); any other value is a checkpoint to continue from."""
    if cfg.resume != "auto":
        return cfg.resume
    return str(output_dir) if (output_dir / checkpoint.INDEX).is_file() else None


def save_weights(model, method, path: Path, full: dict | None = None) -> list[str]:
    """Only what differs from the pretrained model: trained tensors and changed base tensors.
    `full`: the whole model's tensors by name, when the model's own are sharded (train.fsdp)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= set(method.changed_base_params(model))
    params = dict(model.named_parameters()) if full is None else full
    tensors = {n: params[n].detach().contiguous().cpu() for n in sorted(names)}
    save_file(tensors, str(path), metadata={"method": method.name})
    return sorted(names)


def _keep_predictions(output_dir: Path, results_dir: Path, cfg: Any, run_id: str) -> str | None:
    """Copy the decoded test outputs next to the records, so every score can be recomputed."""
    src = output_dir / "predictions.jsonl"
    if not src.is_file():
        return None
    dst = results_dir / "predictions" / cfg.task.name / cfg.model.name / cfg.method.name / f"{run_id}.jsonl"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    return str(dst.relative_to(results_dir))


def peak_memory(device: torch.device) -> dict:
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def run(cfg: Any) -> dict:
    """Train and evaluate one configuration; return the run record (also written to disk)."""
    validate(cfg)
    world = World.from_env(cfg.device)      # one process, or one of those torchrun started
    check_batch_split(cfg.train, world.size)  # before anything loads
    device = world.device
    tcfg = cfg.train
    precision = tcfg.precision if tcfg.precision != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    # Several processes make one run: the main one's folder and id (each process's Hydra made
    # its own folder; the others stay empty and go).
    output_dir = Path(world.share(str(cfg.output_dir)))
    results_dir = Path(cfg.results_dir)
    check_outputs(cfg, output_dir, results_dir)
    every = tcfg.get("checkpoint_every")
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every <= 0):
        raise ConfigError(f"train.checkpoint_every must be a positive integer (optimizer steps) "
                          f"or null (epoch ends only), got {every!r}")
    config = OmegaConf.to_container(cfg, resolve=True)
    resume_from, resume_changes = None, {}
    resume = resume_path(cfg, output_dir)
    if resume:
        # Before anything is loaded: a damaged or foreign checkpoint, or a resume that would
        # silently train with the checkpoint's settings instead of the ones asked for, stops here.
        resume_from = checkpoint.read(resume)
        resume_changes = checkpoint.check_resume_config(resume_from, config, precision)
    run_id = world.share(cfg.get("run_id") or records.new_run_id())
    record = {
        "schema": records.SCHEMA, "run_id": run_id, "status": "running",
        "task": cfg.task.name, "task_version": records.task_version(cfg.task),
        "model": cfg.model.name, "method": cfg.method.name,
        "seed": cfg.seed, "experiment": cfg.get("experiment_name"),
        "config": config,
        "precision": precision, "git": records.git_state(), "machine": records.machine(device),
        "versions": records.versions(), "command": records.command_line(),
        "output_dir": str(output_dir), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "world": world.describe(),
    }
    record_file = records.record_path(results_dir, cfg.task.name, cfg.model.name, cfg.method.name,
                                      run_id)
    record["record_file"] = str(record_file)
    t0 = time.perf_counter()
    trainer = None
    saved: dict = {}             # the last checkpoint written: {"path", "step"}
    try:
        built = build(cfg)                # missing data fails in here, before the model loads
        task, method, heads, n_total = built.task, built.method, built.heads, built.total_steps
        record["data"] = task.describe()
        record["model_overrides_applied"] = built.overrides_applied
        record["method_settings"] = method.record_fields()
        record["warnings"] = method.run_warnings()
        for warning in record["warnings"]:
            log.warning("%s", warning)
        model = built.model.to(device)
        sharded = sharding.enabled(tcfg)
        if sharded:                       # train.fsdp: each process keeps 1/N of every weight
            sharding.shard(model, world)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train_cfg = OmegaConf.merge(tcfg, {"precision": precision})
        trainer = Trainer(model, method, task, train_cfg, world, cfg.seed, n_total,
                          fastpath.resolve(train_cfg, device, method))
        if world.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            trainer.load_state_dict(resume_from.load_state(device))
            record["resumed_from"] = {"path": str(resume_from.index), "step": trainer.step,
                                      "epoch": trainer.epoch, "position": trainer.position,
                                      "config_changes": resume_changes}
            log.info("resumed from %s at step %d (epoch %d, step %d of it)", resume_from.index,
                     trainer.step, trainer.epoch + 1, trainer.position)

        def save(tr: Trainer) -> None:
            info = {"config": config, "precision": precision}
            if not world.is_main and not sharded:
                return                    # one checkpoint per run: the main process writes it
            try:
                if sharded:               # train.fsdp: every process writes its shards
                    path = sharding.save_checkpoint(tr, output_dir, info, world)
                else:
                    path = checkpoint.save(tr.state_dict(), output_dir, info)
            except checkpoint.NonFiniteState as e:
                raise TrainingDiverged(saved.get("step", 0) + 1, tr.step,
                                       f"{e} though the loss was finite,") from None
            saved.update(path=str(path), step=tr.step)
            log.info("checkpoint at step %d: %s", tr.step, path)

        record["params"] = {
            "trainable": method.trainable_numel(model),
            "head": sum(p.numel() for n, p in model.named_parameters()
                        if p.requires_grad and canonical_name(n).startswith(tuple(heads))),
            "extra_updated": method.extra_updated(),
            "total": sum(p.numel() for p in model.parameters()),
        }
        record["total_steps"] = n_total
        t_train = time.perf_counter()
        board_dir = (output_dir / "tensorboard" if tcfg.get("tensorboard", True) and world.is_main
                     else None)
        with trainer.stop_on_signals(), progress_bars(tcfg.get("progress", "auto")):
            trainer.fit(save=save, log_dir=board_dir)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            record["train_time_s"] = time.perf_counter() - t_train
            if trainer.checksums:
                record["world"]["checksums"] = trainer.checksums
            result = _evaluate_and_save(cfg, record, trainer, task, model, method, device,
                                        output_dir, results_dir, run_id, world, sharded)
        record["status"] = "completed"
        return result
    except (ConfigError, DataError):
        raise                    # bad input: nothing ran, so nothing to record
    except (TrainingDiverged, TrainingInterrupted) as e:
        diverged = isinstance(e, TrainingDiverged)
        record["status"] = "diverged" if diverged else "interrupted"
        record["error"] = str(e)
        record["last_good_checkpoint" if diverged else "checkpoint"] = saved or None
        if trainer is not None:
            record["evals"] = trainer.evals
        if diverged:
            log.error("%s; last good checkpoint: %s", e, saved.get("path", "none written"))
        else:
            log.warning("%s; resume with resume=%s", e, output_dir)
        raise
    except BaseException as e:
        record["status"] = "failed"
        record["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()
        record["traceback"] = traceback.format_exc()
        raise
    finally:
        if record["status"] != "running" and world.is_main:
            record["wall_time_s"] = time.perf_counter() - t0
            record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            record.update(peak_memory(device))
            records.write_json_atomic(record_file, record)
            output_dir.mkdir(parents=True, exist_ok=True)
            records.write_json_atomic(output_dir / "run.json", record, overwrite=True)
            log.info("record: %s", record_file)


def _evaluate_and_save(cfg, record, trainer, task, model, method, device, output_dir, results_dir,
                       run_id, world: World | None = None, sharded: bool = False) -> dict:
    """After training: the test set, the metrics and the weights, into the record."""
    record["fast_path"] = {**trainer.fast.describe(), "delta_update": method.update_mode}
    primary = task.metric
    pick = max if task.metric_mode == "max" else min
    best = pick(trainer.evals, key=lambda e: e[primary])
    method.eval_settings()[0][1]()                # the reported setting (DyLoRA: full rank)
    t_test = time.perf_counter()
    main = world is None or world.is_main
    with trainer.eager():
        # Several processes decode their shares of the test set; the main one writes and scores.
        test_metrics = task.test(model, device, output_dir if main else None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    # train.fsdp: every process gathers the full weights (a collective), the main one keeps them.
    full = sharding.full_state_dict(model) if sharded and cfg.save_weights else None
    if not main:
        return record                 # the record and the weights are the main process's
    predictions = _keep_predictions(output_dir, results_dir, cfg, run_id)
    if predictions is not None:
        record["test_time_s"] = time.perf_counter() - t_test
        record["predictions"] = predictions
    record["metrics"] = {"primary": primary, "mode": task.metric_mode, "evals": trainer.evals,
                         "best": best, "final": {**trainer.evals[-1], **test_metrics}}
    if cfg.save_weights:
        path = output_dir / "weights.safetensors"
        names = save_weights(model, method, path, full) if sharded else \
            save_weights(model, method, path)
        record["weights"] = {"path": str(path), "tensors": len(names)}
    return record
