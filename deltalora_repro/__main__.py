"""python -m deltalora_repro [model=...] [task=...] [method=...] [any.override=...] [-m for sweeps]"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from .errors import ConfigError, DataError
from .run import run

log = logging.getLogger("deltalora_repro")


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    with open_dict(cfg):
        cfg.output_dir = cfg.output_dir or hc.runtime.output_dir
        cfg.experiment_name = hc.runtime.choices.get("experiment")
    try:
        record = run(cfg)
    except Exception as e:
        if hc.mode == RunMode.MULTIRUN:
            # In a sweep one failed job must not stop the others: report it and go on (a job that
            # failed in training has its record written with status failed).
            log.error("job %s failed: %s: %s", hc.job.num, type(e).__name__, e)
            print(f"error: job {hc.job.num} failed: {e}", file=sys.stderr)
            return None
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
    main()
