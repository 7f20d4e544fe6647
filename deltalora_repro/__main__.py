"""python -m deltalora_repro [model=...] [task=...] [method=...] [any.override=...] [-m for sweeps]

(the same as `deltalora train ...`)"""
import difflib
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from . import records
from .config import CONFIG_DIR  # the Hydra config groups ship inside the package: an installed copy runs anywhere
from .errors import ConfigError, DataError
from .sweep import write_job_file

log = logging.getLogger("deltalora_repro")


# Config groups chosen on the command line (`group=name`); names may have sub-folders
# (task=glue/rte, experiment=table4/lora), which Hydra's own error does not list.
GROUPS = ("model", "task", "method", "train", "experiment", "launch")
# Exit codes: 2 bad input, 3 training diverged (non-finite loss), 128 + signal number when
# interrupted (130 SIGINT, 143 SIGTERM).
DIVERGED_EXIT = 3


def group_choices(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """Every config of a group, sub-folders included, as `name` or `sub/name`."""
    root = config_dir / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


# Dictionaries passed on as they are (a model's config, Hugging Face config overrides, inductor
# options, a task's local split): any key below these is accepted.
FREE_FORM = ("model.config", "task.model_overrides", "train.compile_options", "task.local_split")


def _paths(node: Any, prefix: str) -> set[str]:
    out = {prefix} if prefix else set()
    if isinstance(node, dict):
        for key, value in node.items():
            out |= _paths(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def known_keys(config_dir: Path = CONFIG_DIR) -> set[str]:
    """Every dotted key any config file sets, placed where Hydra places it (its group, or the
    package its `# @package` line names: the root for `_global_`, `train` or `method` for the
    paper's per-task values in paper/)."""
    keys: set[str] = set()
    for path in config_dir.rglob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        data = {k: v for k, v in data.items() if k not in ("defaults", "hydra")}
        group = path.relative_to(config_dir).parts[0] if path.parent != config_dir else ""
        header = re.search(r"^# @package (\S+)", text, re.MULTILINE)
        package = header.group(1) if header else group
        prefix = "" if package == "_global_" else package
        keys |= _paths(data, prefix)
    return keys


def check_keys(argv: list[str], config_dir: Path = CONFIG_DIR) -> str | None:
    """A message for the first `key=value` / `+key=value` naming no key of any config file
    (a typo such as `+method.rnak=4` would otherwise be added silently), or None."""
    keys = None
    for arg in argv:
        key, sep, _ = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or key.startswith("hydra") or key in GROUPS or "/" in key:
            continue
        if any(key == f or key.startswith(f + ".") for f in FREE_FORM):
            continue
        keys = keys if keys is not None else known_keys(config_dir)
        if key not in keys:
            near = difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else ""
            return (f"unknown config key {key!r}{hint} (keys come from the files in "
                    f"{config_dir}; free-form dictionaries: {', '.join(FREE_FORM)})")
    return None


def check_group_choices(argv: list[str], config_dir: Path = CONFIG_DIR) -> str | None:
    """A message naming the valid choices for the first unknown `group=name`, or None.

    Checked before Hydra composes anything. Sweep lists (`task=glue/rte,glue/mrpc`) are checked
    item by item; Hydra's sweep functions (`choice(...)`, `glob(...)`) are left to Hydra."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in GROUPS or "(" in value or value in ("", "null"):
            continue
        valid = group_choices(key, config_dir)
        for name in value.split(","):
            if name not in valid:
                near = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean {key}={near[0]}?)" if near else ""
                return f"{key}={name} is not a config{hint}; valid: {', '.join(valid)}"
    return None


_ABSENT = object()


def check_experiment_sweep(argv: list[str], config_dir: Path = CONFIG_DIR) -> str | None:
    """A message when a multirun sweeps over several experiment configs and sets a key of a group
    (`task.score=false`) that the experiments choose but the command line does not name, and that
    the group's default config lacks, or None.

    Hydra composes a multirun's shared settings without the swept values, so such a key would
    meet the default group instead and fail with a message about appending (`+task.score`)."""
    if not {"-m", "--multirun"} & set(argv):
        return None
    values = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep:
            values.setdefault(key.lstrip("+~"), value)
    swept = values.get("experiment", "")
    if "," not in swept and "(" not in swept:
        return None
    defaults_cfg = None
    for arg in argv:
        raw = arg.partition("=")[0]
        key = raw.lstrip("+~")
        group = key.split(".", 1)[0]
        if raw.startswith("++") or "." not in key or group not in ("model", "task", "method") \
                or group in values:
            continue                 # `++key=`: adds or sets, so the shared composition takes it
        if defaults_cfg is None:
            from omegaconf import OmegaConf

            from .config import compose
            defaults_cfg = OmegaConf.to_container(compose(), resolve=False)
        node: Any = defaults_cfg
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) and part in node else _ABSENT
        if node is not _ABSENT:
            continue                 # the default group has the key too (even null): it composes
        chosen = set()
        for name in swept.split(","):
            path = config_dir / "experiment" / f"{name}.yaml"
            defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults", []) \
                if path.is_file() else []
            chosen |= {v for d in defaults if isinstance(d, dict)
                       for k, v in d.items() if k == f"override /{group}"}
        hint = (f"add {group}={chosen.pop()}" if len(chosen) == 1 else
                f"name the {group} (the experiments choose {', '.join(sorted(chosen))}; sweep "
                f"them as separate commands)" if chosen else f"name the {group}")
        return (f"{key}=... in a sweep over experiment={swept}: Hydra composes the sweep's shared "
                f"settings without the swept experiments, so {key} would meet the default "
                f"{group}; {hint}")
    return None


def _remove_unused_run_folder(hydra_dir: Path) -> None:
    """Hydra's run folder when it holds nothing but Hydra's own files (its .hydra folder and the
    log); a folder with anything else in it (a run's files) is never touched."""
    if not hydra_dir.is_dir():
        return
    if all(p.name == ".hydra" or p.suffix == ".log" for p in hydra_dir.iterdir()):
        shutil.rmtree(hydra_dir)
        stop = Path.cwd().resolve()
        for parent in hydra_dir.resolve().parents:          # the folders above, if now empty
            if parent == stop or stop not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break


# An absolute path: Hydra reads it as a folder however the module was imported (`python -m`, or
# the `deltalora` command, where a relative path would make it look for a Python package).
@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    with open_dict(cfg):
        if not cfg.output_dir:
            cfg.output_dir = hc.runtime.output_dir
            cfg.run_id = records.run_id_in(Path(hc.runtime.output_dir).name)
        cfg.experiment_name = hc.runtime.choices.get("experiment")
    multirun = hc.mode == RunMode.MULTIRUN
    job = {"job": hc.job.num if multirun else None, "overrides": " ".join(hc.overrides.task)}
    # torch and transformers load only once the arguments are checked
    from .run import run
    from .train import TrainingDiverged, TrainingInterrupted
    try:
        record = run(cfg)
    except TrainingInterrupted as e:
        # Asked to stop (a scheduler's SIGTERM, Ctrl-C): a checkpoint and a record with status
        # interrupted are written; the shell's exit code for the signal, also in a sweep.
        print(f"error: {e}; resume with resume={cfg.output_dir}", file=sys.stderr)
        if e.handler is not None:
            # The handler that was there before the run, now that the checkpoint and the record
            # are written: under submitit (launch=slurm) it requeues the job, which continues from
            # the checkpoint (resume=auto).
            e.handler(e.signum, None)
        sys.exit(e.exit_code)
    except Exception as e:
        if multirun:
            # In a sweep one failed job must not stop the others: report it and go on (a job that
            # failed in training has its record written with status failed); the sweep's summary
            # (sweep.SweepSummary) reads the job file and makes the sweep's exit status non-zero.
            log.error("job %s failed: %s: %s", hc.job.num, type(e).__name__, e)
            print(f"error: job {hc.job.num} failed: {e}", file=sys.stderr)
            status = ("bad-input" if isinstance(e, (ConfigError, DataError)) else
                      "diverged" if isinstance(e, TrainingDiverged) else "failed")
            write_job_file(cfg.output_dir, {**job, "status": status,
                                            "error": f"{type(e).__name__}: {e}"})
            return None
        if isinstance(e, TrainingDiverged):
            # Recorded with status diverged; the last good checkpoint is kept.
            print(f"error: {e}", file=sys.stderr)
            sys.exit(DIVERGED_EXIT)
        if isinstance(e, (ConfigError, DataError)):
            # Bad input: a clear message and a non-zero exit, no traceback, and no trace on disk:
            # the run folder Hydra made for this run holds only its own files, so it goes.
            print(f"error: {e}", file=sys.stderr)
            _remove_unused_run_folder(Path(hc.runtime.output_dir))
            sys.exit(2)
        raise
    if "metrics" not in record:
        # Another process of a data-parallel run: the main one records and reports the run; the
        # folder Hydra made for this process holds only Hydra's files.
        _remove_unused_run_folder(Path(hc.runtime.output_dir))
        return None
    primary = record["metrics"]["primary"]
    best = record["metrics"]["best"]
    log.info("best %s = %.4f (epoch %d)", primary, best[primary], best["epoch"])
    if multirun:
        write_job_file(cfg.output_dir, {**job, "status": record["status"], "metric_name": primary,
                                        "metric": best[primary], "record": record.get("record_file")})
    return best[primary]


def entry() -> None:
    """The command line (`python -m deltalora_repro`, `deltalora train`): config names and keys
    are checked before Hydra composes anything (and before torch loads); Hydra reads sys.argv."""
    problem = (check_group_choices(sys.argv[1:]) or check_keys(sys.argv[1:])
               or check_experiment_sweep(sys.argv[1:]))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    entry()
