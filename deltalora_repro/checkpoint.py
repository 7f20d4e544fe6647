"""Checkpoints a resume can trust: every tensor in safetensors, everything else in plain JSON.

In a run's output_dir:
  checkpoint.json                      what a resume reads first: format, step, epoch, position in
                                       the epoch, evaluations, scheduler state, the method's plain
                                       data, the run's composed config, and the name and size of
  checkpoint-<step>-<token>.safetensors  every tensor: model state (Delta-LoRA's W and snapshot
                                       buffers included), optimizer state, RNG and generator states
                                       (uint8), method tensors (AdaLoRA's importance scores).

Writing is atomic and keeps the previous good checkpoint until the new one is complete: the
tensors go to a new file (temporary name, fsync, rename), then checkpoint.json is replaced in one
rename, and only then is the previous tensors file removed. checkpoint.json therefore always names
a complete tensors file, whenever the process dies.

Loading never unpickles (a pickle can run arbitrary code): JSON and safetensors only, except for
the shard folder of a sharded run (below). The JSON
part is read and checked (format, the tensors file's size and header, the config) before the
model is built, so a wrong or damaged checkpoint is a one-line ConfigError, not a traceback.

Nested state (Trainer.state_dict()) is split generically: each tensor is replaced in the JSON by
{"__tensor__": key, "device": "cpu" | "cuda"} and stored under that key; tuples and dicts with
non-string keys (the optimizer's per-parameter state) are tagged so they come back as they were.
Written by hand because neither safetensors (tensors only) nor torch.save (pickle) does both.

Sharded runs (train.fsdp=true) keep the model and optimizer out of the safetensors file: every
process writes its shards with torch.distributed.checkpoint (DCP) into
`checkpoint-<step>-<token>.shards/`, named in checkpoint.json under "shards"
(sharding.save_checkpoint: the same order of writes, renames and removals). DCP keeps its
metadata and non-tensor values (the optimizer's param_groups) as pickles, read on resume from the
folder checkpoint.json names; no other part of a checkpoint is a pickle.
"""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import ConfigError
from .records import write_json_atomic

FORMAT = "deltalora-repro-checkpoint"
VERSION = 1
INDEX = "checkpoint.json"

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"

# Config keys a resume may change: where things are read from or written to, how often the run
# logs and checkpoints, the evaluation batch size and the device. Nothing here changes a trained
# number (evaluation batches are padded per batch, which can move metrics only by rounding).
# Every other key must equal the checkpoint's; an allowed difference is kept in the run record.
RESUME_MAY_CHANGE = (
    "resume", "output_dir", "results_dir", "data_dir", "device", "save_weights",
    "experiment_name", "train.log_every", "train.eval_batch_size", "train.checkpoint",
    "train.checkpoint_every",
)


class NonFiniteState(ValueError):
    """A tensor of the state to checkpoint holds inf or NaN (never written)."""


