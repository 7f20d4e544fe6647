"""What the training loop needs from a task, the registry of task families, and the helpers
their batches, validation losses and test outputs share."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import DataError
from ..families import family_spec
from ..progress import bar
from ..registry import Registry


class Task:
    """A task family: loads its splits, builds batches, computes its loss and its metrics."""

    head = "classification"       # which model head: classification | causal-lm | seq2seq
    metric = ""                   # primary per-epoch metric key, selects the best epoch
    metric_mode = "max"           # "max" (accuracy) or "min" (validation loss)

    # The processes that share evaluation and decoding (set by the Trainer; one by default).
    world = None

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
        """The encoded training examples (after prepare)."""
        return self.encoded["train"]

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss_units(self, example: dict) -> int:
        """What the task's loss averages over, counted in one encoded example: 1 for a loss
        averaged over examples, its target tokens for one averaged over tokens. The loop weights
        micro-batches by it, so that split batches (gradient accumulation, several processes)
        give the gradient of the whole batch's mean loss."""
        return 1

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model, device, batch_size: int) -> dict[str, float]:
        raise NotImplementedError

    def test(self, model, device, output_dir) -> dict:
        """After training: the task's final evaluation (decoding + official scores for NLG)."""
        return {}

    # -- scoring kept test outputs (score_run) ------------------------------------------------------
    # A task whose test outputs are decoded text keeps them as predictions.jsonl rows; `score`
    # turns such rows into the run's test metrics, at run time and later from the kept file.
    decodes = False                       # the test step writes predictions.jsonl
    procedures: tuple[str, ...] = ()      # named scoring procedures (E2E, WebNLG); () = one way
    default_procedures: tuple[str, ...] = ()

    @classmethod
    def score(cls, rows: list[dict], procedures: Sequence[str] = (),
              data_dir: str | None = None) -> dict:
        """Test metrics of kept prediction rows. With named procedures: the reported one's
        metrics flat, plus "procedure" (its name) and "procedures" ({name: metrics})."""
        raise NotImplementedError(f"{cls.__name__} has no decoded test outputs to score")

    @classmethod
    def describe_procedure(cls, name: str) -> str:
        raise NotImplementedError

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


# The task family a task config names with `family:`.
TASKS: Registry[Task] = Registry("task family", "family")
register_task = TASKS.register


def pad_inputs(examples: list[dict], multiple: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of examples' `input_ids`, right-padded to the longest of the
    batch rounded up to a bucket (`multiple`): dynamic padding with few distinct shapes."""
    rows = [e["input_ids"] for e in examples]
    length = pad_to(max(len(r) for r in rows), multiple)
    return pad_rows(rows, length, pad_id), length_mask([len(r) for r in rows], length)


def pad_rows(rows: Sequence[Sequence[int] | torch.Tensor], length: int, value: int) -> torch.Tensor:
    """Token rows right-padded with `value` to `length` (a bucket from pad_to), as one tensor."""
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.as_tensor(row)
    return out


def length_mask(lengths: Sequence[int], length: int) -> torch.Tensor:
    """The attention mask of right-padded rows: 1 on each row's first `lengths[i]` positions."""
    return (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()


@torch.no_grad()
def validation_loss(model, data: list[dict], collate: Callable, logits_fn: Callable, device,
                    batch_size: int, shift: bool, world=None) -> dict[str, float]:
    """Token-level loss (and perplexity) of the labels of `data`, summed over the set and divided
    by its labelled tokens; `shift`: a causal LM's logits at t predict the label at t + 1.
    Several processes (`world`): each takes its share of the batches, the sums are added up."""
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    starts = range(0, len(data), batch_size)
    mine = [starts[j] for j in world.take(len(starts))] if world is not None else starts
    for i in bar(mine, desc="eval validation", unit="batch"):
        batch = {k: v.to(device) for k, v in collate(data[i:i + batch_size]).items()}
        logits = logits_fn(model, batch)
        labels = batch["labels"]
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        total += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                 ignore_index=-100, reduction="sum")
        count += (labels != -100).sum()
    if world is not None:
        world.all_reduce_sum_([total, count])
    loss = float(total / count)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def write_predictions(output_dir: Path, rows: list[dict]) -> None:
    """predictions.jsonl (one JSON row per test input, the exact text under "prediction") and
    predictions.txt (one output per line; a newline inside an output becomes a space, so that
    lines stay aligned with the inputs)."""
    (output_dir / "predictions.txt").write_text(
        "\n".join(r["prediction"].replace("\n", " ") for r in rows), encoding="utf-8")
    with open(output_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


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
