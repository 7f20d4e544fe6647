"""What the training loop needs from a task, and the registry of task families."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError, DataError
from ..families import family_spec


class Task:
    """A task family: loads its splits, builds batches, computes its loss and its metrics."""

    head = "classification"       # which model head: classification | causal-lm | seq2seq
    metric = ""                   # primary per-epoch metric key, selects the best epoch
    metric_mode = "max"           # "max" (accuracy) or "min" (validation loss)

    def __init__(self, cfg: Any, data_dir: str | None):
        self.cfg = cfg
        self.data_dir = data_dir

    def load(self) -> None:
        """Read every split this run needs (before the model is loaded: fail early)."""
        raise NotImplementedError

    def model_kwargs(self) -> dict:
        """num_labels / problem_type for the head."""
        return {}

    def prepare(self, tokenizer) -> None:
        raise NotImplementedError

    def train_examples(self) -> list[dict]:
        raise NotImplementedError

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model, device, batch_size: int) -> dict[str, float]:
        raise NotImplementedError

    def test(self, model, device, output_dir) -> dict:
        """After training: the task's final evaluation (decoding + official scores for NLG)."""
        return {}

    def describe(self) -> dict:
        """Provenance of the data, for the run record."""
        return {}


def padding_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """The padding mask to hand a bidirectional encoder (BERT, RoBERTa, BART's encoder and
    cross-attention): for SDPA attention a ready 4-D boolean mask (batch, 1, 1, length), which
    Hugging Face uses as it is. Given the 2-D mask it first checks on the host whether any position
    is padded (to drop the mask when none is): a device-to-host read in every forward, which a
    recorded CUDA-graph step cannot contain. The attention computed is the same. A causal model
    keeps the 2-D mask: a 4-D mask would replace its causal mask. Which kind a model gets is its
    family's entry (families.py); a model of no family is an error, not a silent 2-D mask.
    """
    if (family_spec(model).padding_mask == "4d-bool"
            and getattr(model.config, "_attn_implementation", None) == "sdpa"):
        return mask[:, None, None, :].bool()
    return mask


def pad_to(length: int, multiple: int) -> int:
    """Round a batch's length up to a bucket, so that few distinct shapes occur."""
    return length if multiple <= 1 else -(-length // multiple) * multiple


def build_task(cfg: Any, data_dir: str | None) -> Task:
    from .glue import GlueTask
    from .nlg import E2ETask, WebNLGTask
    from .xsum import XSumTask
    families = {"glue": GlueTask, "e2e": E2ETask, "webnlg": WebNLGTask, "xsum": XSumTask}
    if cfg.family not in families:
        raise ConfigError(f"task family {cfg.family!r} is not available; valid: {sorted(families)}")
    return families[cfg.family](cfg, data_dir)


def load_hub_dataset(name: str, *args: Any, local_hint: str, **kwargs: Any):
    """`datasets.load_dataset(name, *args)`, with an unreachable hub (no network, not cached) as
    one clear DataError that says how to use local files instead, before any model loads."""
    from datasets import load_dataset      # slow to import; only hub users need it
    try:
        return load_dataset(name, *args, **kwargs)
    except (OSError, ValueError) as e:     # ConnectionError is an OSError
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"cannot load {name} from the Hugging Face hub ({type(e).__name__}: "
                        f"{first}); offline, {local_hint}") from None
