"""One JSON record per run, with the provenance that makes every number traceable."""
from __future__ import annotations

import json
import os
import platform
import re
import secrets
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from .errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCHEMA = 1
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "omegaconf",
            "tokenizers", "safetensors", "numpy", "scipy", "scikit-learn", "sacrebleu",
            "rouge-score", "nltk", "evaluate", "deltalora-repro")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


_RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")


def run_id_in(name: str) -> str | None:
    """The run id inside a run folder's name (`<id>` or `<job>_<id>`), or None."""
    match = _RUN_ID.search(name)
    return match.group(0) if match else None


def git_state(root: Path = PROJECT_ROOT) -> dict:
    """Commit and dirty flag of the checkout the code runs from (None outside a git checkout)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    if os.environ.get("DELTALORA_COMMIT"):
        # Said by the launcher: a copy shipped to another machine may carry a stale .git.
        dirty = os.environ.get("DELTALORA_DIRTY")
        return {"commit": os.environ["DELTALORA_COMMIT"],
                "dirty": None if dirty is None else dirty == "1", "source": "environment"}
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        # A copy without .git (e.g. shipped to a GPU machine): the launcher may say the commit.
        commit = os.environ.get("DELTALORA_COMMIT")
        dirty = os.environ.get("DELTALORA_DIRTY")
        return {"commit": commit, "dirty": None if dirty is None else dirty == "1",
                "source": "environment" if commit else None}
    return {"commit": commit, "dirty": dirty}


def versions() -> dict:
    import torch   # here, not at import: the command line's checks run before torch loads
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def machine(device) -> dict:
    import torch
    info = {"hostname": platform.node(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "device": device.type}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def command_line() -> str:
    return " ".join([Path(sys.executable).name, "-m", "deltalora_repro", *sys.argv[1:]])


def write_json_atomic(path: Path, obj: dict, overwrite: bool = False) -> None:
    """Write via a temporary file and rename; refuse to replace an existing file unless asked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; records are never overwritten")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def task_version(task_cfg) -> int:
    """The task config's `version`: a positive integer that goes up whenever what the task trains
    on or how it scores changes, so that records made under different task semantics can be told
    apart. Its absence is an error rather than a guess."""
    version = task_cfg.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        name = task_cfg.get("name")
        raise ConfigError(f"task {name!r} needs task.version, a positive integer (got "
                          f"{version!r}); every task config sets one")
    return version


def record_path(results_dir: Path, task: str, model: str, method: str, run_id: str) -> Path:
    return results_dir / "records" / task / model / method / f"{run_id}.json"


# ---------------------------------------------------------------------------------------------
# Scoring procedures of the NLG tasks (metrics/e2e.py, metrics/webnlg.py)

# The metrics a procedure reports, per task.
PROCEDURE_METRICS = {
    "e2e": ("bleu", "nist", "meteor", "rouge_l", "cider"),
    "webnlg": tuple(f"{m}_{s}" for m in ("bleu", "meteor", "ter") for s in ("seen", "unseen", "all")),
}
# Scores written before the procedures had names carry none; the code that wrote them says what
# they are. E2E: the tokenised references with the Perl mteval, neither procedure ("legacy").
# WebNLG: the LoRA decode step before GenerationEval, which is the paper procedure.
UNNAMED_PROCEDURE = {"e2e": "legacy", "webnlg": "paper"}


def scores_by_procedure(task: str, metrics: dict) -> dict[str, dict]:
    """{procedure: metrics} of a run's final metrics (or a score record's `metrics`): its
    `procedures` when it names them, else its flat metrics under the name the code that wrote
    them implies. Empty for tasks without procedures or when nothing was scored."""
    if task not in PROCEDURE_METRICS:
        return {}
    if isinstance(metrics.get("procedures"), dict):
        return {name: dict(values) for name, values in metrics["procedures"].items()}
    flat = {k: metrics[k] for k in PROCEDURE_METRICS[task] if k in metrics}
    if not flat:
        return {}
    return {metrics.get("procedure") or UNNAMED_PROCEDURE[task]: flat}