# -- nested state <-> (plain JSON, flat tensor dict) ----------------------------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str, seen: dict) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        # Tied weights (GPT-2's LM head is the token embedding) are stored once.
        ident = (t.device, t.dtype, t.untyped_storage().data_ptr() if t.numel() else None,
                 t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        key = seen.get(ident) if t.numel() else None
        if key is None:
            key = path
            # A copy on the CPU: safetensors refuses tensors that share memory, and the copy is
            # a consistent snapshot of the step.
            tensors[key] = t.to("cpu", copy=True).contiguous()
            if t.numel():
                seen[ident] = key
        return {_TENSOR: key, "device": t.device.type}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, f"{path}/{k}", seen) for k, v in obj.items()}
        return {_ITEMS: [[k, _encode(v, tensors, f"{path}/{k}", seen)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{path}/{i}", seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}/{i}", seen) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path or '/'}: only tensors, "
                    "dicts, lists, tuples, numbers, strings and None")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], device: torch.device) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            t = tensors[obj[_TENSOR]]
            # A tensor that lived on the GPU goes back to this run's GPU (capturable AdamW's step
            # and lr, AdaLoRA's scores); on a CPU run it stays on the CPU.
            return t.to(device) if obj.get("device") == "cuda" and device.type == "cuda" else t
        if _TUPLE in obj:
            return tuple(_decode(v, tensors, device) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {k: _decode(v, tensors, device) for k, v in obj[_ITEMS]}
        return {k: _decode(v, tensors, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors, device) for v in obj]
    return obj


def _tensor_keys(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return {obj[_TENSOR]}
        return set().union(*(_tensor_keys(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(_tensor_keys(v) for v in obj))
    return set()


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The key of the first floating tensor holding inf or NaN, or None."""
    for key, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return key
    return None


# -- writing ------------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(state: dict, directory: Path, info: dict) -> Path:
    """Write `state` (nested, tensors anywhere) plus the plain `info` (config, ...) as the
    directory's checkpoint; returns the path of checkpoint.json. Raises NonFiniteState, writing
    nothing, when a floating tensor holds inf or NaN."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    plain = _encode(state, tensors, "", {})
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise NonFiniteState(f"non-finite values in {bad.lstrip('/')}")
    name = f"checkpoint-{int(state.get('step', 0)):08d}-{secrets.token_hex(3)}.safetensors"
    tmp = directory / f".{name}.tmp"
    save_file(tensors, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / name)
    doc = {"format": FORMAT, "version": VERSION,
           "tensors": {"file": name, "bytes": (directory / name).stat().st_size},
           **info, "state": plain}
    index = directory / INDEX
    write_json_atomic(index, doc, overwrite=True)
    _fsync_dir(directory)
    # Only now is the previous checkpoint superseded.
    for old in directory.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    for old in directory.glob(".checkpoint-*.safetensors.tmp"):
        old.unlink(missing_ok=True)
    return index


# -- reading ------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    index: Path           # checkpoint.json
    tensors_path: Path
    doc: dict

    @property
    def step(self) -> int:
        return self.doc["state"]["step"]

    @property
    def config(self) -> dict:
        return self.doc["config"]

    def load_state(self, device: torch.device) -> dict:
        """The nested state for Trainer.load_state_dict (tensors from safetensors, no pickle)."""
        try:
            tensors = load_file(str(self.tensors_path))
        except Exception as e:  # safetensors' own error types; any of them means a damaged file
            raise ConfigError(f"resume: {self.tensors_path} cannot be read as safetensors "
                              f"({type(e).__name__}: {_one_line(e)})") from None
        state = _decode(self.doc["state"], tensors, device)
        if self.shards_path is not None:
            state["shards"] = str(self.shards_path)
        return state

    @property
    def shards_path(self) -> Path | None:
        """train.fsdp: the folder of every process's model and optimizer shards (written with
        torch.distributed.checkpoint; see sharding.save_checkpoint), or None."""
        shards = self.doc.get("shards")
        return self.index.parent / shards["dir"] if shards else None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def read(where: str | Path) -> Checkpoint:
    """Open a checkpoint for resuming (`where`: an output_dir or its checkpoint.json) and check
    everything that can be checked without loading the tensors: one-line ConfigErrors."""
    path = Path(where)
    index = path / INDEX if path.is_dir() else path
    if not index.is_file():
        old = (path / "checkpoint.pt") if path.is_dir() else None
        hint = (" (a checkpoint.pt from an older version is there: it is a pickle, which can run "
                "code on load, and is not read)") if old is not None and old.is_file() else ""
        raise ConfigError(f"resume={str(where)!r}: no {INDEX} there{hint}")
    try:
        doc = json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"resume: {index} is not a checkpoint of this project (not JSON: "
                          f"{_one_line(e)}); truncated or overwritten?") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"resume: {index} is not a checkpoint of this project (no "
                          f"\"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise ConfigError(f"resume: {index} has checkpoint version {doc.get('version')!r}; this "
                          f"code reads version {VERSION}")
    missing = [k for k in ("tensors", "state", "config", "precision") if k not in doc]
    if missing:
        raise ConfigError(f"resume: {index} lacks {', '.join(missing)}; truncated or edited?")
    name = str(doc["tensors"].get("file", ""))
    if not name or Path(name).name != name:
        raise ConfigError(f"resume: {index} names no tensors file in its directory ({name!r})")
    tensors_path = index.parent / name
    if not tensors_path.is_file():
        raise ConfigError(f"resume: {tensors_path} (named by {index}) does not exist")
    size, want = tensors_path.stat().st_size, doc["tensors"].get("bytes")
    if size != want:
        raise ConfigError(f"resume: {tensors_path} has {size} bytes, {index} says {want}: "
                          "truncated or overwritten")
    try:
        with safe_open(str(tensors_path), framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:  # safetensors' own error types; any of them means a damaged header
        raise ConfigError(f"resume: {tensors_path} is not a safetensors file "
                          f"({type(e).__name__}: {_one_line(e)})") from None
    absent = sorted(_tensor_keys(doc["state"]) - keys)
    if absent:
        raise ConfigError(f"resume: {tensors_path} lacks {len(absent)} tensors that {index} "
                          f"names (first: {absent[0]})")
    shards = doc.get("shards")
    if shards is not None:
        # train.fsdp: the model and optimizer are in a folder of shards beside checkpoint.json.
        name = str(shards.get("dir", "")) if isinstance(shards, dict) else ""
        if not name or Path(name).name != name:
            raise ConfigError(f"resume: {index} names no shard folder in its directory ({name!r})")
        if not (index.parent / name / ".metadata").is_file():
            raise ConfigError(f"resume: {index.parent / name} (named by {index}) is not a "
                              "complete shard folder (no .metadata)")
    return Checkpoint(index, tensors_path, doc)


# -- is this the same run? ------------------------------------------------------------------------------
def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: cfg}


def _allowed(key: str) -> bool:
    return any(key == a or key.startswith(a + ".") for a in RESUME_MAY_CHANGE)


_ABSENT = "(absent)"


def compare_configs(saved: dict, current: dict) -> tuple[list[str], dict]:
    """(refused, allowed): each differing key of two resolved configs, refused unless listed in
    RESUME_MAY_CHANGE; refused as 'key: checkpoint X, now Y', allowed as {key: {checkpoint, now}}."""
    a, b = _flatten(saved), _flatten(current)
    refused, allowed = [], {}
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if old == new and type(old) is type(new):
            continue
        if isinstance(old, (int, float)) and isinstance(new, (int, float)) and \
                not isinstance(old, bool) and not isinstance(new, bool) and old == new:
            continue                      # 1 and 1.0 from YAML are the same number
        if _allowed(key):
            allowed[key] = {"checkpoint": old, "now": new}
        else:
            refused.append(f"{key}: checkpoint {old!r}, now {new!r}")
    return refused, allowed


def check_resume_config(ckpt: Checkpoint, current: dict, precision: str) -> dict:
    """Refuse (ConfigError, every differing key with both values) a resume whose config differs
    from the checkpoint's outside RESUME_MAY_CHANGE; return the allowed differences.

    train.precision is compared as resolved (auto means bf16 on CUDA, fp32 on the CPU), since
    the device may change but the arithmetic may not."""
    saved = json.loads(json.dumps(ckpt.config))
    now = json.loads(json.dumps(current, default=str))
    saved.setdefault("train", {})["precision"] = ckpt.doc["precision"]
    now.setdefault("train", {})["precision"] = precision
    refused, allowed = compare_configs(saved, now)
    if refused:
        raise ConfigError(
            f"resume={str(ckpt.index.parent)!r} was written with another configuration; "
            f"{'; '.join(refused)}. Resume with the checkpoint's values (a resume may change "
            f"only {', '.join(RESUME_MAY_CHANGE)})")
    return allowed
