"""python -m deltalora_repro [model=...] [task=...] [method=...] [any.override=...] [-m for sweeps]"""
import difflib
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from .errors import ConfigError, DataError
from .run import run
from .train import TrainingDiverged, TrainingInterrupted

log = logging.getLogger("deltalora_repro")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Config groups chosen on the command line (`group=name`); names may have sub-folders
# (task=glue/rte, experiment=table4/lora), which Hydra's own error does not list.
GROUPS = ("model", "task", "method", "train", "experiment")
# Exit codes: 2 bad input, 3 training diverged (non-finite loss), 128 + signal number when
# interrupted (130 SIGINT, 143 SIGTERM).
DIVERGED_EXIT = 3


def group_choices(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """Every config of a group, sub-folders included, as `name` or `sub/name`."""
    root = config_dir / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


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


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    with open_dict(cfg):
        cfg.output_dir = cfg.output_dir or hc.runtime.output_dir
        cfg.experiment_name = hc.runtime.choices.get("experiment")
    try:
        record = run(cfg)
    except TrainingInterrupted as e:
        # Asked to stop (a scheduler's SIGTERM, Ctrl-C): a checkpoint and a record with status
        # interrupted are written; the shell's exit code for the signal, also in a sweep.
        print(f"error: {e}; resume with resume={cfg.output_dir}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:
        if hc.mode == RunMode.MULTIRUN:
            # In a sweep one failed job must not stop the others: report it and go on (a job that
            # failed in training has its record written with status failed).
            log.error("job %s failed: %s: %s", hc.job.num, type(e).__name__, e)
            print(f"error: job {hc.job.num} failed: {e}", file=sys.stderr)
            return None
        if isinstance(e, TrainingDiverged):
            # Recorded with status diverged; the last good checkpoint is kept.
            print(f"error: {e}", file=sys.stderr)
            sys.exit(DIVERGED_EXIT)
        if isinstance(e, (ConfigError, DataError)):
            # Bad input: a clear message and a non-zero exit, no traceback.
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
    best = record["metrics"]["best"]
    log.info("best %s = %.4f (epoch %d)", record["metrics"]["primary"],
             best[record["metrics"]["primary"]], best["epoch"])
    return best[record["metrics"]["primary"]]


if __name__ == "__main__":
    problem = check_group_choices(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
