"""GLUE tasks (Table 4): sentence(-pair) classification and STS-B regression on the dev sets."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..metrics.glue import glue_metrics
from ..progress import bar
from .base import Task, pad_inputs, padding_mask, register_task
from .glue_data import GLUE_SPECS, load_glue_split


@register_task("glue")
class GlueTask(Task):
    head = "classification"

    def __init__(self, cfg, data_dir):
        super().__init__(cfg, data_dir)
        self.spec = GLUE_SPECS[cfg.glue_name]
        self.metric = self.spec.metric
        self.regression = self.spec.num_labels == 1

    def load(self) -> None:
        limit_train = self.cfg.get("train_max_examples")
        limit_eval = self.cfg.get("eval_max_examples")
        self.splits = {"train": load_glue_split(self.spec.name, "train", self.data_dir)}
        self.eval_names = [self.spec.eval_split] + (
            ["validation_mismatched"] if self.spec.name == "mnli" else [])
        for name in self.eval_names:
            self.splits[name] = load_glue_split(self.spec.name, name, self.data_dir)
        self.rows = {"train": self.splits["train"].rows[:limit_train]}
        for name in self.eval_names:
            self.rows[name] = self.splits[name].rows[:limit_eval]

    def describe(self) -> dict:
        return {name: {"source": s.source, "rows_used": len(self.rows[name]),
                       **({"note": s.note} if s.note else {})} for name, s in self.splits.items()}

    def model_kwargs(self) -> dict:
        return {"num_labels": self.spec.num_labels,
                "problem_type": "regression" if self.regression else "single_label_classification"}

    def _encode(self, rows: list[dict]) -> list[dict]:
        a = [r["text_a"] for r in rows]
        b = [r["text_b"] for r in rows] if rows and rows[0]["text_b"] is not None else None
        enc = self.tokenizer(a, b, truncation=True, max_length=self.cfg.max_length)
        return [{"input_ids": ids, "label": r["label"]} for ids, r in zip(enc["input_ids"], rows)]

    def prepare(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.encoded = {name: self._encode(rows) for name, rows in self.rows.items()}

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_inputs(examples, self.cfg.pad_to_multiple_of, self.tokenizer.pad_token_id)
        dtype = torch.float32 if self.regression else torch.long
        labels = torch.tensor([e["label"] for e in examples], dtype=dtype)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _logits(self, model, batch) -> torch.Tensor:
        return encoder_logits(model, batch)

    def loss(self, model, batch) -> torch.Tensor:
        # Computed here rather than by the model so every method (AdaLoRA included) sees one loss.
        logits = self._logits(model, batch).float()
        if self.regression:
            return F.mse_loss(logits.squeeze(-1), batch["labels"])
        return F.cross_entropy(logits, batch["labels"])

    @torch.no_grad()
    def evaluate(self, model, device, batch_size: int) -> dict[str, float]:
        out = {}
        for name in self.eval_names:
            data = self.encoded[name]
            starts = range(0, len(data), batch_size)
            # Several processes: each takes its share of the batches; the predictions are merged.
            mine = [starts[j] for j in self.world.take(len(starts))] if self.world else starts
            outs = {}
            for i in bar(mine, desc=f"eval {name}", unit="batch"):
                batch = {k: v.to(device) for k, v in self.collate(data[i:i + batch_size]).items()}
                logits = self._logits(model, batch).float()
                pred = logits.squeeze(-1) if self.regression else logits.argmax(-1)
                outs[i] = (pred, batch["labels"])
            outs = {i: (p.cpu(), y.cpu()) for i, (p, y) in outs.items()}   # after the loop: one wait
            if self.world:
                outs = self.world.merge(outs)
            preds = [outs[i][0] for i in starts]
            labels = [outs[i][1] for i in starts]
            metrics = glue_metrics(self.spec.name, torch.cat(preds).numpy(), torch.cat(labels).numpy())
            prefix = "" if name == self.spec.eval_split else f"{name}/"
            out.update({prefix + k: float(v) for k, v in metrics.items()})
        return out


def encoder_logits(model, batch) -> torch.Tensor:
    """The forward of a padded classification batch (padding mask: see base.padding_mask)."""
    return model(input_ids=batch["input_ids"],
                 attention_mask=padding_mask(model, batch["attention_mask"])).logits
